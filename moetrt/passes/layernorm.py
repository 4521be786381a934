"""LayerNorm fusion.

Matches the decomposed LayerNorm, optionally preceded by the residual Add that produces its input and
wrapped in Casts (fp16 graphs normalise in fp32)::

    s = Add(a, b)                                  # optional residual add
    x = [Cast] s ;  c = Sub(x, ReduceMean(x))      # ReduceMean over the last axis
    y = Div(c, Sqrt(Add(ReduceMean(Pow(c, 2)), eps)))
    out = [Cast] Add(Mul(y, [Cast] gamma), [Cast] beta)

and emits one ``moetrt::AddLayerNorm(a, b, gamma, beta) -> (s, out)`` (or ``(x, "", gamma, beta) -> ("", out)``
without the residual add). A Sub/Div pair that looks like a LayerNorm but differs (another axis, a missing
epsilon, mean of something else) is left unchanged with a warning saying what did not match.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from moetrt.passes.manager import Pass
from moetrt.plugins.specs import ADD_LAYERNORM, DOMAIN

log = logging.getLogger("moetrt.passes")


def _producer(v):
    return v.inputs[0] if isinstance(v, gs.Variable) and len(v.inputs) == 1 else None


def _skip_cast(v):
    while (p := _producer(v)) is not None and p.op == "Cast":
        v = p.inputs[0]
    return v


def _is_last_axis_mean(node, rank_hint=None) -> bool:
    axes = node.attrs.get("axes")
    return node.op == "ReduceMean" and axes is not None and list(axes) in ([-1],) + (([rank_hint - 1],) if rank_hint else ())


def _const_value(v):
    v = _skip_cast(v)
    return v.values if isinstance(v, gs.Constant) else None


def fuse_layernorm(graph: gs.Graph) -> gs.Graph:
    fused = 0
    for div in [n for n in graph.nodes if n.op == "Div"]:
        sub, sqrt = _producer(div.inputs[0]), _producer(div.inputs[1])
        why = None
        if sub is None or sub.op != "Sub" or sqrt is None or sqrt.op != "Sqrt":
            continue  # not LayerNorm-shaped at all: no warning
        mean = _producer(sub.inputs[1])
        add_eps = _producer(sqrt.inputs[0])
        var = _producer(add_eps.inputs[0]) if add_eps is not None and add_eps.op == "Add" else None
        pow_ = _producer(var.inputs[0]) if var is not None and var.op == "ReduceMean" else None
        eps = _const_value(add_eps.inputs[1]) if add_eps is not None else None
        if mean is None or mean.op != "ReduceMean" or mean.inputs[0] is not sub.inputs[0]:
            why = "the subtracted mean is not ReduceMean of the same input"
        elif not (_is_last_axis_mean(mean) and var is not None and _is_last_axis_mean(var)):
            why = "the means are not over the last axis"
        elif pow_ is None or pow_.op != "Pow" or pow_.inputs[0] is not sub.outputs[0] or \
                _const_value(pow_.inputs[1]) is None or float(np.asarray(_const_value(pow_.inputs[1]))) != 2.0:
            why = "the variance is not the mean of the squared centred input"
        elif eps is None:
            why = "epsilon is not a constant"
        if why:
            log.warning("layernorm: not fused at %s: %s", div.name, why)
            continue
        consumers = div.outputs[0].outputs
        mul = consumers[0] if len(consumers) == 1 and consumers[0].op == "Mul" else None
        bias_add = mul.outputs[0].outputs[0] if mul is not None and len(mul.outputs[0].outputs) == 1 else None
        if mul is None or bias_add is None or bias_add.op != "Add":
            log.warning("layernorm: not fused at %s: no scale (Mul) and shift (Add) after the normalisation", div.name)
            continue
        gamma = _skip_cast(mul.inputs[1] if mul.inputs[0] is div.outputs[0] else mul.inputs[0])
        beta = _skip_cast(bias_add.inputs[1] if bias_add.inputs[0] is mul.outputs[0] else bias_add.inputs[0])
        out = bias_add.outputs[0]
        after = out.outputs[0] if len(out.outputs) == 1 and out.outputs[0].op == "Cast" else None
        if after is not None:
            out = after.outputs[0]
        x = _skip_cast(sub.inputs[0])
        residual = _producer(x)
        attrs = ADD_LAYERNORM.node_attributes(epsilon=float(np.asarray(eps).reshape(-1)[0]))
        if residual is not None and residual.op == "Add" and all(isinstance(i, gs.Variable) for i in residual.inputs):
            a, b = residual.inputs
            residual.outputs = []  # the fused node now produces the sum
            inputs, outputs = [a, b, gamma, beta], [x, out]
        else:
            inputs, outputs = [x, gs.Variable.empty(), gamma, beta], [gs.Variable.empty(), out]
        for n in (after, bias_add):
            if n is not None:
                n.outputs = []
        graph.nodes.append(gs.Node(op=ADD_LAYERNORM.op_type, domain=DOMAIN, name=f"AddLayerNorm_{fused}",
                                   attrs=attrs, inputs=inputs, outputs=outputs))
        fused += 1
    if not fused:
        log.warning("layernorm: no LayerNorm pattern found")
    return graph.cleanup()


LAYERNORM = Pass("layernorm", fuse_layernorm, "decomposed LayerNorm (+ residual Add) -> moetrt::AddLayerNorm")
