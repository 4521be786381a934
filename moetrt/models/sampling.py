"""Token sampling for the reference model: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moetrt.errors import MoetrtError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy (argmax). ``top_k`` 0 and ``top_p`` 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise MoetrtError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MoetrtError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MoetrtError(f"top_p must be in (0, 1], got {self.top_p}")

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(0 if self.seed is None else int(self.seed))
        return g


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (nucleus: the smallest set of most
    likely tokens whose mass reaches top_p) for ``logits [B, V]``."""
    scaled = logits.float() / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` (int64 ``[B]``)."""
    if params.temperature == 0:
        return torch.argmax(logits, dim=-1)
    return torch.multinomial(filtered_probs(logits, params), 1, generator=generator)[:, 0]
