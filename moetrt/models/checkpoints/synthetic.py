"""Random GPT-MoE weights for tests, demos and benchmarks, generated tensor by tensor.

Each tensor comes from its own generator seeded by (seed, name), so any tensor can be produced
alone, in any order, and a 12.9 GB model never has to exist in memory at once. Scales are chosen for
behaviour, not training: Linear weights (and the gate) have unit gain (std 1/sqrt(fan_in)), so each
layer visibly changes the residual stream, gate logits have unit spread and routing is spread over
the experts; token embeddings (std 0.3, tied to the head) stay small beside the layers' output,
so greedy generation depends on the context instead of copying the last token. Values are rounded
to the storage dtype (the fp32 gate too, so that a FasterTransformer fp16 checkpoint, which stores the gate in fp16, round-trips exactly).
"""

from __future__ import annotations

import math
import zlib

import torch

from moetrt.models.config import ModelConfig
from moetrt.models.weights import spec_map


def synthetic_tensor(config: ModelConfig, name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    spec = spec_map(config)[name]
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    fan_in = spec.shape[-1]
    if name == "wte.weight":
        std = 0.3
    elif name == "wpe.weight":
        std = 0.1
    elif name.endswith("bias"):
        std = 0.05
    else:  # Linear weights and the gate: unit gain, so every layer visibly changes the residual
        std = 1.0 / math.sqrt(fan_in)
    t = torch.randn(spec.shape, generator=gen, dtype=torch.float32)
    if ".ln" in name or name.startswith("ln_f"):  # LayerNorm: weight around 1, bias small
        t = (1.0 + 0.1 * t) if name.endswith("weight") else 0.05 * t
    else:
        t.mul_(std)
    t = t.to(dtype)
    return t.float() if spec.fp32_always else t
