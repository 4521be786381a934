"""Tensor-parallel sharding of a lowered graph (Megatron layout), one rank at a time.

- Attention: the QKV projection is column-parallel (its output is ``[heads, 3, head_dim]``, so a rank's
  heads are contiguous columns), the Attention node gets ``num_heads / tp`` and a cache of that many heads;
  the output projection is row-parallel, followed by ``moetrt::AllReduce`` before its bias.
- Dense MLP: fc1 and its bias (an Add, or the bias input of a fused BiasAct) column-parallel, fc2
  row-parallel, AllReduce before fc2's bias.
- MoE: experts split along their ffn dimension (as FasterTransformer does); the gate is replicated so every
  rank routes alike; the experts' output bias is kept on rank 0 only (zeros elsewhere) so the AllReduce
  after the MoE node adds it once.
- Embeddings, LayerNorms and the LM head are replicated: every rank's logits equal the unsharded graph's.

Weights are located structurally: a MatMul's weight operand is a constant ``[in, out]`` or a Transpose of a
constant ``[out, in]``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from moetrt.errors import MoetrtError
from moetrt.plugins.specs import ALL_REDUCE, DOMAIN


def _weight(matmul: gs.Node):
    """(constant, axis of its 'out' dimension) of a MatMul's second operand."""
    w = matmul.inputs[1]
    if isinstance(w, gs.Constant):
        return w, 1
    producer = w.inputs[0] if isinstance(w, gs.Variable) and len(w.inputs) == 1 else None
    if producer is not None and producer.op == "Transpose" and isinstance(producer.inputs[0], gs.Constant):
        return producer.inputs[0], 0
    raise MoetrtError(f"shard: weight of {matmul.name} is neither a constant nor a transposed constant")


# Weights still in external data are not loaded: their slice is recorded here, by initializer name, and
# applied while the rank's weights are streamed out (``compiler.pipeline.write_rank``), one tensor at a time.
SLICES_KEY = "moetrt_slices"


def _slice(const: gs.Constant, axis: int, rank: int, tp: int, zero: bool = False) -> None:
    shape = list(const.shape)
    if shape[axis] % tp:
        raise MoetrtError(f"shard: {const.name} dimension {axis} ({shape[axis]}) is not divisible by tp {tp}")
    if isinstance(const._values, LazyValues):
        const.__dict__.setdefault(SLICES_KEY, (axis, rank, tp, zero))
        return
    values = np.ascontiguousarray(np.split(np.asarray(const.values), tp, axis=axis)[rank])
    const.values = np.zeros_like(values) if zero else values


def recorded_slices(graph: gs.Graph) -> dict[str, tuple[int, int, int, bool]]:
    """Initializer name -> (axis, rank, tp, zero) for the external weights ``shard_graph`` sliced."""
    return {t.name: t.__dict__[SLICES_KEY] for t in graph.tensors().values()
            if isinstance(t, gs.Constant) and SLICES_KEY in t.__dict__}


def _bias_add(v: gs.Variable) -> gs.Node:
    users = [n for n in v.outputs if n.op == "Add" and any(isinstance(i, gs.Constant) for i in n.inputs)]
    if len(users) != 1:
        raise MoetrtError(f"shard: no bias Add after {v.name}")
    return users[0]


def _bias(add: gs.Node) -> gs.Constant:
    return next(i for i in add.inputs if isinstance(i, gs.Constant))


def _all_reduce_before(graph: gs.Graph, add: gs.Node, v: gs.Variable, tp: int, index: int) -> None:
    reduced = gs.Variable(f"{v.name}_allreduce", dtype=v.dtype, shape=v.shape)
    graph.nodes.append(gs.Node(op=ALL_REDUCE.op_type, domain=DOMAIN, name=f"AllReduce_{index}",
                               attrs=ALL_REDUCE.node_attributes(tp_size=tp), inputs=[v], outputs=[reduced]))
    add.inputs = [reduced if i is v else i for i in add.inputs]


def _downstream_matmul(v: gs.Variable) -> gs.Node:
    """The next MatMul after an activation's elementwise chain."""
    frontier, seen = [v], set()
    while frontier:
        cur = frontier.pop(0)
        for n in cur.outputs:
            if n.op == "MatMul":
                return n
            if id(n) not in seen and n.op in ("Mul", "Add", "Tanh", "Erf", "Div", "Pow", "Cast", "Sub"):
                seen.add(id(n))
                frontier.extend(n.outputs)
    raise MoetrtError(f"shard: no MatMul after the activation of {v.name}")


def shard_graph(graph: gs.Graph, rank: int, tp: int) -> gs.Graph:
    if tp == 1:
        return graph
    reduces = 0
    for attn in [n for n in graph.nodes if n.op == "Attention"]:
        heads = attn.attrs["num_heads"]
        if heads % tp:
            raise MoetrtError(f"shard: {attn.name} has {heads} heads, not divisible by tp {tp}")
        attn.attrs["num_heads"] = heads // tp
        qkv_add = attn.inputs[0].inputs[0]
        qkv_mm = next(i.inputs[0] for i in qkv_add.inputs if isinstance(i, gs.Variable) and i.inputs[0].op == "MatMul")
        w, out_axis = _weight(qkv_mm)
        _slice(w, out_axis, rank, tp)
        _slice(_bias(qkv_add), 0, rank, tp)
        for v in (attn.inputs[1], attn.outputs[1]):  # the cache binding: this rank's heads only
            v.shape = [v.shape[0], v.shape[1], heads // tp, *v.shape[3:]]
        out_mm = next(n for n in attn.outputs[0].outputs if n.op == "MatMul")
        w, out_axis = _weight(out_mm)
        _slice(w, 1 - out_axis, rank, tp)
        _all_reduce_before(graph, _bias_add(out_mm.outputs[0]), out_mm.outputs[0], tp, reduces)
        reduces += 1
    for moe in [n for n in graph.nodes if n.op == "MoE"]:
        _, _, w1, b1, w2, b2 = moe.inputs
        _slice(w1, 1, rank, tp)
        _slice(b1, 1, rank, tp)
        _slice(w2, 2, rank, tp)
        if rank:
            _slice(b2, 0, 0, 1, zero=True)
        out = moe.outputs[0]
        reduced = gs.Variable(f"{out.name}_allreduce", dtype=out.dtype, shape=out.shape)
        for user in list(out.outputs):
            user.inputs = [reduced if i is out else i for i in user.inputs]
        graph.nodes.append(gs.Node(op=ALL_REDUCE.op_type, domain=DOMAIN, name=f"AllReduce_{reduces}",
                                   attrs=ALL_REDUCE.node_attributes(tp_size=tp), inputs=[out], outputs=[reduced]))
        reduces += 1
    # dense MLPs: a MatMul reading a LayerNorm output that is neither attention's QKV nor the LM head
    qkv_inputs = {id(n.inputs[0].inputs[0]) for n in graph.nodes if n.op == "Attention"}
    for ln in [n for n in graph.nodes if n.op == "AddLayerNorm"]:
        for fc1 in [n for n in ln.outputs[1].outputs if n.op == "MatMul"]:
            users = fc1.outputs[0].outputs
            act = next((n for n in users if n.op == "BiasAct"), None)
            if act is not None:  # fused bias + GeLU
                bias, after = act.inputs[1], act.outputs[0]
            else:
                adds = [n for n in users if n.op == "Add" and any(isinstance(i, gs.Constant) for i in n.inputs)]
                if len(adds) != 1 or id(adds[0]) in qkv_inputs:
                    continue  # the LM head (no bias) or attention's QKV projection
                bias, after = _bias(adds[0]), adds[0].outputs[0]
            fc2 = _downstream_matmul(after)
            w, out_axis = _weight(fc1)
            _slice(w, out_axis, rank, tp)
            _slice(bias, 0, rank, tp)
            w, out_axis = _weight(fc2)
            _slice(w, 1 - out_axis, rank, tp)
            _all_reduce_before(graph, _bias_add(fc2.outputs[0]), fc2.outputs[0], tp, reduces)
            reduces += 1
    return graph.cleanup().toposort()
