"""FasterTransformer GPT-MoE "c-model" checkpoints: ``config.ini`` + one raw little-endian file per tensor.

The layout follows FasterTransformer's ``examples/pytorch/gpt/utils/megatron_gpt_moe_ckpt_convert.py``
(NVIDIA/FasterTransformer, release 5.3):

- every 2-D Linear weight is stored transposed, ``[in, out]``; the MoE gate ``wg`` too, as ``[h, E]``,
  in the checkpoint's weight dtype like every other tensor;
- ``attention.query_key_value.weight`` is ``[h, 3, h/tp]`` per rank: Megatron's ``[heads, 3, head_dim]``
  output order regrouped to ``[3, heads, head_dim]``, then split over heads; its bias is ``[3, h/tp]``;
- column-parallel tensors (QKV, ``dense_h_to_4h`` weight and bias) are split along their output
  dimension, row-parallel weights (``attention.dense``, ``dense_4h_to_h``) along their input
  dimension, into ``<name>.<rank>.bin``; biases added after a row-parallel product, LayerNorms, the
  gate, ``wte``/``wpe`` are stored once as ``<name>.bin``;
- experts are stacked per layer: ``mlp.moe.experts.dense_h_to_4h.weight`` ``[E, h, f/tp]`` (split on
  f), its bias ``[E, f/tp]``, ``dense_4h_to_h.weight`` ``[E, f/tp, h]``, and ``dense_4h_to_h.bias``
  ``[E, h]`` unsplit.

``config.ini`` has the converter's ``[gpt]`` and ``[structure]`` sections; what FasterTransformer
leaves to run time (top_k, activation, capacity) goes in a ``[moetrt]`` section, with defaults
(top-1, tanh-GeLU, no dropping) when it is absent.
"""

from __future__ import annotations

import ast
import configparser
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moetrt.errors import CheckpointError, ConfigError
from moetrt.models.checkpoints.common import DTYPE_NAMES, DTYPES, CheckpointReader, TensorGetter
from moetrt.models.config import ModelConfig
from moetrt.models.weights import spec_map, tensor_specs

FORMAT = "fastertransformer"
CONFIG_FILE = "config.ini"
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Entry:
    file: str                                   # FT name without ".bin" / ".<rank>.bin"
    to_ft: Callable[[torch.Tensor], torch.Tensor]
    from_ft: Callable[[torch.Tensor], torch.Tensor]
    split_axis: int | None = None               # None: stored once


def entries(config: ModelConfig) -> dict[str, Entry]:
    """Canonical tensor name -> how FasterTransformer stores it."""
    h, H, D = config.hidden_size, config.num_heads, config.head_dim
    qkv_w = Entry("", lambda w: _t(w).reshape(h, H, 3, D).permute(0, 2, 1, 3).reshape(h, 3, h),
                  lambda a: _t(a.reshape(h, 3, H, D).permute(0, 2, 1, 3).reshape(h, 3 * h)), 2)
    qkv_b = Entry("", lambda b: b.reshape(H, 3, D).permute(1, 0, 2).reshape(3, h),
                  lambda a: a.reshape(3, H, D).permute(1, 0, 2).reshape(3 * h), 1)
    same = Entry("", _identity, _identity)
    rules = {  # canonical suffix -> (FT suffix, rule)
        "ln1.weight": ("input_layernorm.weight", same), "ln1.bias": ("input_layernorm.bias", same),
        "attn.qkv.weight": ("attention.query_key_value.weight", qkv_w),
        "attn.qkv.bias": ("attention.query_key_value.bias", qkv_b),
        "attn.out.weight": ("attention.dense.weight", Entry("", _t, _t, 0)),
        "attn.out.bias": ("attention.dense.bias", same),
        "ln2.weight": ("post_attention_layernorm.weight", same),
        "ln2.bias": ("post_attention_layernorm.bias", same),
        "mlp.fc1.weight": ("mlp.dense_h_to_4h.weight", Entry("", _t, _t, 1)),
        "mlp.fc1.bias": ("mlp.dense_h_to_4h.bias", Entry("", _identity, _identity, 0)),
        "mlp.fc2.weight": ("mlp.dense_4h_to_h.weight", Entry("", _t, _t, 0)),
        "mlp.fc2.bias": ("mlp.dense_4h_to_h.bias", same),
        "moe.gate.weight": ("mlp.moe.gate.wg.weight", Entry("", _t, _t)),
        "moe.fc1.weight": ("mlp.moe.experts.dense_h_to_4h.weight", Entry("", _t, _t, 2)),
        "moe.fc1.bias": ("mlp.moe.experts.dense_h_to_4h.bias", Entry("", _identity, _identity, 1)),
        "moe.fc2.weight": ("mlp.moe.experts.dense_4h_to_h.weight", Entry("", _t, _t, 1)),
        "moe.fc2.bias": ("mlp.moe.experts.dense_4h_to_h.bias", same),
    }
    outer = {"wte.weight": "model.wte", "wpe.weight": "model.wpe", "ln_f.weight": "model.final_layernorm.weight",
             "ln_f.bias": "model.final_layernorm.bias", "lm_head.weight": "model.lm_head.weight"}
    out = {}
    for spec in tensor_specs(config):
        if spec.name in outer:
            out[spec.name] = Entry(outer[spec.name], _identity, _identity)
        else:
            _, layer, rest = spec.name.split(".", 2)
            suffix, rule = rules[rest]
            out[spec.name] = Entry(f"model.layers.{layer}.{suffix}", rule.to_ft, rule.from_ft, rule.split_axis)
    return out


def check_tp(config: ModelConfig, tp: int, where: str = "--tp") -> None:
    if tp < 1:
        raise CheckpointError(f"{where}: tensor-parallel size must be >= 1, got {tp}")
    if config.num_heads % tp or config.ffn_hidden_size % tp:
        raise CheckpointError(f"{where} {tp}: must divide num_heads ({config.num_heads}) and "
                              f"ffn_hidden_size ({config.ffn_hidden_size})")


def is_fastertransformer(path: Path) -> bool:
    return (resolve_dir(path) / CONFIG_FILE).is_file()


def resolve_dir(path: Path) -> Path:
    """The converter writes into ``<out>/<N>-gpu/``; accept either folder."""
    if not (path / CONFIG_FILE).is_file():
        subdirs = [d for d in path.glob("*-gpu") if (d / CONFIG_FILE).is_file()] if path.is_dir() else []
        if len(subdirs) == 1:
            return subdirs[0]
    return path


def write(out: Path, config: ModelConfig, get: TensorGetter, dtype: torch.dtype, tp: int = 1,
          progress=None) -> None:
    if dtype not in _NUMPY:
        raise CheckpointError(f"FasterTransformer checkpoints hold fp32 or fp16, not {DTYPE_NAMES.get(dtype, dtype)}")
    check_tp(config, tp)
    out.mkdir(parents=True, exist_ok=True)
    for name, entry in entries(config).items():
        a = entry.to_ft(get(name).to(dtype)).contiguous().numpy()
        if entry.split_axis is None:
            a.tofile(out / f"{entry.file}.bin")
        else:
            for rank, part in enumerate(np.split(a, tp, axis=entry.split_axis)):
                np.ascontiguousarray(part).tofile(out / f"{entry.file}.{rank}.bin")
        if progress is not None:
            progress.update(1)
    ini = configparser.ConfigParser()
    end_id = 50256 if config.vocab_size > 50256 else config.vocab_size - 1
    ini["gpt"] = {
        "model_name": "gpt", "head_num": str(config.num_heads), "size_per_head": str(config.head_dim),
        "inter_size": str(config.ffn_hidden_size), "num_layer": str(config.num_layers),
        "max_pos_seq_len": str(config.max_position_embeddings), "vocab_size": str(config.vocab_size),
        "has_adapters": "False", "adapter_inter_size": "0", "layernorm_eps": str(config.layernorm_eps),
        "start_id": str(end_id), "end_id": str(end_id), "weight_data_type": DTYPE_NAMES[dtype],
        "tensor_para_size": str(tp)}
    ini["structure"] = {"gpt_with_moe": str(int(bool(config.moe_layers))), "expert_num": str(config.num_experts),
                        "moe_layers": str(list(config.moe_layers))}
    ini["moetrt"] = {"top_k": str(config.top_k), "activation": config.activation,
                     "moe_capacity_factor": str(config.moe_capacity_factor),
                     "moe_min_capacity": str(config.moe_min_capacity),
                     "tie_word_embeddings": str(config.tie_word_embeddings)}
    with open(out / CONFIG_FILE, "w") as f:
        ini.write(f)


class FasterTransformerReader(CheckpointReader):
    format = FORMAT

    def __init__(self, path: Path, overrides: dict | None = None):
        self.path = resolve_dir(path)
        ini_path = self.path / CONFIG_FILE
        if not ini_path.is_file():
            raise CheckpointError(f"{ini_path}: missing file")
        ini = configparser.ConfigParser()
        try:
            ini.read(ini_path)
            gpt, structure = ini["gpt"], ini["structure"] if ini.has_section("structure") else {}
            extra = ini["moetrt"] if ini.has_section("moetrt") else {}
            if gpt.get("has_adapters", "False") == "True":
                raise CheckpointError(f"{ini_path}: models with adapters are not supported")
            self.dtype = DTYPES[gpt.get("weight_data_type", "fp32")]
            self.tensor_parallel = int(gpt.get("tensor_para_size", "1"))
            moe = int(structure.get("gpt_with_moe", "0"))
            config = ModelConfig(
                vocab_size=int(gpt["vocab_size"]), hidden_size=int(gpt["head_num"]) * int(gpt["size_per_head"]),
                num_layers=int(gpt["num_layer"]), num_heads=int(gpt["head_num"]),
                ffn_hidden_size=int(gpt["inter_size"]), max_position_embeddings=int(gpt["max_pos_seq_len"]),
                layernorm_eps=float(gpt.get("layernorm_eps", "1e-5")),
                num_experts=int(structure.get("expert_num", "0")) if moe else 0,
                moe_layers=tuple(ast.literal_eval(structure.get("moe_layers", "[]"))) if moe else (),
                top_k=int(extra.get("top_k", "1")), activation=extra.get("activation", "gelu_tanh"),
                moe_capacity_factor=float(extra.get("moe_capacity_factor", "0")),
                moe_min_capacity=int(extra.get("moe_min_capacity", "4")),
                tie_word_embeddings=extra.get("tie_word_embeddings", "True") == "True")
            self.config = config.replace(**(overrides or {}))
        except configparser.Error as exc:
            raise CheckpointError(f"{ini_path}: cannot parse: {exc}") from None
        except KeyError as exc:
            raise CheckpointError(f"{ini_path}: missing section or key {exc}") from None
        except (ValueError, SyntaxError, ConfigError) as exc:
            raise CheckpointError(f"{ini_path}: {exc}") from None
        check_tp(self.config, self.tensor_parallel, f"{ini_path}: tensor_para_size")
        self.entries = entries(self.config)
        self.check_complete()

    def _files(self, entry: Entry) -> list[Path]:
        if entry.split_axis is None:
            return [self.path / f"{entry.file}.bin"]
        return [self.path / f"{entry.file}.{r}.bin" for r in range(self.tensor_parallel)]

    def check_complete(self) -> None:
        for name, entry in self.entries.items():
            for file in self._files(entry):
                if not file.is_file():
                    raise CheckpointError(f"{file}: missing file for tensor {name}")
        known = {f.name for e in self.entries.values() for f in self._files(e)}
        extra = sorted(p.name for p in self.path.glob("model.*.bin") if p.name not in known)
        if extra:
            raise CheckpointError(f"{self.path}: unexpected tensor file(s) {', '.join(extra[:5])}")

    def _read(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        spec = spec_map(self.config)[name]
        full = tuple(entry.to_ft(torch.empty(spec.shape, device="meta")).shape)
        part = list(full)
        if entry.split_axis is not None:
            part[entry.split_axis] //= self.tensor_parallel
        itemsize = np.dtype(_NUMPY[self.dtype]).itemsize
        arrays = []
        for file in self._files(entry):
            expected = int(np.prod(part)) * itemsize
            size = file.stat().st_size
            if size != expected:
                raise CheckpointError(f"{file}: tensor {name} needs {expected} bytes ({DTYPE_NAMES[self.dtype]} "
                                      f"{tuple(part)}), file has {size}" + (" (truncated)" if size < expected else ""))
            arrays.append(np.fromfile(file, dtype=_NUMPY[self.dtype]).reshape(part))
        a = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=entry.split_axis)
        return entry.from_ft(torch.from_numpy(a)).contiguous()
