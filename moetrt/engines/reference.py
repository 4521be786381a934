"""CPU reference executor for lowered graphs.

Standard ONNX ops run through ``onnx.reference.ReferenceEvaluator`` (onnx's own numpy implementation of
every standard op: no other runtime, and it accepts custom ops); each ``moetrt`` plugin op runs through its
spec's float64 numpy reference (``moetrt.plugins.specs``), cast back to the dtype of its first float input.
Slow, exact to the specs, and for validation only.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from moetrt.plugins.specs import DOMAIN, SPECS, OpSpec

def _op_class(spec: OpSpec) -> type[OpRun]:
    """An OpRun that calls ``spec.reference`` with the node's inputs (None for absent optional ones) and its
    attributes, which the references take under the spec's attribute names."""

    def _run(self, *inputs, **attrs):
        kwargs = {k: attrs.get(k, getattr(self, k, default)) for k, default in spec.attributes.items()}
        values = list(inputs) + [None] * (len(spec.inputs) - len(inputs))
        result = spec.reference(*values, **kwargs)
        results = result if isinstance(result, tuple) else (result,)
        float_in = next((v for v in inputs if v is not None and np.issubdtype(np.asarray(v).dtype, np.floating)), None)
        dtype = np.asarray(float_in).dtype if float_in is not None else np.float32
        return tuple(np.asarray(r).astype(dtype) for r in results)

    return type(spec.op_type, (OpRun,), {"op_domain": DOMAIN, "_run": _run})


_rank_context = threading.local()


class _Exchange:
    """Sums one AllReduce's inputs over the ranks (threads), in rank order: deterministic."""

    def __init__(self, ranks: int):
        self.barrier = threading.Barrier(ranks)
        self.slots: list = [None] * ranks

    def all_reduce(self, rank: int, x: np.ndarray) -> np.ndarray:
        self.slots[rank] = x
        self.barrier.wait()
        total = self.slots[0].astype(np.float64)
        for other in self.slots[1:]:
            total = total + other
        self.barrier.wait()  # nobody overwrites a slot before every rank has summed
        return total.astype(x.dtype)


class AllReduce(OpRun):
    op_domain = DOMAIN

    def _run(self, x, tp_size=None, plugin_version=None, plugin_namespace=None):
        ctx = getattr(_rank_context, "value", None)
        return (x if ctx is None else ctx[0].all_reduce(ctx[1], x),)


PLUGIN_OPS = [_op_class(spec) for name, spec in SPECS.items() if name != "AllReduce"] + [AllReduce]


class ReferenceExecutor:
    """Runs an ONNX model (path or ModelProto, external weights resolved) on the CPU."""

    def __init__(self, model: str | Path | onnx.ModelProto):
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model))  # loads external data from beside the file
        self.model = model
        self.evaluator = ReferenceEvaluator(model, new_ops=PLUGIN_OPS)
        self.input_names = [i.name for i in model.graph.input]
        self.output_names = [o.name for o in model.graph.output]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.evaluator.run(None, feeds)
        return dict(zip(self.output_names, outputs))


class ShardedReferenceExecutor:
    """Tensor-parallel ranks simulated in one process: one thread per rank graph, AllReduce summing
    across them. ``run`` takes each rank's feeds and returns each rank's outputs."""

    def __init__(self, models: list):
        self.ranks = [ReferenceExecutor(m) for m in models]

    def run(self, feeds_per_rank: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        if len(self.ranks) == 1:
            return [self.ranks[0].run(feeds_per_rank[0])]
        exchange = _Exchange(len(self.ranks))
        results: list = [None] * len(self.ranks)
        errors: list = []

        def work(r):
            _rank_context.value = (exchange, r)
            try:
                results[r] = self.ranks[r].run(feeds_per_rank[r])
            except BaseException as exc:  # surface it, and release the others
                errors.append(exc)
                exchange.barrier.abort()

        threads = [threading.Thread(target=work, args=(r,)) for r in range(len(self.ranks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return results
