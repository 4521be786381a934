"""Bias + activation fusion.

Matches the activation the step graph writes around a Tanh (tanh-GeLU) or an Erf (erf-GeLU) whose input
chain starts at ``x = Add(y, bias)`` with a constant 1-D bias::

    tanh-GeLU: Mul(Mul(0.5, x), Add(1, Tanh(Mul(k, Add(x, Mul(Mul(Mul(0.044715, x), x), x))))))
    erf-GeLU:  Mul(Mul(0.5, x), Add(1, Erf(Div(x, sqrt 2))))

checks the constants, and emits ``moetrt::BiasAct(y, bias) -> out``. The elementwise nodes must all be
private to the pattern; anything else stays unchanged with a warning.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_graphsurgeon as gs

from moetrt.passes.attention import NoMatch
from moetrt.passes.manager import Pass
from moetrt.plugins.specs import BIAS_ACT, DOMAIN

log = logging.getLogger("moetrt.passes")


# constants are stored in the graph's float type: fp16 rounds sqrt(2/pi) to 0.7978515625 (rel. 7e-5)
_CONST_RTOL = 1e-3


def _scalar(v):
    return float(np.asarray(v.values).reshape(-1)[0]) if isinstance(v, gs.Constant) and np.asarray(v.values).size == 1 else None


def _split(node, want):
    """(constant value, other input) of a binary node with one scalar constant operand."""
    a, b = node.inputs
    if _scalar(a) is not None:
        return _scalar(a), b
    if _scalar(b) is not None:
        return _scalar(b), a
    raise NoMatch(f"{node.name} has no scalar constant ({want})")


def _only_consumer(v, op):
    if len(v.outputs) != 1 or v.outputs[0].op != op:
        raise NoMatch(f"{v.name} is not consumed by exactly one {op}")
    return v.outputs[0]


def _match(core: gs.Node):
    """From the Tanh/Erf node to (x's Add, the output Mul, the activation kind)."""
    kind = "gelu_tanh" if core.op == "Tanh" else "gelu"
    inner = core.inputs[0].inputs[0] if core.inputs[0].inputs else None
    if kind == "gelu_tanh":
        if inner is None or inner.op != "Mul":
            raise NoMatch("tanh argument is not a scaled sum")
        k, s = _split(inner, "sqrt(2/pi)")
        if not math.isclose(k, math.sqrt(2 / math.pi), rel_tol=_CONST_RTOL):
            raise NoMatch(f"scale {k} is not sqrt(2/pi)")
        add = s.inputs[0] if s.inputs else None
        if add is None or add.op != "Add":
            raise NoMatch("tanh argument is not x + 0.044715 x^3")
        x = next((i for i in add.inputs if i.inputs and i.inputs[0].op == "Add"), None)
    else:
        if inner is None or inner.op != "Div":
            raise NoMatch("erf argument is not x / sqrt(2)")
        x = inner.inputs[0]
        if not math.isclose(_scalar(inner.inputs[1]) or 0.0, math.sqrt(2), rel_tol=_CONST_RTOL):
            raise NoMatch("erf argument is not divided by sqrt(2)")
    if x is None or not x.inputs or x.inputs[0].op != "Add":
        raise NoMatch("the activation's input is not a bias Add")
    bias_add = x.inputs[0]
    bias = next((i for i in bias_add.inputs if isinstance(i, gs.Constant) and len(i.shape) == 1), None)
    if bias is None:
        raise NoMatch("the Add before the activation has no 1-D constant bias")
    one_add = _only_consumer(core.outputs[0], "Add")
    if _split(one_add, "1")[0] != 1.0:
        raise NoMatch("tanh/erf is not followed by 1 + ...")
    out_mul = _only_consumer(one_add.outputs[0], "Mul")
    half = next((i.inputs[0] for i in out_mul.inputs if i.inputs and i.inputs[0].op == "Mul"
                 and i is not one_add.outputs[0]), None)
    if half is None or _split(half, "0.5")[0] != 0.5:
        raise NoMatch("the output is not 0.5 x (1 + ...)")
    y = next(i for i in bias_add.inputs if i is not bias)
    return y, bias, out_mul, kind


def fuse_bias_act(graph: gs.Graph) -> gs.Graph:
    fused = 0
    for core in [n for n in graph.nodes if n.op in ("Tanh", "Erf")]:
        try:
            y, bias, out_mul, kind = _match(core)
        except NoMatch as why:
            log.warning("bias_act: not fused at %s: %s", core.name, why)
            continue
        out = out_mul.outputs[0]
        out_mul.outputs = []
        graph.nodes.append(gs.Node(op=BIAS_ACT.op_type, domain=DOMAIN, name=f"BiasAct_{fused}",
                                   attrs=BIAS_ACT.node_attributes(activation=kind), inputs=[y, bias], outputs=[out]))
        fused += 1
    if not fused:
        log.info("bias_act: no bias + GeLU pattern found")
    return graph.cleanup()


BIAS_ACT_PASS = Pass("bias_act", fuse_bias_act, "bias Add + tanh/erf GeLU -> moetrt::BiasAct")
