"""``Runtime``: run an engine directory. ``device="cuda"`` is the GPU runtime (``cuda_runtime.CudaRuntime``:
our kernels and cuBLASLt, CUDA graphs, sampling on the GPU); ``device="cpu"`` evaluates each rank's lowered
graph with the CPU reference executor (validation speed, exact to the plugin specs); ``device="auto"`` takes
the GPU when one is usable.

Ragged prompts are prefilled together, right-padded: the padding of a shorter prompt lands in cache slots
that its own decode steps overwrite before any query may see them (the causal mask hides slots beyond each
query's position), so a sequence never attends to padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from moetrt.engines.format import EngineManifest
from moetrt.engines.sampling import check_params, sample
from moetrt.errors import MoetrtError
from moetrt.generation import Streams

DEVICES = ("cpu", "cuda", "auto")


def check_input_ids(manifest: EngineManifest, ids: np.ndarray, past: np.ndarray | None = None) -> None:
    """Refuse a step's token ids the engine cannot take: shape, batch, sequence length, id range."""
    c = manifest.config
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise MoetrtError(f"input_ids must be [batch, tokens] with tokens >= 1, got shape {ids.shape}")
    if ids.shape[0] > manifest.max_batch:
        raise MoetrtError(f"batch {ids.shape[0]} exceeds the engine's max batch {manifest.max_batch}")
    longest = ids.shape[1] + (0 if past is None else int(past.max()))
    if longest > manifest.max_seq:
        raise MoetrtError(f"sequence length {longest} exceeds the engine's max sequence {manifest.max_seq}")
    if ids.min() < 0 or ids.max() >= c.vocab_size:
        raise MoetrtError(f"token id out of range [0, {c.vocab_size}): min {ids.min()}, max {ids.max()}")


def pad_prompts(manifest: EngineManifest, prompts, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths, checked and right-padded: (ids [B, longest] int64, lengths [B] int32)."""
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise MoetrtError("generate: every prompt needs at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded = np.zeros((len(prompts), lengths.max()), np.int64)
    for b, p in enumerate(prompts):
        padded[b, :len(p)] = p
    check_input_ids(manifest, padded)
    if lengths.max() + max_new_tokens > manifest.max_seq:
        raise MoetrtError(f"prompt ({lengths.max()}) + max_new_tokens ({max_new_tokens}) exceeds the engine's "
                          f"max sequence {manifest.max_seq}")
    return padded, lengths


class Closing:
    """``with`` support and clean-up at collection for runtimes with a ``close()``."""

    def close(self) -> None:
        """Nothing to free (the CPU runtime); the GPU runtimes free their memory and processes."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def gpu_available() -> bool:
    try:
        from moetrt.engines.cuda import device_count
        return device_count() > 0
    except MoetrtError:
        return False


class Runtime(Closing):
    """``Runtime(engine_dir, device)``: for ``device="cuda"`` (or ``"auto"`` with a GPU) this constructs and
    returns a ``CudaRuntime`` (or, for a tensor-parallel engine, a ``distributed.TPRuntime`` driving one
    process per GPU), which have the same ``logits``/``generate``/``run`` API (and ``close``)."""

    def __new__(cls, engine_dir: str | Path, device: str = "cpu", **options):
        if device not in DEVICES:
            raise MoetrtError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if device == "cuda" or (device == "auto" and gpu_available()):
            manifest = EngineManifest.read(Path(engine_dir))
            if manifest.tensor_parallel > 1:  # one process per GPU
                from moetrt.engines.distributed import TPRuntime
                return TPRuntime(engine_dir, manifest, **options)
            from moetrt.engines.cuda_runtime import CudaRuntime
            return CudaRuntime(engine_dir, manifest, **options)
        return super().__new__(cls)

    def __init__(self, engine_dir: str | Path, device: str = "cpu", **options):
        if options:
            raise MoetrtError(f"options {sorted(options)} apply to the GPU runtime only")
        self.engine_dir = Path(engine_dir)
        self.manifest = EngineManifest.read(self.engine_dir)
        self.config = self.manifest.config
        from moetrt.engines.reference import ShardedReferenceExecutor
        self.tp = self.manifest.tensor_parallel
        self.executor = ShardedReferenceExecutor(
            [self.engine_dir / f"rank{r}" / "model.onnx" for r in range(self.tp)])
        self.cache_dtype = self.manifest.cache_numpy_dtype

    # -- one step ----------------------------------------------------------------------------------------
    def new_cache(self) -> list[np.ndarray]:
        """The whole model's cache (each tensor-parallel rank holds its own heads' slice; ``run`` splits and
        merges)."""
        return self.manifest.new_cache()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One execution of the step graph on unsharded feeds (caches split over the ranks' heads)."""
        per_rank = [dict(feeds) for _ in range(self.tp)]
        for name, value in feeds.items():
            if name.startswith("kv_cache_"):
                for r, part in enumerate(np.split(value, self.tp, axis=2)):
                    per_rank[r][name] = np.ascontiguousarray(part)
        outs = self.executor.run(per_rank)
        merged = dict(outs[0])
        for name in merged:
            if name.startswith("kv_cache_"):
                merged[name] = np.concatenate([o[name] for o in outs], axis=2)
        return merged

    def step(self, input_ids: np.ndarray, past_lengths: np.ndarray, cache: list[np.ndarray]):
        """One graph execution; returns (logits, new cache)."""
        ids = np.asarray(input_ids, dtype=np.int32)
        past = np.asarray(past_lengths, dtype=np.int32)
        feeds = {"input_ids": ids, "position_ids": (past[:, None] + np.arange(ids.shape[1])).astype(np.int32),
                 "past_lengths": past}
        feeds.update({f"kv_cache_{l}": c for l, c in enumerate(cache)})
        out = self.run(feeds)
        return out["logits"], [out[f"kv_cache_{l}_out"] for l in range(self.config.num_layers)]

    # -- public API --------------------------------------------------------------------------------------
    def logits(self, input_ids) -> np.ndarray:
        """Logits ``[B, T, V]`` of every position of a prefill (engines compiled with ``--logits all``)."""
        if self.manifest.logits != "all":
            raise MoetrtError("logits(): this engine returns only each sequence's last logits; compile with --logits all")
        ids = np.asarray(input_ids)
        check_input_ids(self.manifest, ids)
        logits, _ = self.step(ids, np.zeros(ids.shape[0], np.int32), self.new_cache())
        return logits.astype(np.float32)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] = (),
                 callback: Callable[[int, list], None] | None = None) -> list[list[int]]:
        """New tokens for each prompt (a stop token ends its sequence and is kept)."""
        check_params(temperature, top_k, top_p)
        if self.manifest.logits != "all":  # right-padded prompts: a last-token engine returns the pads' logits
            raise MoetrtError("generate on the CPU runtime needs an engine compiled with --logits all")
        padded, lengths = pad_prompts(self.manifest, prompts, max_new_tokens)
        rng = np.random.default_rng(seed)
        logits, cache = self.step(padded, np.zeros(len(prompts), np.int32), self.new_cache())
        last = logits[np.arange(len(prompts)), lengths - 1]
        streams = Streams(len(prompts), stop_tokens, callback)
        past = lengths.copy()
        for step in range(max_new_tokens):
            tokens = sample(last, temperature, top_k, top_p, rng)
            if streams.emit(step, tokens.tolist()) or step == max_new_tokens - 1:
                break
            logits, cache = self.step(tokens[:, None], past, cache)
            last = logits[:, -1]
            past = past + 1
        return streams.outputs
