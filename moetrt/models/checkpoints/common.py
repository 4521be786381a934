"""Pieces shared by the checkpoint formats: the reader interface, validation, dtype names, safe loading."""

from __future__ import annotations

import argparse
import ast
import pickle
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from moetrt.errors import CheckpointError
from moetrt.models.config import ModelConfig
from moetrt.models.weights import TensorSpec, spec_map, tensor_specs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Only these globals may appear in a .pt pickle (torch.load(weights_only=True) refuses any other):
# what Megatron-DeepSpeed stores beside tensors (its args, numpy RNG states).
SAFE_GLOBALS: list = [argparse.Namespace, np.ndarray, np.dtype,
                      np.dtypes.UInt32DType, np.dtypes.Float64DType, np.dtypes.Int64DType]
try:  # numpy >= 2 moved the reconstructor; allow whichever this numpy pickles with
    from numpy._core.multiarray import _reconstruct  # type: ignore
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import _reconstruct  # type: ignore
SAFE_GLOBALS.append(_reconstruct)

TensorGetter = Callable[[str], torch.Tensor]


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


def torch_load(path: Path) -> object:
    """``torch.load(weights_only=True, mmap=True)`` with Megatron's allow-list; errors name the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # legacy (non-zip) files cannot be mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to unpickle (only tensors and allow-listed types are "
                              f"loaded; nothing from a checkpoint is executed): {str(exc).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read (truncated or corrupt?): {str(exc).splitlines()[0]}") from None


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts to dotted keys: ``{'a': {'b': t}}`` -> ``{'a.b': t}``."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def parse_key_value_lines(text: str) -> dict[str, object]:
    """``key:value`` lines as Megatron prints its args; values as Python literals where they parse."""
    out: dict[str, object] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, _, raw = line.partition(":")
        raw = raw.strip()
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


def check_tensor(tensor: torch.Tensor, spec: TensorSpec, dtype: torch.dtype, where: str) -> torch.Tensor:
    if tuple(tensor.shape) != spec.shape:
        raise CheckpointError(f"{where}: tensor {spec.name} has shape {tuple(tensor.shape)}, expected {spec.shape}")
    expected = spec.dtype(dtype)
    if tensor.dtype != expected:
        raise CheckpointError(f"{where}: tensor {spec.name} has dtype {tensor.dtype}, expected {expected}")
    return tensor


class CheckpointReader:
    """Random access to a checkpoint's tensors under their canonical names (``moetrt.models.weights``).

    Subclasses set ``path``, ``config`` and ``dtype`` (the storage dtype; the MoE gate is float32 in
    every reader's output) and implement ``_read(name)``. ``get`` checks shape and dtype.
    """

    format: str = ""
    path: Path
    config: ModelConfig
    dtype: torch.dtype
    tensor_parallel: int = 1

    def names(self) -> list[str]:
        return [s.name for s in tensor_specs(self.config)]

    def get(self, name: str) -> torch.Tensor:
        specs = spec_map(self.config)
        if name not in specs:
            raise CheckpointError(f"{self.path}: model has no tensor {name!r}")
        tensor = self._read(name)
        if specs[name].fp32_always:
            tensor = tensor.float()
        return check_tensor(tensor, specs[name], self.dtype, str(self.path))

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def check_complete(self) -> None:
        """Raise on tensors the checkpoint has but the config does not expect (formats that can tell)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def unexpected(found: Iterable[str], expected: Iterable[str], where: str) -> None:
    extra = sorted(set(found) - set(expected))
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise CheckpointError(f"{where}: unexpected tensor(s) {', '.join(extra[:5])}{more}")
