"""``validate()``: polygraphy's Comparator between ONNX Runtime on the exported, un-lowered graph of the
engine's checkpoint and the engine itself, over a prefill and several decode steps."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from moetrt.errors import MoetrtError

# Logits are compared elementwise: fp32 engines only differ by summation order (measured ~5e-6 on the tiny
# preset); fp16 engines round every intermediate to 11 bits (relative 4.9e-4) over tens of layers.
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (1e-2, 5e-2), "bf16": (5e-2, 2e-1)}


def step_feeds(config, manifest, run_step, steps: int, seed: int = 0) -> list[dict]:
    """A prefill and ``steps`` decode feeds; each step's cache input is the previous step's output
    (as computed by ``run_step``), so every runner sees the same inputs."""
    rng = np.random.default_rng(seed)
    B = min(2, manifest.max_batch)
    T = max(1, min(5, manifest.max_seq - steps))
    shape = manifest.kv_cache_shape(all_heads=True)  # the exported graph holds every head
    caches = [np.zeros(shape, manifest.cache_numpy_dtype) for _ in range(config.num_layers)]
    ids, past = rng.integers(0, config.vocab_size, (B, T)), np.zeros(B, np.int64)
    feeds = []
    for _ in range(steps + 1):
        feed = {"input_ids": ids.astype(np.int32),
                "position_ids": (past[:, None] + np.arange(ids.shape[1])).astype(np.int32),
                "past_lengths": past.astype(np.int32)}
        feed.update({f"kv_cache_{l}": c for l, c in enumerate(caches)})
        feeds.append(feed)
        out = run_step(feed)
        caches = [out[f"kv_cache_{l}_out"] for l in range(config.num_layers)]
        past = past + ids.shape[1]
        ids = rng.integers(0, config.vocab_size, (B, 1))
    return feeds


def validate(engine_dir: str | Path, checkpoint: str | Path | None = None, steps: int = 3,
             rtol: float | None = None, atol: float | None = None, verbose: bool = True, device: str = "cpu") -> bool:
    """True when every output of every step is within tolerance; polygraphy prints the per-output report
    (``verbose=False`` keeps only its errors: unwritten cache slots are zero, which it warns about).
    ``device``: the engine runs on the CPU reference executor ("cpu"), the GPU runtime ("cuda"), or "auto"."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER
    try:
        from polygraphy.comparator import SimpleCompareFunc as simple_compare
    except ImportError:  # polygraphy < 0.53
        from polygraphy.comparator import CompareFunc
        simple_compare = CompareFunc.simple

    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.ERROR

    from moetrt.compiler.export import export_checkpoint
    from moetrt.engines.format import EngineManifest, checkpoint_fingerprint
    from moetrt.engines.polygraphy_runner import MoetrtRunner
    from moetrt.models.checkpoints import DTYPES

    manifest = EngineManifest.read(engine_dir)
    checkpoint = Path(checkpoint or manifest.checkpoint["path"])
    if not checkpoint.exists():
        raise MoetrtError(f"{checkpoint}: the engine's checkpoint is missing; pass --checkpoint")
    if checkpoint_fingerprint(checkpoint) != manifest.checkpoint["fingerprint"]:
        raise MoetrtError(f"{checkpoint}: not the checkpoint this engine was compiled from (fingerprint differs)")
    default_rtol, default_atol = TOLERANCES[manifest.dtype]
    with tempfile.TemporaryDirectory(prefix="moetrt-validate-") as tmp:
        exported = export_checkpoint(checkpoint, Path(tmp), DTYPES[manifest.dtype], manifest.max_batch,
                                     manifest.max_seq, last_token_logits=manifest.logits == "last")
        # the exported graph as written: ONNX Runtime's own fusions (e.g. LayerNormalization over an fp16
        # graph that normalises in fp32) would compare something else, and some reject mixed precisions
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(exported), options, providers=["CPUExecutionProvider"])
        onnxrt = OnnxrtRunner(session, name="onnxrt-exported")
        from moetrt.engines.runtime import gpu_available
        if device == "auto":
            device = "cuda" if gpu_available() else "cpu"
        engine = MoetrtRunner(engine_dir, device=device, name=f"moetrt-{device}")
        with onnxrt:
            feeds = step_feeds(manifest.config, manifest, onnxrt.infer, steps)
        results = Comparator.run([onnxrt, engine], data_loader=feeds)
        accuracy = Comparator.compare_accuracy(
            results, compare_func=simple_compare(rtol=rtol or default_rtol, atol=atol or default_atol))
    return bool(accuracy)
