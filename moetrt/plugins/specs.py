"""Plugin op specs: the one definition of each ``moetrt`` op (ONNX domain ``moetrt``).

Each ``OpSpec`` gives the op's inputs and outputs (dtype and symbolic shape), attributes with
defaults, which output aliases which input (the KV cache is written in place), a shape rule,
and a float64 numpy reference implementation. Passes build nodes from it, the CPU reference
executor evaluates nodes with ``reference``, the CUDA backend calls the launchers in
``moetrt.plugins.launch``, and a TensorRT plugin would register the same name and version.

Symbols: N tokens (B·T), B batch, T new tokens, h hidden, H heads, D head_dim, E experts,
f ffn_hidden, S max_seq, Bm max_batch. ``T`` in a dtype column means the model's float type.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from moetrt.models.config import ACTIVATIONS

DOMAIN = "moetrt"
NAMESPACE = "moetrt"


@dataclass(frozen=True)
class TensorDesc:
    name: str
    dtype: str            # "T" (model float type), "float32" or "int32"
    shape: tuple[str, ...]
    optional: bool = False


@dataclass(frozen=True)
class OpSpec:
    op_type: str
    version: str
    inputs: tuple[TensorDesc, ...]
    outputs: tuple[TensorDesc, ...]
    attributes: dict[str, object]
    reference: Callable
    doc: str
    aliases: dict[str, str] = field(default_factory=dict)  # output name -> input name it overwrites

    @property
    def domain(self) -> str:
        return DOMAIN

    def node_attributes(self, **attrs) -> dict[str, object]:
        """Attributes for an ONNX node: defaults, the given values, and the TensorRT plugin keys."""
        unknown = set(attrs) - set(self.attributes)
        if unknown:
            raise ValueError(f"{self.op_type}: unknown attribute(s) {sorted(unknown)}")
        return {**self.attributes, **attrs, "plugin_version": self.version, "plugin_namespace": NAMESPACE}


# -- references (float64 numpy; inputs may be any float dtype) --------------------------------------

def _f64(*arrays):
    return [None if a is None else np.asarray(a, dtype=np.float64) for a in arrays]


def apply_activation(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if kind == "gelu":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    raise ValueError(f"unknown activation {kind!r}; expected one of {ACTIVATIONS}")


def add_layernorm_reference(x, delta, gamma, beta, epsilon=1e-5):
    x, delta, gamma, beta = _f64(x, delta, gamma, beta)
    total = x if delta is None else x + delta
    mean = total.mean(-1, keepdims=True)
    var = ((total - mean) ** 2).mean(-1, keepdims=True)
    return total, (total - mean) / np.sqrt(var + epsilon) * gamma + beta


def fold_layernorm_reference(gamma, beta, weight, bias=None):
    """What ``launch.fold_layernorm`` computes, in float64 on the host (``weight [N, K]`` numpy): ``(weight *
    gamma, colsum, bias + weight @ beta)``, the first rounded once to weight's dtype, the other two fp32 ``[N]``;
    colsum sums the rounded folded weights."""
    w = np.asarray(weight)
    w64 = w.astype(np.float64)
    folded = (w64 * np.asarray(gamma, dtype=np.float64)[None, :]).astype(w.dtype)
    colsum = folded.astype(np.float64).sum(axis=1).astype(np.float32)
    b = w64 @ np.asarray(beta, dtype=np.float64)
    if bias is not None:
        b = b + np.asarray(bias, dtype=np.float64)
    return folded, colsum, b.astype(np.float32)


def bias_act_reference(x, bias, activation="gelu_tanh"):
    x, bias = _f64(x, bias)
    return apply_activation(x + bias, activation)


def embedding_reference(input_ids, position_ids, wte, wpe):
    wte, wpe = _f64(wte, wpe)
    return wte[np.asarray(input_ids)] + wpe[np.asarray(position_ids)]


def attention_reference(qkv, kv_cache, past_lengths, num_heads):
    """Causal attention of T new tokens per sequence over its cache; returns (context, new cache).

    ``qkv [B, T, 3h]`` in Megatron order ``[H, 3, D]``; ``kv_cache [2, Bm, H, S, D]``; the new keys
    and values go to slots ``past_lengths[b] + t``, and query t sees slots ``<= past_lengths[b] + t``.
    """
    qkv, cache = _f64(qkv, kv_cache)
    B, T, three_h = qkv.shape
    D = three_h // 3 // num_heads
    q, k, v = np.moveaxis(qkv.reshape(B, T, num_heads, 3, D), 3, 0)  # each [B, T, H, D]
    cache = cache.copy()
    ctx = np.empty((B, T, num_heads, D))
    for b in range(B):
        past = int(past_lengths[b])
        cache[0, b, :, past:past + T] = k[b].transpose(1, 0, 2)
        cache[1, b, :, past:past + T] = v[b].transpose(1, 0, 2)
        keys, values = cache[0, b, :, :past + T], cache[1, b, :, :past + T]  # [H, L, D]
        scores = np.einsum("thd,hld->htl", q[b], keys) / math.sqrt(D)
        scores = np.where(np.arange(past + T)[None, None, :] <= past + np.arange(T)[None, :, None], scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        ctx[b] = np.einsum("htl,hld->thd", p / p.sum(-1, keepdims=True), values)
    return ctx.reshape(B, T, num_heads * D), cache


def moe_route_reference(probs, top_k, capacity_factor=0.0, min_capacity=4):
    """(experts [N, k], weights [N, k]) exactly as ``moetrt.models.gpt_moe.route`` (see there)."""
    probs = np.asarray(probs, dtype=np.float64)
    N, E = probs.shape
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, experts, -1)
    if capacity_factor > 0:
        product = np.float32(N / E) * np.float32(top_k * capacity_factor)
        capacity = max(int(math.ceil(product)), int(min_capacity))
        used = np.zeros(E, dtype=np.int64)
        for k in range(top_k):
            for t in range(N):
                e = experts[t, k]
                if used[e] >= capacity:
                    weights[t, k] = 0.0
                used[e] += 1
    if top_k > 1:
        weights = weights / np.maximum(weights.sum(-1, keepdims=True), np.finfo(np.float32).eps)
    return experts, weights


def moe_reference(hidden, gate_weight, fc1_weight, fc1_bias, fc2_weight, fc2_bias, top_k=1,
                  activation_kind="gelu_tanh", capacity_factor=0.0, min_capacity=4):
    """``sum_k w_k (W2[e_k] act(W1[e_k] x + b1[e_k]) + b2[e_k])`` per token, gate softmax over ``x Wgᵀ``."""
    x, wg, w1, b1, w2, b2 = _f64(hidden, gate_weight, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    logits = x @ wg.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    experts, weights = moe_route_reference(probs, top_k, capacity_factor, min_capacity)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(top_k):
            if weights[t, k] == 0.0:
                continue
            e = experts[t, k]
            y = w2[e] @ apply_activation(w1[e] @ x[t] + b1[e], activation_kind) + b2[e]
            out[t] += weights[t, k] * y
    return out.reshape(shape)


# -- the specs ----------------------------------------------------------------------------------------

ADD_LAYERNORM = OpSpec(
    "AddLayerNorm", "1",
    inputs=(TensorDesc("x", "T", ("N", "h")), TensorDesc("delta", "T", ("N", "h"), optional=True),
            TensorDesc("gamma", "T", ("h",)), TensorDesc("beta", "T", ("h",))),
    outputs=(TensorDesc("sum", "T", ("N", "h")), TensorDesc("normed", "T", ("N", "h"))),
    attributes={"epsilon": 1e-5}, reference=add_layernorm_reference,
    doc="sum = x + delta (x when delta is absent); normed = LayerNorm(sum) with fp32 statistics.")

BIAS_ACT = OpSpec(
    "BiasAct", "1",
    inputs=(TensorDesc("x", "T", ("N", "n")), TensorDesc("bias", "T", ("n",))),
    outputs=(TensorDesc("y", "T", ("N", "n")),),
    attributes={"activation": "gelu_tanh"}, reference=bias_act_reference,
    doc="y = act(x + bias), act gelu_tanh or gelu (erf).")

EMBEDDING = OpSpec(
    "Embedding", "1",
    inputs=(TensorDesc("input_ids", "int32", ("N",)), TensorDesc("position_ids", "int32", ("N",)),
            TensorDesc("wte", "T", ("V", "h")), TensorDesc("wpe", "T", ("P", "h"))),
    outputs=(TensorDesc("x", "T", ("N", "h")),),
    attributes={}, reference=embedding_reference, doc="x = wte[input_ids] + wpe[position_ids].")

ATTENTION = OpSpec(
    "Attention", "1",
    inputs=(TensorDesc("qkv", "T", ("B", "T", "3h")), TensorDesc("kv_cache", "T", ("2", "Bm", "H", "S", "D")),
            TensorDesc("past_lengths", "int32", ("B",))),
    outputs=(TensorDesc("context", "T", ("B", "T", "h")), TensorDesc("kv_cache_out", "T", ("2", "Bm", "H", "S", "D"))),
    attributes={"num_heads": 0}, reference=attention_reference, aliases={"kv_cache_out": "kv_cache"},
    doc="Causal multi-head attention of T new tokens per sequence with the KV cache updated in place; "
        "qkv in Megatron [H, 3, D] order; scores and softmax in fp32.")

MOE = OpSpec(
    "MoE", "1",
    inputs=(TensorDesc("hidden", "T", ("N", "h")), TensorDesc("gate_weight", "float32", ("E", "h")),
            TensorDesc("fc1_weight", "T", ("E", "f", "h")), TensorDesc("fc1_bias", "T", ("E", "f")),
            TensorDesc("fc2_weight", "T", ("E", "h", "f")), TensorDesc("fc2_bias", "T", ("E", "h"))),
    outputs=(TensorDesc("out", "T", ("N", "h")),),
    attributes={"top_k": 1, "activation_kind": "gelu_tanh", "capacity_factor": 0.0, "min_capacity": 4},
    reference=moe_reference,
    doc="Top-k gated experts: gate softmax in fp32, routing and capacity as DeepSpeed (see models.gpt_moe.route).")

def all_reduce_reference(x, tp_size=1):
    """One rank's view: the sum over ranks is formed by the executor (``ReferenceExecutor`` with ranks)."""
    return np.asarray(x)


ALL_REDUCE = OpSpec(
    "AllReduce", "1",
    inputs=(TensorDesc("x", "T", ("...",)),), outputs=(TensorDesc("y", "T", ("...",)),),
    attributes={"tp_size": 1}, reference=all_reduce_reference,
    doc="y = sum of x over the tp_size tensor-parallel ranks (NCCL all-reduce on GPUs).")

SPECS: dict[str, OpSpec] = {s.op_type: s for s in (ADD_LAYERNORM, BIAS_ACT, EMBEDDING, ATTENTION, MOE, ALL_REDUCE)}
