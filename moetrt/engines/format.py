"""The engine directory: ``engine.json`` + ``rank{r}/model.onnx`` (+ ``rank{r}/weights.bin``, ONNX external data).

The manifest is the one home of what a runtime needs to know: model config, dtype, limits, tensor-parallel
size, plugin ABI, bindings and the KV-cache layout, build options, and a fingerprint of the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moetrt.errors import MoetrtError
from moetrt.models.config import ModelConfig
from moetrt.plugins.abi import PLUGIN_ABI_VERSION

SCHEMA_VERSION = 1
MANIFEST = "engine.json"


@dataclass
class EngineManifest:
    model: dict
    dtype: str
    max_batch: int
    max_seq: int
    tensor_parallel: int
    logits: str                     # "all" positions, or each sequence's "last"
    checkpoint: dict                # path, format, fingerprint
    build_options: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    plugin_abi_version: int = PLUGIN_ABI_VERSION

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model, source=MANIFEST)

    def kv_cache_shape(self, all_heads: bool = False) -> list[int]:
        """One layer's cache on one rank (its heads only), or with ``all_heads`` the whole model's."""
        c = self.config
        heads = c.num_heads if all_heads else c.num_heads // self.tensor_parallel
        return [2, self.max_batch, heads, self.max_seq, c.head_dim]

    @property
    def cache_numpy_dtype(self):
        """numpy dtype of the cache as the CPU executors hold it (numpy has no bfloat16)."""
        import numpy as np
        return np.float16 if self.dtype == "fp16" else np.float32

    def new_cache(self) -> list:
        """The whole model's KV cache on the host, one zeroed ``kv_cache_shape(all_heads=True)`` array per layer."""
        import numpy as np
        shape = self.kv_cache_shape(all_heads=True)
        return [np.zeros(shape, self.cache_numpy_dtype) for _ in range(self.config.num_layers)]

    def bindings(self) -> dict:
        c = self.config
        kv = {"shape": self.kv_cache_shape(), "dtype": self.dtype,
              "layout": "[K|V, batch row, head, slot, channel]; output kv_cache_{l}_out aliases input kv_cache_{l}"}
        return {"inputs": {"input_ids": "[batch, tokens] int32", "position_ids": "[batch, tokens] int32",
                           "past_lengths": "[batch] int32",
                           **{f"kv_cache_{l}": kv for l in range(c.num_layers)}},
                "outputs": {"logits": f"[batch, {'tokens' if self.logits == 'all' else 1}, {c.vocab_size}]",
                            **{f"kv_cache_{l}_out": kv for l in range(c.num_layers)}}}

    def write(self, engine_dir: Path) -> None:
        data = asdict(self) | {"bindings": self.bindings()}
        (engine_dir / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def read(cls, engine_dir: str | Path) -> "EngineManifest":
        path = Path(engine_dir) / MANIFEST
        if not path.is_file():
            raise MoetrtError(f"{path}: missing: {engine_dir} is not an engine directory (build one with moetrt compile)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise MoetrtError(f"{path}: not valid JSON ({exc})") from None
        if data.get("schema_version") != SCHEMA_VERSION:
            raise MoetrtError(f"{path}: engine schema version {data.get('schema_version')}, this moetrt reads "
                              f"{SCHEMA_VERSION}; recompile the engine")
        if data.get("plugin_abi_version") != PLUGIN_ABI_VERSION:
            raise MoetrtError(f"{path}: built for plugin ABI {data.get('plugin_abi_version')}, this moetrt has "
                              f"{PLUGIN_ABI_VERSION}; recompile the engine")
        data.pop("bindings", None)
        try:
            manifest = cls(**data)
        except TypeError as exc:
            raise MoetrtError(f"{path}: malformed manifest ({exc})") from None
        for r in range(manifest.tensor_parallel):
            if not (Path(engine_dir) / f"rank{r}" / "model.onnx").is_file():
                raise MoetrtError(f"{Path(engine_dir) / f'rank{r}' / 'model.onnx'}: missing rank graph")
        return manifest


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 over each file's relative name, size, first and last MiB: cheap on 13 GB, and changes when
    any file is replaced, truncated or re-written with other weights at its ends."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root)}:{size}".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), 2)
                digest.update(f.read())
    return digest.hexdigest()
