"""The GPU backend's view of a rank's lowered graph: which nodes run where (no GPU needed to build it).

Every node of the lowered ONNX graph is either

- **host**: shape arithmetic (Shape, Gather on a shape, Concat, Unsqueeze, ...) whose inputs are known on the
  host once the batch and token counts of a step are; evaluated in numpy when a step's launch plan is made;
- **device**: a kernel or a GEMM of the plan (``Op``): the plugin ops (AddLayerNorm, BiasAct, Attention, MoE),
  MatMul with its bias Add fused into the cuBLASLt epilogue, the two embedding Gathers fused into one embedding
  kernel feeding the first AddLayerNorm; or an alias (Reshape, Squeeze, Unsqueeze, the int32→int64 Cast of
  token ids, the Slice that selects the logit rows) that launches nothing.

A node that fits neither raises ``UnsupportedNode`` naming it; ``moetrt compile`` runs this analysis, so an
engine the GPU backend cannot run fails at compile time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from moetrt.errors import MoetrtError
from moetrt.plugins.specs import DOMAIN

HOST_OPS = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Mul", "Add", "Sub", "Div", "Cast", "Slice",
            "Reshape", "Range", "Identity", "Constant", "ConstantOfShape", "Expand", "Equal", "Where", "ReduceProd"}
ALIAS_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
GRAPH_INPUTS = ("input_ids", "position_ids", "past_lengths")
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
               onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT64: "int64"}


class UnsupportedNode(MoetrtError):
    """A node of the lowered graph that the GPU backend cannot run."""


@dataclass
class Initializer:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int | None          # in weights.bin, or None when inline
    length: int
    proto: onnx.TensorProto

    def array(self, base_dir: Path) -> np.ndarray:
        if self.offset is None:
            return numpy_helper.to_array(self.proto)
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(self.proto.data_type)
        return np.memmap(base_dir / "weights.bin", dtype=np_dtype, mode="r", offset=self.offset, shape=self.shape)


@dataclass
class Op:
    """One device step: ``kind`` is gemm, embed_ln, add_layernorm, bias_act, attention, moe, alias or select."""
    kind: str
    node: str                   # the (first) ONNX node it comes from, for messages
    inputs: list[str | None]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)


@dataclass
class Program:
    steps: list                 # ("host", NodeProto) or ("op", Op), in graph order
    initializers: dict[str, Initializer]
    weights: list[str]          # initializers the device ops read
    act_dtype: str
    outputs: list[str]
    base_dir: Path
    cache_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def ops(self) -> list[Op]:
        return [s for kind, s in self.steps if kind == "op"]


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _where(node: onnx.NodeProto) -> str:
    return f"node {node.name or '(unnamed)'!r} ({node.domain + '::' if node.domain else ''}{node.op_type}, " \
           f"inputs {list(node.input)})"


def analyze(model_path: str | Path) -> Program:
    """The backend program of one rank's ``model.onnx``; raises ``UnsupportedNode`` naming what cannot run."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise MoetrtError(f"{model_path}: no such graph")
    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    inits: dict[str, Initializer] = {}
    for t in g.initializer:
        info = {e.key: e.value for e in t.external_data}
        ext = uses_external_data(t) and "location" in info
        dtype = ONNX_DTYPES.get(t.data_type, str(t.data_type))
        shape = tuple(int(d) for d in t.dims)
        inits[t.name] = Initializer(t.name, dtype, shape, int(info.get("offset", 0)) if ext else None,
                                    int(info.get("length", 0)), t)
    graph_inputs = {i.name for i in g.input}
    for name in GRAPH_INPUTS:
        if name not in graph_inputs:
            raise UnsupportedNode(f"{model_path}: graph input {name!r} is missing (inputs: {sorted(graph_inputs)})")
    act_dtype = None
    for i in g.input:
        if i.name.startswith("kv_cache_"):
            act_dtype = ONNX_DTYPES.get(i.type.tensor_type.elem_type)
    if act_dtype not in ("fp16", "fp32", "bf16"):
        raise UnsupportedNode(f"{model_path}: no KV-cache input of a float dtype; not a moetrt step graph")

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = [o.name for o in g.output]

    host = set(inits)            # tensors whose values are known on the host at plan time
    device = set(graph_inputs)   # tensors living on the GPU
    steps: list = []
    fused: set[int] = set()      # ids of nodes folded into an earlier Op
    gathers: dict[str, tuple[str, str]] = {}  # embedding Gather output -> (table, ids)
    transposed: dict[str, str] = {}  # Transpose of a 2-D weight -> the weight (the GEMM reads it transposed)
    weights: dict[str, None] = {}

    def need_weight(name: str, node) -> str:
        if name not in inits:
            raise UnsupportedNode(f"{_where(node)}: expected an initializer (weight) for {name!r}")
        weights[name] = None
        return name

    for n in g.node:
        if id(n) in fused:
            continue
        ins = [i for i in n.input if i]
        op = n.op_type
        if op == "Shape" and n.domain in ("", "ai.onnx"):
            host.update(n.output)
            steps.append(("host", n))
            continue
        if op == "Transpose" and ins[0] in inits and len(inits[ins[0]].shape) == 2 and \
                list(_attrs(n).get("perm", [1, 0])) == [1, 0]:
            transposed[n.output[0]] = ins[0]
            continue
        if n.domain in ("", "ai.onnx") and op in HOST_OPS and all(i in host for i in ins):
            host.update(n.output)
            steps.append(("host", n))
            continue
        # -- device nodes --------------------------------------------------------------------------------
        if n.domain == DOMAIN:
            a = _attrs(n)
            if op == "AddLayerNorm":
                x, delta = n.input[0], (n.input[1] if len(n.input) > 1 and n.input[1] else None)
                gamma, beta = need_weight(n.input[2], n), need_weight(n.input[3], n)
                if x in gathers and delta in gathers:  # embedding: wte[ids] + wpe[pos], then LayerNorm
                    (wte, ids), (wpe, pos) = gathers.pop(x), gathers.pop(delta)  # a sum: order is free
                    steps.append(("op", Op("embed_ln", n.name, [ids, pos, wte, wpe, gamma, beta], list(n.output),
                                           {"epsilon": float(a.get("epsilon", 1e-5))})))
                else:
                    for t in (x, delta):
                        if t is not None and t not in device:
                            raise UnsupportedNode(f"{_where(n)}: input {t!r} is not computed on the device")
                    steps.append(("op", Op("add_layernorm", n.name, [x, delta, gamma, beta], list(n.output),
                                           {"epsilon": float(a.get("epsilon", 1e-5))})))
            elif op == "BiasAct":
                steps.append(("op", Op("bias_act", n.name, [n.input[0], need_weight(n.input[1], n)], list(n.output),
                                       {"activation": a.get("activation", "gelu_tanh")})))
            elif op == "Attention":
                if n.input[2] != "past_lengths" or not n.input[1].startswith("kv_cache_"):
                    raise UnsupportedNode(f"{_where(n)}: the cache and past_lengths must be graph inputs")
                steps.append(("op", Op("attention", n.name, list(n.input[:3]), list(n.output),
                                       {"num_heads": int(a["num_heads"])})))
            elif op == "MoE":
                ws = [need_weight(w, n) for w in n.input[1:6]]
                steps.append(("op", Op("moe", n.name, [n.input[0], *ws], list(n.output),
                                       {"top_k": int(a.get("top_k", 1)),
                                        "activation": a.get("activation_kind", "gelu_tanh"),
                                        "capacity_factor": float(a.get("capacity_factor", 0.0)),
                                        "min_capacity": int(a.get("min_capacity", 4))})))
            elif op == "AllReduce":
                steps.append(("op", Op("all_reduce", n.name, [n.input[0]], list(n.output),
                                       {"tp_size": int(a.get("tp_size", 1))})))
            else:
                raise UnsupportedNode(f"{_where(n)}: plugin op {op!r} has no CUDA implementation")
        elif op == "MatMul":
            x, w = n.input
            if x not in device:
                raise UnsupportedNode(f"{_where(n)}: activation input {x!r} is not computed on the device")
            trans = w in transposed
            w = need_weight(transposed.get(w, w), n)
            if len(inits[w].shape) != 2:
                raise UnsupportedNode(f"{_where(n)}: weight {w!r} must be 2-D, got {inits[w].shape}")
            K, N = inits[w].shape[::-1] if trans else inits[w].shape
            out, bias, act = n.output[0], None, None
            users = consumers.get(out, [])
            if len(users) == 1 and users[0].op_type == "BiasAct" and users[0].input[0] == out and \
                    users[0].input[1] in inits and out not in outputs:  # bias + activation after the GEMM
                bias = need_weight(users[0].input[1], users[0])
                act = _attrs(users[0]).get("activation", "gelu_tanh")
                fused.add(id(users[0]))
                out = users[0].output[0]
            elif len(users) == 1 and users[0].op_type == "Add" and out not in outputs:
                add = users[0]
                other = add.input[1] if add.input[0] == out else add.input[0]
                if other in inits and inits[other].shape == (N,):
                    bias = need_weight(other, add)
                    fused.add(id(add))
                    out = add.output[0]
            steps.append(("op", Op("gemm", n.name, [x, w, bias], [out], {"K": K, "N": N, "trans": trans, "act": act})))
            device.add(out)
            continue
        elif op == "Add" and len(ins) == 2 and any(i in device for i in ins) and any(
                i in inits and len(inits[i].shape) == 1 for i in ins):  # a bias the GEMM could not absorb
            x, b = (ins[0], ins[1]) if ins[0] in device else (ins[1], ins[0])
            steps.append(("op", Op("bias_act", n.name, [x, need_weight(b, n)], list(n.output), {"activation": "none"})))
        elif op == "Gather" and ins[0] in inits and ins[1] in device:
            gathers[n.output[0]] = (need_weight(n.input[0], n), n.input[1])
            device.add(n.output[0])
            continue
        elif op == "Cast" and ins[0] in ("input_ids", "position_ids"):
            to = _attrs(n).get("to")
            if to not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                raise UnsupportedNode(f"{_where(n)}: token ids can only be cast to an integer type")
            steps.append(("op", Op("alias", n.name, [ins[0]], list(n.output), {"ids": True})))
        elif op == "Cast" and ins[0] in device and ONNX_DTYPES.get(_attrs(n).get("to")) == act_dtype:
            steps.append(("op", Op("alias", n.name, [ins[0]], list(n.output), {"op": "Identity"})))
        elif op in ALIAS_OPS and ins[0] in device:
            steps.append(("op", Op("alias", n.name, list(n.input), list(n.output), {"op": op, **_attrs(n)})))
        elif op == "Slice" and ins[0] in device and all(i in host for i in ins[1:]):
            steps.append(("op", Op("select", n.name, list(n.input), list(n.output))))
        else:
            raise UnsupportedNode(f"{_where(n)}: the CUDA backend cannot run this op on device data")
        device.update(n.output)

    for t, src in transposed.items():
        for user in consumers.get(t, []):
            if user.op_type != "MatMul" or user.input[1] != t:
                raise UnsupportedNode(f"{_where(user)}: reads the transposed weight {src!r}; only a MatMul's "
                                      "weight operand may")
    if gathers:
        name = next(iter(gathers))
        raise UnsupportedNode(f"Gather output {name!r}: an embedding lookup must feed an AddLayerNorm with the "
                              "position embedding")
    missing = [o for o in outputs if o not in device and not o.startswith("kv_cache_")]
    if missing:
        raise UnsupportedNode(f"graph outputs {missing} are not computed on the device")
    cache_shapes = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim)
                    for i in g.input if i.name.startswith("kv_cache_")}
    return Program(steps, inits, list(weights), act_dtype, outputs, model_path.parent, cache_shapes)


def check_engine(engine_dir: str | Path, tp: int) -> None:
    """Analyze every rank's graph of an engine directory (what ``moetrt compile`` calls)."""
    for r in range(tp):
        analyze(Path(engine_dir) / f"rank{r}" / "model.onnx")


# -- host evaluation of shape arithmetic ----------------------------------------------------------------

def propagate(program: Program, cache_shapes: dict, B: int, T: int) -> tuple[dict, dict]:
    """Shapes of the device tensors and values of the host tensors for a step of B sequences × T tokens."""
    p = program
    shapes: dict[str, tuple] = {"input_ids": (B, T), "position_ids": (B, T), "past_lengths": (B,)}
    shapes.update({name: tuple(s) for name, s in cache_shapes.items()})
    values = {name: init.array(p.base_dir) for name, init in p.initializers.items()
              if init.offset is None and init.dtype in ("int64", "int32")}
    for kind, step in p.steps:
        if kind == "host":
            eval_host(step, values, shapes)
            continue
        op: Op = step
        ins = op.inputs
        if op.kind == "embed_ln":
            h = p.initializers[ins[2]].shape[1]
            shapes[op.outputs[0]] = shapes[op.outputs[1]] = (*shapes[ins[0]], h)
        elif op.kind == "add_layernorm":
            shapes[op.outputs[0]] = shapes[op.outputs[1]] = shapes[ins[0]]
        elif op.kind == "gemm":
            shapes[op.outputs[0]] = (*shapes[ins[0]][:-1], op.attrs["N"])
        elif op.kind in ("bias_act", "moe", "all_reduce"):
            shapes[op.outputs[0]] = shapes[ins[0]]
        elif op.kind == "attention":
            b, t, three_h = shapes[ins[0]]
            shapes[op.outputs[0]] = (b, t, three_h // 3)
            shapes[op.outputs[1]] = shapes[ins[1]]
        elif op.kind == "alias":
            shapes[op.outputs[0]] = alias_shape(op, shapes, values)
        elif op.kind == "select":
            src = shapes[ins[0]]
            sl = _slices(src, *[values[i] for i in ins[1:] if i])
            shapes[op.outputs[0]] = tuple(len(range(*s.indices(d))) for s, d in zip(sl, src))
    return shapes, values


def eval_host(node: onnx.NodeProto, values: dict, shapes: dict) -> None:
    """Evaluate a host node into ``values``; ``shapes`` gives the shapes of device tensors."""
    op, a = node.op_type, _attrs(node)
    x = [values.get(i) if i else None for i in node.input]
    if op == "Constant":
        t = a.get("value")
        out = numpy_helper.to_array(t) if t is not None else np.array(a.get("value_int", a.get("value_float")))
    elif op == "Shape":
        src = node.input[0]
        shape = shapes[src] if src in shapes else values[src].shape
        out = np.array(shape, np.int64)[a.get("start", 0):a.get("end", None)]
    elif op == "Gather":
        out = np.take(x[0], x[1], axis=a.get("axis", 0))
    elif op == "Unsqueeze":
        axes = a.get("axes", x[1] if len(x) > 1 else None)
        out = x[0]
        for ax in sorted(int(v) % (out.ndim + len(axes)) for v in np.atleast_1d(axes)):
            out = np.expand_dims(out, ax)
    elif op == "Squeeze":
        axes = a.get("axes", x[1] if len(x) > 1 else None)
        out = np.squeeze(x[0], axis=None if axes is None else tuple(int(v) for v in np.atleast_1d(axes)))
    elif op == "Concat":
        out = np.concatenate([np.atleast_1d(v) for v in x], axis=a.get("axis", 0))
    elif op in ("Mul", "Add", "Sub"):
        out = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract}[op](x[0], x[1])
    elif op == "Div":
        out = x[0] // x[1] if np.issubdtype(np.asarray(x[0]).dtype, np.integer) else x[0] / x[1]
    elif op == "Cast":
        out = np.asarray(x[0]).astype(onnx.helper.tensor_dtype_to_np_dtype(a["to"]))
    elif op == "Slice":
        out = x[0][_slices(x[0].shape, *x[1:])]
    elif op == "Reshape":
        out = x[0].reshape(_reshape_target(x[0].shape, x[1], a.get("allowzero", 0)))
    elif op == "Range":
        out = np.arange(x[0], x[1], x[2])
    elif op == "Identity":
        out = x[0]
    elif op == "ConstantOfShape":
        fill = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        out = np.full(tuple(int(v) for v in x[0]), fill.reshape(-1)[0], fill.dtype)
    elif op == "Expand":
        out = x[0] * np.ones(tuple(int(v) for v in x[1]), x[0].dtype)
    elif op == "Equal":
        out = np.equal(x[0], x[1])
    elif op == "Where":
        out = np.where(x[0], x[1], x[2])
    elif op == "ReduceProd":
        out = np.prod(x[0], keepdims=bool(a.get("keepdims", 1)))
    else:  # analyze() admits only HOST_OPS
        raise UnsupportedNode(f"{_where(node)}: no host evaluation")
    values[node.output[0]] = np.asarray(out)


def _slices(shape, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else [int(a) % len(shape) for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * len(shape)
    for ax, s, e, st in zip(axes, starts, ends, steps):
        index[ax] = slice(*slice(int(s), int(e), int(st)).indices(shape[ax]))
    return tuple(index)


def _reshape_target(shape, target, allowzero=0) -> tuple[int, ...]:
    target = [int(v) for v in np.atleast_1d(target)]
    if not allowzero:
        target = [shape[i] if v == 0 else v for i, v in enumerate(target)]
    if -1 in target:
        known = int(np.prod([v for v in target if v != -1], dtype=np.int64))
        total = int(np.prod(shape, dtype=np.int64))
        target[target.index(-1)] = total // known if known else 0
    return tuple(target)


def alias_shape(op: Op, shapes: dict, values: dict) -> tuple[int, ...]:
    src = shapes[op.inputs[0]]
    kind = op.attrs.get("op")
    if op.attrs.get("ids") or kind == "Identity":
        return src
    if kind == "Reshape":
        return _reshape_target(src, values[op.inputs[1]], op.attrs.get("allowzero", 0))
    if kind == "Flatten":
        ax = op.attrs.get("axis", 1) % max(len(src), 1)
        return (int(np.prod(src[:ax], dtype=np.int64)), int(np.prod(src[ax:], dtype=np.int64)))
    axes = op.attrs.get("axes")
    if axes is None and len(op.inputs) > 1 and op.inputs[1]:
        axes = values[op.inputs[1]]
    axes = [int(v) for v in np.atleast_1d(axes)] if axes is not None else None
    if kind == "Squeeze":
        keep = [d for i, d in enumerate(src) if not (d == 1 and (axes is None or i in [a % len(src) for a in axes]))]
        return tuple(keep)
    out = list(src)  # Unsqueeze
    for ax in sorted(a % (len(src) + len(axes)) for a in axes):
        out.insert(ax, 1)
    return tuple(out)
