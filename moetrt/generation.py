"""Bookkeeping shared by the generate loops of the torch reference model and the runtimes (torch-free)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence


class Streams:
    """Each sequence's new tokens; a sequence ends after a stop token (kept); ``callback(step, tokens)`` gets
    the step's tokens, ``None`` for sequences already finished."""

    def __init__(self, batch: int, stop_tokens: Iterable[int] = (), callback: Callable[[int, list], None] | None = None):
        self.outputs: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch
        self.stops = set(map(int, stop_tokens))
        self.callback = callback

    def emit(self, step: int, tokens: Sequence[int]) -> bool:
        """Record one step; True when every sequence has finished."""
        emitted = []
        for b, t in enumerate(int(t) for t in tokens):
            if self.done[b]:
                emitted.append(None)
                continue
            self.outputs[b].append(t)
            emitted.append(t)
            self.done[b] = t in self.stops
        if self.callback is not None:
            self.callback(step, emitted)
        return all(self.done)
