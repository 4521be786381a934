"""Megatron-DeepSpeed MoE checkpoints (the ModelScope GPT-MoE layout), tensor-parallel size 1.

Files: ``mp_rank_00_model_states.pt`` holds the non-expert tensors under ``module`` (nested dicts as
Megatron writes them, or dotted keys), ``layer_{m}_expert_{e}_mp_rank_00_model_states.pt`` holds
expert e of the m-th MoE layer (0-based count of MoE layers), under ``module`` or at top level as
DeepSpeed's own ``_save_moe_checkpoint`` writes. A ``latest`` file (DeepSpeed) or
``latest_checkpointed_iteration.txt`` (Megatron) redirects to the tagged sub-folder.
The configuration comes from ``args.txt`` (``key:value`` lines), else the ``args`` stored in the
checkpoint, then explicit overrides. MoE layers are those with ``l % expert_interval == expert_interval - 1``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from moetrt.errors import CheckpointError, ConfigError
from moetrt.models.checkpoints.common import (
    DTYPE_NAMES, CheckpointReader, TensorGetter, flatten, parse_key_value_lines, torch_load, unexpected)
from moetrt.models.config import ModelConfig
from moetrt.models.weights import tensor_specs

FORMAT = "megatron-deepspeed"
MODEL_FILE = "mp_rank_00_model_states.pt"
LM = "language_model."
ENC = LM + "encoder."

# canonical suffix inside a layer -> Megatron suffix after "layers.{l}."
_LAYER_KEYS = {
    "ln1.weight": "input_layernorm.weight", "ln1.bias": "input_layernorm.bias",
    "attn.qkv.weight": "self_attention.query_key_value.weight",
    "attn.qkv.bias": "self_attention.query_key_value.bias",
    "attn.out.weight": "self_attention.dense.weight", "attn.out.bias": "self_attention.dense.bias",
    "ln2.weight": "post_attention_layernorm.weight", "ln2.bias": "post_attention_layernorm.bias",
    "mlp.fc1.weight": "mlp.dense_h_to_4h.weight", "mlp.fc1.bias": "mlp.dense_h_to_4h.bias",
    "mlp.fc2.weight": "mlp.dense_4h_to_h.weight", "mlp.fc2.bias": "mlp.dense_4h_to_h.bias",
    "moe.gate.weight": "mlp.deepspeed_moe.gate.wg.weight",
}
_OUTER_KEYS = {
    "wte.weight": LM + "embedding.word_embeddings.weight",
    "wpe.weight": LM + "embedding.position_embeddings.weight",
    "ln_f.weight": ENC + "final_layernorm.weight", "ln_f.bias": ENC + "final_layernorm.bias",
}
# canonical stacked expert tensor -> per-expert Megatron suffix
_EXPERT_KEYS = {"moe.fc1.weight": "dense_h_to_4h.weight", "moe.fc1.bias": "dense_h_to_4h.bias",
                "moe.fc2.weight": "dense_4h_to_h.weight", "moe.fc2.bias": "dense_4h_to_h.bias"}


def _layer_of(name: str) -> tuple[int, str]:
    _, layer, rest = name.split(".", 2)
    return int(layer), rest


def megatron_key(name: str) -> str:
    """Megatron key (dotted, under ``module``) of a canonical non-expert tensor name."""
    if name in _OUTER_KEYS:
        return _OUTER_KEYS[name]
    if name == "lm_head.weight":
        raise CheckpointError("Megatron-DeepSpeed GPT ties the LM head to the word embeddings; "
                              "untied models can be written in the moetrt or fastertransformer formats")
    layer, rest = _layer_of(name)
    return f"{ENC}layers.{layer}.{_LAYER_KEYS[rest]}"


def expert_file(moe_index: int, expert: int) -> str:
    return f"layer_{moe_index}_expert_{expert}_mp_rank_00_model_states.pt"


def expert_key(layer: int, expert: int, suffix: str) -> str:
    return f"{ENC}layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{expert}.{suffix}"


def normalize_key(key: str) -> str:
    """Spellings real checkpoints use -> the one this module writes."""
    key = key.removeprefix("module.")
    key = key.replace(LM + "transformer.", ENC)
    return re.sub(r"(?<![a-z_])attention\.", "self_attention.", key)


def is_megatron(path: Path) -> bool:
    return (resolve_dir(path) / MODEL_FILE).is_file()


def resolve_dir(path: Path) -> Path:
    for marker in ("latest", "latest_checkpointed_iteration.txt"):
        if (path / marker).is_file() and not (path / MODEL_FILE).is_file():
            tag = (path / marker).read_text().strip()
            for candidate in (path / tag, path / f"iter_{int(tag):07d}" if tag.isdigit() else None):
                if candidate is not None and candidate.is_dir():
                    return candidate
            raise CheckpointError(f"{path / marker} names {tag!r}, but no such folder exists in {path}")
    return path


# -- configuration -------------------------------------------------------------------------------

def config_from_args(args: dict, where: str, vocab_size: int | None = None) -> ModelConfig:
    """A ``ModelConfig`` from Megatron's argument names (args.txt or the stored Namespace)."""
    def need(key):
        if args.get(key) is None:
            raise CheckpointError(f"{where}: argument {key!r} is missing")
        return args[key]

    hidden = int(need("hidden_size"))
    num_layers = int(need("num_layers"))
    experts = args.get("num_experts") or [1]
    experts = list(experts) if isinstance(experts, (list, tuple)) else [experts]
    if len(set(experts)) != 1:
        raise CheckpointError(f"{where}: num_experts {experts} varies by layer; only one expert count is supported")
    num_experts = int(experts[0])
    interval = int(args.get("expert_interval") or 2)
    moe_layers = [l for l in range(num_layers) if l % interval == interval - 1] if num_experts > 1 else []
    capacity = 0.0
    if moe_layers and args.get("moe_token_dropping", True) is not False:
        capacity = float(args.get("moe_eval_capacity_factor") or 0.0)
    vocab = args.get("padded_vocab_size") or vocab_size
    if vocab is None:
        raise CheckpointError(f"{where}: argument 'padded_vocab_size' is missing")
    try:
        return ModelConfig(
            vocab_size=int(vocab), hidden_size=hidden, num_layers=num_layers,
            num_heads=int(need("num_attention_heads")),
            ffn_hidden_size=int(args.get("ffn_hidden_size") or 4 * hidden),
            max_position_embeddings=int(need("max_position_embeddings")),
            layernorm_eps=float(args.get("layernorm_epsilon") or 1e-5),
            num_experts=num_experts if moe_layers else 0, moe_layers=tuple(moe_layers),
            top_k=int(args.get("topk") or 1), moe_capacity_factor=capacity,
            moe_min_capacity=int(args.get("moe_min_capacity") or 4))
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def args_from_config(config: ModelConfig) -> dict:
    interval = 2
    if config.moe_layers:
        fits = [i for i in range(1, config.num_layers + 1)
                if [l for l in range(config.num_layers) if l % i == i - 1] == list(config.moe_layers)]
        if not fits:
            raise CheckpointError(f"moe_layers {list(config.moe_layers)} is not every expert_interval-th layer; "
                                  "Megatron-DeepSpeed cannot express it (use the moetrt or fastertransformer format)")
        interval = fits[0]
    return {
        "num_layers": config.num_layers, "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size, "num_attention_heads": config.num_heads,
        "max_position_embeddings": config.max_position_embeddings, "layernorm_epsilon": config.layernorm_eps,
        "num_experts": [config.num_experts if config.moe_layers else 1], "expert_interval": interval,
        "topk": config.top_k, "padded_vocab_size": config.vocab_size,
        "moe_eval_capacity_factor": config.moe_capacity_factor, "moe_min_capacity": config.moe_min_capacity,
        "moe_token_dropping": config.moe_capacity_factor > 0,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
    }


# -- writer ----------------------------------------------------------------------------------------

def write(out: Path, config: ModelConfig, get: TensorGetter, dtype: torch.dtype, tp: int = 1,
          progress=None) -> None:
    if tp != 1:
        raise CheckpointError("writing tensor-parallel Megatron-DeepSpeed checkpoints is not supported; "
                              "use --format fastertransformer for --tp > 1")
    if not config.tie_word_embeddings:
        megatron_key("lm_head.weight")  # raises the explanation
    if config.activation != "gelu_tanh":
        raise CheckpointError(f"Megatron-DeepSpeed GPT uses tanh-GeLU; activation {config.activation!r} "
                              "cannot be expressed (use the moetrt format)")
    args = args_from_config(config) | {"params_dtype": DTYPE_NAMES.get(dtype, str(dtype))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.txt").write_text("".join(f"{k}:{v}\n" for k, v in args.items()))

    language_model: dict = {"embedding": {"word_embeddings": {}, "position_embeddings": {}}, "encoder": {}}
    moe_index = {layer: m for m, layer in enumerate(config.moe_layers)}
    experts_of_layer: dict[str, torch.Tensor] = {}
    for spec in tensor_specs(config):
        name = spec.name
        t = get(name)
        t = t.float() if spec.fp32_always else t.to(dtype)
        if progress is not None:
            progress.update(1)
        if name.startswith("layers.") and _layer_of(name)[1] in _EXPERT_KEYS:
            layer, rest = _layer_of(name)
            experts_of_layer[rest] = t
            if len(experts_of_layer) == len(_EXPERT_KEYS):  # a layer's experts are complete: one file each
                for e in range(config.num_experts):
                    state = {expert_key(layer, e, suffix): experts_of_layer[canon][e].clone()
                             for canon, suffix in _EXPERT_KEYS.items()}
                    torch.save({"module": state}, out / expert_file(moe_index[layer], e))
                experts_of_layer.clear()
            continue
        key = megatron_key(name).removeprefix(LM)
        if key.startswith("embedding."):
            language_model["embedding"][key.split(".")[1]]["weight"] = t.clone()
        else:
            language_model["encoder"][key.removeprefix("encoder.")] = t.clone()
    torch.save({"module": {"language_model": language_model}, "args": argparse.Namespace(**args),
                "checkpoint_version": 3.0, "iteration": 0}, out / MODEL_FILE)


# -- reader ----------------------------------------------------------------------------------------

class MegatronReader(CheckpointReader):
    format = FORMAT

    def __init__(self, path: Path, overrides: dict | None = None):
        self.path = resolve_dir(path)
        if any(self.path.glob("mp_rank_01*")):
            raise CheckpointError(f"{self.path}: tensor-parallel Megatron checkpoints (mp_rank_01...) are not "
                                  "supported; merge the ranks to tensor-parallel size 1 first")
        model_file = self.path / MODEL_FILE
        states = torch_load(model_file)
        if not isinstance(states, dict) or not isinstance(states.get("module", states.get("model")), dict):
            raise CheckpointError(f"{model_file}: no 'module' state dict in the checkpoint")
        module = states.get("module", states.get("model"))
        self.tensors = {normalize_key(k): v for k, v in flatten(module).items()}
        wte = self.tensors.get(_OUTER_KEYS["wte.weight"])
        if args_txt := next((p for p in (self.path / "args.txt", path / "args.txt") if p.is_file()), None):
            args, where = parse_key_value_lines(args_txt.read_text()), str(args_txt)
        elif isinstance(states.get("args"), argparse.Namespace):
            args, where = vars(states["args"]), f"{model_file} (stored args)"
        else:
            raise CheckpointError(f"{self.path}: no args.txt and no 'args' in {MODEL_FILE}; "
                                  "cannot tell the model's configuration")
        config = config_from_args(args, where, vocab_size=None if wte is None else wte.shape[0])
        try:
            self.config = config.replace(**(overrides or {}))
        except ConfigError as exc:
            raise CheckpointError(f"{where} with overrides: {exc}") from None
        self.model_file = model_file
        self.check_complete()
        self.dtype = self._read("wte.weight").dtype

    def check_complete(self) -> None:
        expected = [megatron_key(s.name) for s in tensor_specs(self.config)
                    if not (s.name.startswith("layers.") and _layer_of(s.name)[1] in _EXPERT_KEYS)]
        unexpected(self.tensors, expected, str(self.model_file))
        for key in expected:
            if key not in self.tensors:
                raise CheckpointError(f"{self.model_file}: missing tensor {key}")
        for m in range(len(self.config.moe_layers)):
            for e in range(self.config.num_experts):
                if not (self.path / expert_file(m, e)).is_file():
                    raise CheckpointError(f"{self.path / expert_file(m, e)}: missing expert file "
                                          f"(MoE layer {m}, expert {e})")

    def _read_expert(self, layer: int, suffix: str) -> torch.Tensor:
        m = self.config.moe_layers.index(layer)
        parts = []
        for e in range(self.config.num_experts):
            file = self.path / expert_file(m, e)
            states = torch_load(file)
            tree = states.get("module", states) if isinstance(states, dict) else None
            if not isinstance(tree, dict):
                raise CheckpointError(f"{file}: not a state dict")
            found = {normalize_key(k): v for k, v in flatten(tree).items()}
            matches = [k for k in found if k.endswith("." + suffix)]
            if len(found) != len(_EXPERT_KEYS):
                extra = sorted(k for k in found if not any(k.endswith(s) for s in _EXPERT_KEYS.values()))
                if extra:
                    raise CheckpointError(f"{file}: unexpected tensor {extra[0]}")
                raise CheckpointError(f"{file}: expected {len(_EXPERT_KEYS)} expert tensors, found {len(found)}")
            if len(matches) != 1:
                raise CheckpointError(f"{file}: missing tensor {expert_key(layer, e, suffix)}")
            parts.append(found[matches[0]])
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise CheckpointError(f"{self.path}: experts of MoE layer {m} disagree on {suffix} shapes {sorted(shapes)}")
        return torch.stack(parts)

    def _read(self, name: str) -> torch.Tensor:
        if name.startswith("layers."):
            layer, rest = _layer_of(name)
            if rest in _EXPERT_KEYS:
                return self._read_expert(layer, _EXPERT_KEYS[rest])
        return self.tensors[megatron_key(name)]
