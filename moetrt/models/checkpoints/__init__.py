"""Checkpoint formats: detect, read (streaming, by tensor), write, convert, synthesize.

Formats: ``megatron-deepspeed`` (``mp_rank_00_model_states.pt`` + per-expert files),
``fastertransformer`` (``config.ini`` + raw ``.bin`` per tensor and rank), ``moetrt``
(``config.json`` + safetensors). Readers give tensors under the canonical names of
``moetrt.models.weights``; writers pull tensors one at a time from a getter.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from moetrt.errors import CheckpointError
from moetrt.models.checkpoints import fastertransformer, megatron, native
from moetrt.models.checkpoints.common import DTYPE_NAMES, DTYPES, CheckpointReader, parse_dtype
from moetrt.models.checkpoints.synthetic import synthetic_tensor
from moetrt.models.config import ModelConfig
from moetrt.models.weights import tensor_specs

_READERS: dict[str, type[CheckpointReader]] = {
    megatron.FORMAT: megatron.MegatronReader,
    fastertransformer.FORMAT: fastertransformer.FasterTransformerReader,
    native.FORMAT: native.NativeReader,
}
_WRITERS: dict[str, Callable] = {
    megatron.FORMAT: megatron.write, fastertransformer.FORMAT: fastertransformer.write, native.FORMAT: native.write,
}
_DETECT = [(native.FORMAT, native.is_native), (fastertransformer.FORMAT, fastertransformer.is_fastertransformer),
           (megatron.FORMAT, megatron.is_megatron)]
FORMATS = tuple(_READERS)

__all__ = ["FORMATS", "DTYPES", "DTYPE_NAMES", "CheckpointReader", "convert", "detect_format", "init_checkpoint",
           "open_checkpoint", "parse_dtype", "synthetic_tensor", "write_checkpoint"]


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a folder, this is a file")
    for fmt, test in _DETECT:
        if test(path):
            return fmt
    raise CheckpointError(
        f"{path}: not a recognised checkpoint (expected config.json + *.safetensors, config.ini + *.bin, "
        f"or {megatron.MODEL_FILE})")


def open_checkpoint(path: str | Path, overrides: dict | None = None) -> CheckpointReader:
    """A reader for the checkpoint at ``path``; ``overrides`` replace ModelConfig fields."""
    path = Path(path)
    return _READERS[detect_format(path)](path, overrides)


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise CheckpointError(f"{out}: already exists and is not empty (use --force to replace it)")
        shutil.rmtree(out) if out.is_dir() else out.unlink()


def write_checkpoint(out: str | Path, fmt: str, config: ModelConfig, get: Callable[[str], torch.Tensor],
                     dtype: torch.dtype = torch.float16, tp: int = 1, progress: bool = False,
                     force: bool = False) -> Path:
    """Write ``config`` with tensors from ``get(name)`` in format ``fmt``; returns the folder."""
    if fmt not in _WRITERS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    _prepare_out(out, force)
    specs = tensor_specs(config)
    with tqdm(total=len(specs), desc=f"writing {fmt}", unit="tensor", disable=not progress) as bar:
        try:
            _WRITERS[fmt](out, config, get, dtype, tp, bar)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)  # never leave a half-written checkpoint behind
            raise
    return out


def init_checkpoint(out: str | Path, config: ModelConfig, fmt: str = native.FORMAT,
                    dtype: torch.dtype = torch.float16, tp: int = 1, seed: int = 0, progress: bool = False,
                    force: bool = False) -> Path:
    """A checkpoint of random weights (see ``synthetic``)."""
    return write_checkpoint(out, fmt, config, lambda name: synthetic_tensor(config, name, seed, dtype),
                            dtype, tp, progress, force)


def convert(src: str | Path, dst: str | Path, fmt: str, tp: int = 1, dtype: torch.dtype | None = None,
            progress: bool = False, force: bool = False) -> Path:
    """Re-write the checkpoint at ``src`` in format ``fmt`` (dtype kept unless given)."""
    if Path(src).resolve() == Path(dst).resolve():
        raise CheckpointError(f"{dst}: destination is the source checkpoint")
    with open_checkpoint(src) as reader:
        return write_checkpoint(dst, fmt, reader.config, reader.get, dtype or reader.dtype, tp, progress, force)
