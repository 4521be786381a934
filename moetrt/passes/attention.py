"""Attention fusion.

Matches, around each Softmax (Casts optional anywhere on the chains)::

    qkv -> Reshape[B,T,H,3,D] -> Gather(axis 3, j) -> Transpose          (q for j=0, k for 1, v for 2)
    cache -> Gather(axis 0, 0|1) -> Transpose -> ScatterND(k|v at the new slots) -> Transpose -> kc|vc
    scores = Div(MatMul(q, Transpose(Slice(kc))), sqrt(D)) ; Where(mask, -inf, scores) ; Softmax
    ctx = Reshape(Transpose(MatMul(probs, Slice(vc)))) ;  cache_out = Concat(Unsqueeze(kc), Unsqueeze(vc))

and emits ``moetrt::Attention(qkv, cache, past_lengths) -> (ctx, cache_out)`` whose cache output aliases
its input (``specs.ATTENTION``); ``past_lengths`` is the graph input of that name (the step graph's
interface). What does not match is left unchanged with a warning naming the Softmax and the reason.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_graphsurgeon as gs

from moetrt.passes.manager import Pass
from moetrt.plugins.specs import ATTENTION, DOMAIN

log = logging.getLogger("moetrt.passes")


class NoMatch(Exception):
    pass


def _producer(v, *ops):
    """The node producing ``v`` (through Casts), which must be one of ``ops``."""
    while isinstance(v, gs.Variable) and len(v.inputs) == 1 and v.inputs[0].op == "Cast" and "Cast" not in ops:
        v = v.inputs[0].inputs[0]
    if not isinstance(v, gs.Variable) or len(v.inputs) != 1 or v.inputs[0].op not in ops:
        raise NoMatch(f"expected {'/'.join(ops)} producing {getattr(v, 'name', v)}")
    return v.inputs[0]


def _consumer(v, *ops):
    """The single consumer of ``v`` (through Casts), which must be one of ``ops``."""
    while len(v.outputs) == 1 and v.outputs[0].op == "Cast":
        v = v.outputs[0].outputs[0]
    users = [n for n in v.outputs if n.op in ops]
    if len(users) != 1:
        raise NoMatch(f"expected one {'/'.join(ops)} consuming {v.name}")
    return users[0]


def through(node: gs.Node, op: str) -> tuple[gs.Node, gs.Variable]:
    """``node`` and its output, or the single ``op`` node after it (an Identity or Cast the exporter added)
    and that node's output: the last node to disconnect and the tensor a fused node must produce."""
    out = node.outputs[0]
    if len(out.outputs) == 1 and out.outputs[0].op == op:
        node = out.outputs[0]
        out = node.outputs[0]
    return node, out


def _cache_side(v):
    """From the K (or V) operand of a MatMul back to (cache input, the updated half kc|vc)."""
    sliced = _producer(v, "Slice")
    updated = sliced.inputs[0]                       # kc | vc  [Bm, H, S, D]
    scatter = _producer(_producer(updated, "Transpose").inputs[0], "ScatterND")
    half = _producer(_producer(scatter.inputs[0], "Transpose").inputs[0], "Gather")
    return half.inputs[0], updated


def _check_scale_and_mask(where: gs.Node, div: gs.Node, head_dim: int) -> None:
    """The fused node computes softmax(q·kᵀ/√D) under the causal slot mask: the graph must too."""
    scale = div.inputs[1]
    value = float(np.asarray(scale.values).reshape(-1)[0]) if isinstance(scale, gs.Constant) else None
    if value is None or not math.isclose(value, math.sqrt(head_dim), rel_tol=1e-3):
        raise NoMatch(f"scores are divided by {value}, not sqrt(head_dim) = {math.sqrt(head_dim):g}")
    fill = where.inputs[1]
    if not (isinstance(fill, gs.Constant) and np.isneginf(np.asarray(fill.values)).all()):
        raise NoMatch("masked scores are not filled with -inf")
    mask = _producer(where.inputs[0], "Not")  # hidden = not (key slot <= query slot)
    below = mask.inputs[0]
    while isinstance(below, gs.Variable) and below.inputs and below.inputs[0].op in ("Unsqueeze", "Cast"):
        below = below.inputs[0].inputs[0]
    if not (isinstance(below, gs.Variable) and below.inputs and below.inputs[0].op == "LessOrEqual"):
        raise NoMatch("the mask is not the causal (key slot <= query slot) comparison")


def _match(softmax: gs.Node, past_lengths):
    where = _producer(softmax.inputs[0], "Where")
    div = next((_producer(i, "Div") for i in where.inputs[1:] if isinstance(i, gs.Variable) and i.inputs), None)
    if div is None:
        raise NoMatch("the masked scores are not a Div")
    scores = _producer(div.inputs[0], "MatMul")
    q_gather = _producer(_producer(scores.inputs[0], "Transpose").inputs[0], "Gather")
    qkv = _producer(q_gather.inputs[0], "Reshape").inputs[0]
    cache, kc = _cache_side(_producer(scores.inputs[1], "Transpose").inputs[0])
    pv = _consumer(softmax.outputs[0], "MatMul")
    cache_v, vc = _cache_side(pv.inputs[1])
    if cache_v is not cache:
        raise NoMatch("K and V come from different cache inputs")
    reshape = _consumer(_consumer(pv.outputs[0], "Transpose").outputs[0], "Reshape")
    concat = _consumer(_consumer(kc, "Unsqueeze").outputs[0], "Concat")
    if _consumer(vc, "Unsqueeze").outputs[0] not in concat.inputs:
        raise NoMatch("the updated K and V are not stacked into one cache output")
    tail, cache_out = through(concat, "Identity")
    if past_lengths is None:
        raise NoMatch("the graph has no past_lengths input")
    if cache.shape is None or not isinstance(cache.shape[-1], int):
        raise NoMatch("the cache input's head_dim is not static")
    _check_scale_and_mask(where, div, cache.shape[-1])
    return qkv, cache, reshape, tail, cache_out


def fuse_attention(graph: gs.Graph) -> gs.Graph:
    past_lengths = next((i for i in graph.inputs if i.name == "past_lengths"), None)
    fused = 0
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        try:
            qkv, cache, reshape, tail, cache_out = _match(softmax, past_lengths)
        except NoMatch as why:
            if softmax.inputs and softmax.inputs[0].inputs and softmax.inputs[0].inputs[0].op == "Where":
                log.warning("attention: not fused at %s: %s", softmax.name, why)
            continue
        ctx = reshape.outputs[0]
        reshape.outputs, tail.outputs = [], []
        heads = cache.shape[2] if cache.shape is not None else None
        if not isinstance(heads, int):
            log.warning("attention: not fused at %s: the cache input's head count is not static", softmax.name)
            continue
        graph.nodes.append(gs.Node(op=ATTENTION.op_type, domain=DOMAIN, name=f"Attention_{fused}",
                                   attrs=ATTENTION.node_attributes(num_heads=heads),
                                   inputs=[qkv, cache, past_lengths], outputs=[ctx, cache_out]))
        fused += 1
    if not fused:
        log.warning("attention: no attention pattern found")
    return graph.cleanup()


ATTENTION_PASS = Pass("attention", fuse_attention, "QKV split, cache update, masked softmax attention -> moetrt::Attention")
