"""``compile()``: checkpoint -> exported step graph -> lowering passes -> (sharding) -> engine directory."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import onnx
import torch

from moetrt.compiler.export import export_checkpoint
from moetrt.engines.format import EngineManifest, checkpoint_fingerprint
from moetrt.errors import MoetrtError
from moetrt.models.checkpoints import DTYPES, open_checkpoint
from moetrt.passes import PIPELINE, PassManager

log = logging.getLogger("moetrt.compile")


def compile(checkpoint: str | Path, out_dir: str | Path, tp: int = 1, dtype: str = "fp16", max_batch: int = 8,
            max_seq: int | None = None, logits: str = "all", dump_after: str | None = None, force: bool = False,
            progress: bool = False) -> Path:
    """Build the engine directory for ``checkpoint``; returns its path."""
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise MoetrtError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if logits not in ("all", "last"):
        raise MoetrtError(f"--logits: expected 'all' or 'last', got {logits!r}")
    if max_batch < 1:
        raise MoetrtError(f"--max-batch must be >= 1, got {max_batch}")
    with open_checkpoint(checkpoint) as reader:
        config, fmt = reader.config, reader.format
    max_seq = max_seq or config.max_position_embeddings
    if not 1 <= max_seq <= config.max_position_embeddings:
        raise MoetrtError(f"--max-seq must be in 1..{config.max_position_embeddings} (the model's positions), got {max_seq}")
    if tp < 1 or config.num_heads % tp or config.ffn_hidden_size % tp:
        raise MoetrtError(f"--tp {tp}: must divide num_heads ({config.num_heads}) and ffn_hidden_size "
                          f"({config.ffn_hidden_size})")
    if tp > 1:
        raise MoetrtError("--tp > 1: tensor-parallel sharding is not implemented yet (compile with --tp 1)")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise MoetrtError(f"{out_dir}: already exists and is not empty (use --force to replace it)")
        shutil.rmtree(out_dir)
    start = time.perf_counter()
    rank_dir = out_dir / "rank0"
    try:
        say = print if progress else log.info
        say(f"[1/3] exporting the step graph ({config.num_layers} layers, {dtype}, max batch {max_batch}, "
            f"max seq {max_seq})")
        exported = export_checkpoint(checkpoint, rank_dir, DTYPES[dtype], max_batch, max_seq,
                                     last_token_logits=logits == "last", progress=progress)
        say(f"[2/3] lowering: {', '.join(p.name for p in PIPELINE)}")
        manager = PassManager(PIPELINE, dump_after, out_dir / "dumps")
        lowered = manager.run(onnx.load(str(exported), load_external_data=False), base_dir=rank_dir)
        onnx.save(lowered, str(exported))  # weights stay in rank0/weights.bin, referenced by name
        say("[3/3] writing the manifest")
        EngineManifest(model=config.to_dict(), dtype=dtype, max_batch=max_batch, max_seq=max_seq,
                       tensor_parallel=tp, logits=logits,
                       checkpoint={"path": str(Path(checkpoint).resolve()), "format": fmt,
                                   "fingerprint": checkpoint_fingerprint(checkpoint)},
                       build_options={"passes": [p.name for p in PIPELINE], "opset": 17,
                                      "seconds": round(time.perf_counter() - start, 1)}).write(out_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir
