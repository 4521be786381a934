"""Token sampling for the runtimes, in numpy (the runtime does not import torch): greedy, temperature,
top-k, top-p, seeded. Same filters as ``moetrt.models.sampling``; the random stream differs from torch's."""

from __future__ import annotations

import numpy as np

from moetrt.errors import MoetrtError


def check_params(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise MoetrtError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise MoetrtError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise MoetrtError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """One token id per row of ``logits [B, V]``."""
    logits = logits.astype(np.float64)
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = np.sort(scaled, axis=-1)[:, -top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p
        sorted_p = np.where(before >= top_p, 0.0, sorted_p)
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, sorted_p, -1)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])
