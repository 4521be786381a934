"""CPU reference executor for lowered graphs.

Standard ONNX ops run through ``onnx.reference.ReferenceEvaluator`` (onnx's own numpy implementation of
every standard op: no other runtime, and it accepts custom ops); each ``moetrt`` plugin op runs through its
spec's float64 numpy reference (``moetrt.plugins.specs``), cast back to the dtype of its first float input.
Slow, exact to the specs, and for validation only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from moetrt.plugins.specs import DOMAIN, SPECS, OpSpec

_PLUGIN_ATTRIBUTES = ("plugin_version", "plugin_namespace")


def _op_class(spec: OpSpec) -> type[OpRun]:
    """An OpRun that calls ``spec.reference`` with the node's inputs (None for absent optional ones)."""
    names = [a for a in spec.attributes]

    def _run(self, *inputs, **attrs):
        kwargs = {k: attrs.get(k, getattr(self, k, spec.attributes[k])) for k in names}
        if spec.op_type == "MoE":
            kwargs = {"top_k": kwargs["top_k"], "activation_kind": kwargs["activation_kind"],
                      "capacity_factor": kwargs["capacity_factor"], "min_capacity": kwargs["min_capacity"]}
        values = list(inputs) + [None] * (len(spec.inputs) - len(inputs))
        result = spec.reference(*values, **kwargs)
        results = result if isinstance(result, tuple) else (result,)
        float_in = next((v for v in inputs if v is not None and np.issubdtype(np.asarray(v).dtype, np.floating)), None)
        dtype = np.asarray(float_in).dtype if float_in is not None else np.float32
        return tuple(np.asarray(r).astype(dtype) for r in results)

    return type(spec.op_type, (OpRun,), {"op_domain": DOMAIN, "_run": _run})


PLUGIN_OPS = [_op_class(spec) for spec in SPECS.values()]


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
