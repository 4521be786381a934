"""MoE fusion.

Matches gating + experts as the step graph writes them (Casts optional)::

    probs = Softmax(MatMul(tokens, Wgᵀ)) ; vals, idx = TopK(probs, k) ; [vals = Div(vals, ReduceSum(vals))]
    combine = ScatterElements(zeros, idx, vals)                                   # [N, E]
    hidden = act(Add(Einsum("nh,efh->nef", tokens, W1), b1))                      # every expert
    every = Add(Einsum("nef,ehf->neh", hidden, W2), b2)
    out = Einsum("ne,neh->nh", combine, every)

and emits ``moetrt::MoE(tokens, Wg, W1, b1, W2, b2) -> out`` with ``top_k`` and ``activation_kind`` (tanh
in the activation: ``gelu_tanh``; erf: ``gelu``). Anything else is left unchanged with a warning.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from moetrt.passes.attention import NoMatch, _producer, through
from moetrt.passes.manager import Pass
from moetrt.plugins.specs import DOMAIN, MOE

log = logging.getLogger("moetrt.passes")


def _strip_casts(v):
    while isinstance(v, gs.Variable) and len(v.inputs) == 1 and v.inputs[0].op == "Cast":
        v = v.inputs[0].inputs[0]
    return v


def _einsum(v, equation):
    node = _producer(v, "Einsum")
    if node.attrs.get("equation", "").replace(" ", "") != equation:
        raise NoMatch(f"Einsum {node.name} is {node.attrs.get('equation')!r}, expected {equation!r}")
    return node


def _activation_input(v):
    """Walk up the activation's elementwise nodes to the Add(Einsum(nh,efh->nef), b1) it starts from."""
    seen, frontier, kinds = set(), [v], set()
    while frontier:
        cur = frontier.pop()
        if not isinstance(cur, gs.Variable) or not cur.inputs or id(cur) in seen:
            continue
        seen.add(id(cur))
        node = cur.inputs[0]
        kinds.add(node.op)
        if node.op == "Add" and any(isinstance(i, gs.Variable) and i.inputs and i.inputs[0].op == "Einsum"
                                    for i in node.inputs):
            return node, ("gelu_tanh" if "Tanh" in kinds else "gelu" if "Erf" in kinds else None)
        if node.op in ("Mul", "Add", "Tanh", "Erf", "Div", "Pow", "Cast", "Sub"):
            frontier.extend(node.inputs)
    raise NoMatch("no Add(Einsum(tokens, W1), b1) under the activation")


def _other(node, v):
    return node.inputs[1] if node.inputs[0] is v else node.inputs[0]


def _match(final: gs.Node):
    if final.attrs.get("equation", "").replace(" ", "") != "ne,neh->nh":
        raise NoMatch("not the combining Einsum")
    scatter = _producer(final.inputs[0], "ScatterElements")
    topk_node = _producer(scatter.inputs[1], "TopK")
    softmax = _producer(topk_node.inputs[0], "Softmax")
    gate_mm = _producer(softmax.inputs[0], "MatMul")
    tokens = _strip_casts(gate_mm.inputs[0])
    gate = gate_mm.inputs[1]
    if isinstance(gate, gs.Constant):
        gate_w = gs.Constant(f"{gate.name}_ET", np.ascontiguousarray(np.asarray(gate.values, np.float32).T))
    else:
        gate_w = _strip_casts(_producer(gate, "Transpose").inputs[0])
    k = topk_node.inputs[1]
    if not isinstance(k, gs.Constant):
        raise NoMatch("TopK's k is not a constant")
    add_b2 = _producer(final.inputs[1], "Add")
    e2 = next((i for i in add_b2.inputs if isinstance(i, gs.Variable) and i.inputs and i.inputs[0].op == "Einsum"), None)
    if e2 is None:
        raise NoMatch("no Einsum under the fc2 bias Add")
    fc2 = _einsum(e2, "nef,ehf->neh")
    b2 = _strip_casts(_other(add_b2, e2))
    add_b1, kind = _activation_input(fc2.inputs[0])
    e1 = next(i for i in add_b1.inputs if isinstance(i, gs.Variable) and i.inputs and i.inputs[0].op == "Einsum")
    fc1 = _einsum(e1, "nh,efh->nef")
    if _strip_casts(fc1.inputs[0]) is not tokens:
        raise NoMatch("the experts do not read the gate's tokens")
    if kind is None:
        raise NoMatch("the activation is neither tanh-GeLU nor erf-GeLU")
    tail, out = through(final, "Cast")
    weights = [gate_w, _strip_casts(fc1.inputs[1]), _strip_casts(_other(add_b1, e1)), _strip_casts(fc2.inputs[1]), b2]
    return tokens, weights, int(np.asarray(k.values).reshape(-1)[0]), kind, tail, out


def fuse_moe(graph: gs.Graph) -> gs.Graph:
    fused = 0
    for final in [n for n in graph.nodes if n.op == "Einsum"]:
        try:
            tokens, weights, top_k, kind, tail, out = _match(final)
        except NoMatch as why:
            if "not the combining" not in str(why):
                log.warning("moe: not fused at %s: %s", final.name, why)
            continue
        tail.outputs = []
        graph.nodes.append(gs.Node(op=MOE.op_type, domain=DOMAIN, name=f"MoE_{fused}",
                                   attrs=MOE.node_attributes(top_k=top_k, activation_kind=kind),
                                   inputs=[tokens, *weights], outputs=[out]))
        fused += 1
    if not fused:
        log.warning("moe: no gating + experts pattern found")
    return graph.cleanup()


MOE_PASS = Pass("moe", fuse_moe, "gate softmax + top-k + experts + combine -> moetrt::MoE")
