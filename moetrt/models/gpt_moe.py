"""The torch reference ``GPTMoE``: the single numerical definition every later stage is tested against."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moetrt.errors import MoetrtError
from moetrt.generation import Streams
from moetrt.models.config import ModelConfig
from moetrt.models.sampling import SamplingParams, sample
from moetrt.models.weights import GATE_DTYPE


def activation_fn(name: str):
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu  # "gelu": the exact erf form


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm with float32 (or float64) statistics, rounded once to the input dtype."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.layer_norm(x.to(dt), norm.normalized_shape, norm.weight.to(dt), norm.bias.to(dt), norm.eps)
    return y.to(x.dtype)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int) -> int:
    """DeepSpeed's eval capacity: ``max(ceil(tokens / experts * (top_k * factor)), min_capacity)``.

    DeepSpeed forms the product in float32 (``capacity_factor`` is a float32 tensor there), so we do too.
    """
    product = np.float32(num_tokens / num_experts) * np.float32(top_k * capacity_factor)
    return max(int(math.ceil(product)), int(min_capacity))


def route(probs: torch.Tensor, top_k: int, capacity_factor: float = 0.0,
          min_capacity: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick experts for each token and their combine weights.

    ``probs [N, E]`` are the fp32 gate probabilities of N tokens in order. Returns
    ``experts [N, top_k]`` (int64) and ``weights [N, top_k]`` (same dtype as probs).
    top-1: the argmax and its probability. top-2: the two largest, renormalised to sum 1.
    With ``capacity_factor > 0`` each expert keeps at most ``expert_capacity(...)`` assignments,
    first come first served in token order, all first choices before any second choice
    (DeepSpeed's location-by-cumsum rule without random token selection); a dropped
    assignment gets weight 0, and for top-2 the weights are renormalised over what was kept.
    """
    num_tokens, num_experts = probs.shape
    top_probs, experts = torch.topk(probs, top_k, dim=-1)  # ties: lowest index first
    keep = torch.ones_like(top_probs, dtype=torch.bool)
    if capacity_factor > 0:
        capacity = expert_capacity(num_tokens, num_experts, top_k, capacity_factor, min_capacity)
        used = torch.zeros(num_experts, dtype=torch.int64, device=probs.device)
        for k in range(top_k):  # all first choices are placed before any second choice
            onehot = F.one_hot(experts[:, k], num_experts).to(torch.int64)
            location = torch.cumsum(onehot, dim=0) - 1 + used  # position in the expert's buffer
            keep[:, k] = (location * onehot).sum(-1) < capacity
            used = used + onehot.sum(0)
    weights = top_probs * keep
    if top_k > 1:
        denom = weights.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).eps)
        weights = weights / denom
    return experts, weights


class StackedLinear(nn.Module):
    """``num_experts`` Linear layers stored stacked: weight ``[E, out, in]``, bias ``[E, out]``."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, dtype, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(x, self.weight[expert], self.bias[expert])


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype, device=None):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_hidden_size, dtype=dtype, device=device)
        self.fc2 = nn.Linear(config.ffn_hidden_size, config.hidden_size, dtype=dtype, device=device)
        self.act = activation_fn(config.activation)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(m)))


class MoE(nn.Module):
    """Gate (fp32, no bias) + stacked experts; returns ``sum_k w_k * (W2[e_k] act(W1[e_k] m + b1) + b2)``."""

    def __init__(self, config: ModelConfig, dtype, device=None):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False, dtype=GATE_DTYPE, device=device)
        self.fc1 = StackedLinear(config.num_experts, config.hidden_size, config.ffn_hidden_size, dtype, device)
        self.fc2 = StackedLinear(config.num_experts, config.ffn_hidden_size, config.hidden_size, dtype, device)
        self.act = activation_fn(config.activation)

    def gate_probs(self, m: torch.Tensor) -> torch.Tensor:
        dt = torch.float64 if m.dtype == torch.float64 else torch.float32
        return torch.softmax(F.linear(m.to(dt), self.gate.weight.to(dt)), dim=-1)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        shape = m.shape
        tokens = m.reshape(-1, shape[-1])
        cfg = self.config
        experts, weights = route(self.gate_probs(tokens), cfg.top_k, cfg.moe_capacity_factor, cfg.moe_min_capacity)
        out = torch.zeros(tokens.shape, dtype=weights.dtype, device=tokens.device)
        for e in torch.unique(experts).tolist():
            rows, slot = torch.nonzero(experts == e, as_tuple=True)
            y = self.fc2(self.act(self.fc1(tokens[rows], e)), e)
            out.index_add_(0, rows, weights[rows, slot, None] * y.to(weights.dtype))
        return out.to(m.dtype).reshape(shape)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, dtype, device=None):
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(h, 3 * h, dtype=dtype, device=device)
        self.out = nn.Linear(h, h, dtype=dtype, device=device)

    def forward(self, a: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                slots: torch.Tensor, key_count: int) -> torch.Tensor:
        """``a [B, T, h]``; writes K/V of the T tokens into ``cache_[kv] [B, H, S, D]`` at ``slots [B, T]``,
        then attends each query to the cached keys at slots ``<=`` its own."""
        B, T, _ = a.shape
        qkv = self.qkv(a).view(B, T, self.num_heads, 3, self.head_dim)  # Megatron [heads, 3, head_dim]
        q, k, v = qkv.unbind(dim=3)  # each [B, T, H, D]
        rows = torch.arange(B, device=a.device)[:, None]
        cache_k[rows, :, slots] = k
        cache_v[rows, :, slots] = v
        keys, values = cache_k[:, :, :key_count], cache_v[:, :, :key_count]  # [B, H, S, D]
        dt = torch.float64 if a.dtype == torch.float64 else torch.float32
        scores = torch.einsum("bthd,bhsd->bhts", q.to(dt), keys.to(dt)) / math.sqrt(self.head_dim)
        visible = torch.arange(key_count, device=a.device)[None, None, :] <= slots[:, :, None]  # [B, T, S]
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.einsum("bhts,bhsd->bthd", probs, values.to(dt)).to(a.dtype)
        return self.out(ctx.reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype, device=None):
        super().__init__()
        eps = config.layernorm_eps
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype, device=device)
        self.attn = Attention(config, dtype, device)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype, device=device)
        if config.is_moe_layer(layer):
            self.moe = MoE(config, dtype, device)
        else:
            self.mlp = MLP(config, dtype, device)

    def forward(self, x, cache_k, cache_v, slots, key_count):
        x = x + self.attn(layer_norm(x, self.ln1), cache_k, cache_v, slots, key_count)
        m = layer_norm(x, self.ln2)
        return x + (self.moe(m) if hasattr(self, "moe") else self.mlp(m))


class KVCache:
    """Static K/V buffers, one pair per layer, each ``[max_batch, heads, max_seq, head_dim]``.

    Row b holds sequence b; slot s holds the token at position s of that sequence. ``select``
    gives a view of some rows (writes go through), so sequences can be prefilled one by one.
    """

    def __init__(self, config: ModelConfig, max_batch: int, max_seq: int, dtype=torch.float32, device=None):
        shape = (max_batch, config.num_heads, max_seq, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @property
    def max_batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq(self) -> int:
        return self.k[0].shape[2]

    def select(self, start: int, stop: int) -> "KVCache":
        view = KVCache.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        return view


class GPTMoE(nn.Module):
    """GPT-style decoder with Mixture-of-Experts MLPs (Megatron-DeepSpeed GPT-MoE semantics).

    For token ids ``ids`` at positions ``pos`` (h = hidden, H heads of D = h/H channels)::

        x = wte[ids] + wpe[pos]
        for each layer l:
            a = LN1(x)
            qkv = a·Wqkvᵀ + bqkv                      # 3h outputs laid out [H, 3, D] (Megatron)
            attn = softmax(q·kᵀ/√D + causal mask)·v   # scores and softmax in fp32
            x += attn·Woᵀ + bo
            m = LN2(x)
            dense layer: x += W2·act(W1·m + b1) + b2
            MoE layer:   p = softmax(m·Wgᵀ)            # fp32, Wg kept fp32, no bias
                         top-1: e = argmax p; x += p[e]·(W2[e]·act(W1[e]·m + b1[e]) + b2[e])
                         top-2: the two largest p, renormalised to sum 1, each expert weighted so
        logits = LNf(x)·wteᵀ                          # tied head (lm_head when untied)

    LayerNorms use fp32 statistics; ``act`` is tanh-GeLU (``gelu_tanh``) or erf-GeLU (``gelu``).
    With ``moe_capacity_factor > 0`` routing drops assignments over capacity (see ``route``);
    capacity depends on the number of tokens in the call, so incremental decoding then differs
    from a full forward, exactly as in DeepSpeed. Note: DeepSpeed's ``Experts`` discards the
    bias an expert returns separately when ``skip_bias_add`` is set; here ``b2[e]`` is applied
    inside the expert, as the checkpoint's ``dense_4h_to_h.bias`` says.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Block(config, i, dtype, device) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps, dtype=dtype, device=device)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)

    def head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def _check_ids(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        cfg = self.config
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
            raise MoetrtError(f"input_ids: token id out of range [0, {cfg.vocab_size}): "
                              f"min {int(input_ids.min())}, max {int(input_ids.max())}")
        if position_ids.numel() and (position_ids.min() < 0 or position_ids.max() >= cfg.max_position_embeddings):
            raise MoetrtError(f"position_ids: position out of range [0, {cfg.max_position_embeddings}): "
                              f"max {int(position_ids.max())}")

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, past_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]`` for ``input_ids [B, T]``.

        Without ``kv_cache``: a plain causal forward over the T tokens. With it: sequence b has
        ``past_lengths[b]`` tokens cached (default 0); the new tokens go to slots
        ``past_lengths[b] + t`` and see every cached token before them.
        """
        if input_ids.dim() != 2:
            raise MoetrtError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.long()
        B, T = input_ids.shape
        if kv_cache is None:
            if past_lengths is not None and int(torch.as_tensor(past_lengths).max()) > 0:
                raise MoetrtError("past_lengths > 0 needs a kv_cache")
            kv_cache = KVCache(self.config, B, T, self.dtype, input_ids.device)
        if B > kv_cache.max_batch:
            raise MoetrtError(f"batch {B} exceeds the KV cache's max_batch {kv_cache.max_batch}")
        dev = input_ids.device
        past = (torch.zeros(B, dtype=torch.long) if past_lengths is None else torch.as_tensor(past_lengths).long()).to(dev)
        if past.shape != (B,):
            raise MoetrtError(f"past_lengths must have shape [{B}], got {tuple(past.shape)}")
        slots = past[:, None] + torch.arange(T, device=dev)[None, :]
        key_count = int(past.max()) + T if B else T
        if key_count > kv_cache.max_seq:
            raise MoetrtError(f"sequence length {key_count} exceeds the KV cache's max_seq {kv_cache.max_seq}")
        position_ids = slots if position_ids is None else position_ids.long()
        self._check_ids(input_ids, position_ids)

        x = self.wte(input_ids) + self.wpe(position_ids)
        for i, block in enumerate(self.layers):
            x = block(x, kv_cache.k[i][:B], kv_cache.v[i][:B], slots, key_count)
        x = layer_norm(x, self.ln_f)
        return F.linear(x, self.head_weight())

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams | None = None, stop_tokens: Sequence[int] = (),
                 callback=None) -> list[list[int]]:
        """Continue each prompt by up to ``max_new_tokens`` tokens; returns the new tokens per prompt.

        Prompts may differ in length: each is prefilled into its own cache row, then all decode
        together. A sequence ends after emitting a token in ``stop_tokens`` (which is kept).
        ``callback(step, tokens)`` is called with the list of tokens sampled at each step
        (``None`` for sequences already finished).
        """
        sampling = sampling or SamplingParams()
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise MoetrtError("generate: every prompt needs at least one token")
        total = max(len(p) for p in prompts) + max_new_tokens
        if total > self.config.max_position_embeddings:
            raise MoetrtError(f"generate: prompt + max_new_tokens = {total} exceeds "
                              f"max_position_embeddings {self.config.max_position_embeddings}")
        generator = sampling.generator()
        B = len(prompts)
        dev = self.wte.weight.device
        cache = KVCache(self.config, B, total, self.dtype, dev)
        last = torch.empty(B, self.config.vocab_size, dtype=torch.float32)
        for b, p in enumerate(prompts):
            last[b] = self(torch.tensor([p], device=dev), kv_cache=cache.select(b, b + 1))[0, -1].float().cpu()
        lengths = torch.tensor([len(p) for p in prompts])
        streams = Streams(B, stop_tokens, callback)
        for step in range(max_new_tokens):
            tokens = sample(last, sampling, generator)
            if streams.emit(step, tokens.tolist()) or step == max_new_tokens - 1:
                break
            last = self(tokens[:, None].to(dev), kv_cache=cache, past_lengths=lengths)[:, -1].float().cpu()
            lengths = lengths + 1
        return streams.outputs
