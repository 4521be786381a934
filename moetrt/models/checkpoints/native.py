"""moetrt's native checkpoint: ``config.json`` (a ``ModelConfig``) + safetensors shards.

Shards hold the embeddings (with the final norm and head) and one transformer layer each, so
no shard is larger than a layer; ``model.safetensors.index.json`` maps each tensor to its shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moetrt.errors import CheckpointError, ConfigError
from moetrt.models.checkpoints.common import CheckpointReader, TensorGetter, unexpected
from moetrt.models.config import ModelConfig
from moetrt.models.weights import layer_tensor_specs, tensor_specs

FORMAT = "moetrt"
INDEX = "model.safetensors.index.json"


def is_native(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / INDEX).is_file() or any(path.glob("*.safetensors")))


def _shard_groups(config: ModelConfig) -> list[list[str]]:
    layers = [[s.name for s in layer_tensor_specs(config, i)] for i in range(config.num_layers)]
    in_layers = {n for group in layers for n in group}
    outer = [s.name for s in tensor_specs(config) if s.name not in in_layers]
    return [outer] + layers


def write(out: Path, config: ModelConfig, get: TensorGetter, dtype: torch.dtype, tp: int = 1,
          progress=None) -> None:
    if tp != 1:
        raise CheckpointError("--tp applies to the fastertransformer format only; moetrt checkpoints are unsharded")
    out.mkdir(parents=True, exist_ok=True)
    config.to_json(out / "config.json")
    groups = _shard_groups(config)
    weight_map = {}
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            t = get(name)
            tensors[name] = (t if name.endswith("gate.weight") else t.to(dtype)).contiguous()
            weight_map[name] = shard
            if progress is not None:
                progress.update(1)
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        del tensors
    (out / INDEX).write_text(json.dumps({"metadata": {"format": FORMAT}, "weight_map": weight_map}, indent=1))


class NativeReader(CheckpointReader):
    format = FORMAT

    def __init__(self, path: Path, overrides: dict | None = None):
        self.path = path
        try:
            data = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
        data.update(overrides or {})
        try:
            self.config = ModelConfig.from_dict(data, source=str(path / "config.json"))
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
        if (path / INDEX).is_file():
            self.weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        else:
            self.weight_map = {}
            for shard in sorted(path.glob("*.safetensors")):
                with self._open(shard.name) as f:
                    self.weight_map.update({k: shard.name for k in f.keys()})
        unexpected(self.weight_map, self.names(), str(path))
        missing = [n for n in self.names() if n not in self.weight_map]
        if missing:
            raise CheckpointError(f"{path}: missing tensor {missing[0]}" +
                                  (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.dtype = self._read("wte.weight").dtype

    def _open(self, shard: str):
        file = self.path / shard
        if not file.is_file():
            raise CheckpointError(f"{file}: missing shard file")
        try:
            return safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors (truncated or corrupt?): {exc}") from None

    def _read(self, name: str) -> torch.Tensor:
        shard = self.weight_map[name]
        with self._open(shard) as f:
            if name not in f.keys():
                raise CheckpointError(f"{self.path / shard}: missing tensor {name}")
            try:
                return f.get_tensor(name)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{self.path / shard}: tensor {name} unreadable: {exc}") from None
