"""``ModelConfig``: the one description of a GPT-MoE model's shape, with named presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from moetrt.errors import ConfigError

ACTIVATIONS = ("gelu_tanh", "gelu")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and semantics of a GPT-style decoder with Mixture-of-Experts MLPs.

    ``moe_layers`` lists the (0-based) layers whose MLP is replaced by ``num_experts``
    experts of width ``ffn_hidden_size``; the other layers keep a dense MLP.
    ``moe_capacity_factor`` 0 never drops a token; > 0 reproduces DeepSpeed's eval-time
    capacity ``max(ceil(tokens * top_k / num_experts * factor), moe_min_capacity)`` per expert.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int
    max_position_embeddings: int
    layernorm_eps: float = 1e-5
    num_experts: int = 0
    moe_layers: tuple[int, ...] = field(default_factory=tuple)
    top_k: int = 1
    activation: str = "gelu_tanh"
    moe_capacity_factor: float = 0.0
    moe_min_capacity: int = 4
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))
        self.validate()

    # -- derived ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    # -- validation --------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"ModelConfig.hidden_size ({self.hidden_size}) is not divisible by num_heads "
                f"({self.num_heads})")
        if not (isinstance(self.layernorm_eps, (int, float)) and self.layernorm_eps > 0):
            raise ConfigError(f"ModelConfig.layernorm_eps must be > 0, got {self.layernorm_eps!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"ModelConfig.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.top_k not in (1, 2):
            raise ConfigError(f"ModelConfig.top_k must be 1 or 2, got {self.top_k!r}")
        if len(set(self.moe_layers)) != len(self.moe_layers):
            raise ConfigError(f"ModelConfig.moe_layers has duplicates: {list(self.moe_layers)}")
        for layer in self.moe_layers:
            if not 0 <= layer < self.num_layers:
                raise ConfigError(
                    f"ModelConfig.moe_layers: layer index {layer} is out of range for "
                    f"num_layers={self.num_layers} (valid: 0..{self.num_layers - 1})")
        if list(self.moe_layers) != sorted(self.moe_layers):
            raise ConfigError(f"ModelConfig.moe_layers must be sorted, got {list(self.moe_layers)}")
        if self.moe_layers:
            if not isinstance(self.num_experts, int) or self.num_experts < 1:
                raise ConfigError(
                    f"ModelConfig.num_experts must be >= 1 when moe_layers is set, got {self.num_experts!r}")
            if self.top_k > self.num_experts:
                raise ConfigError(
                    f"ModelConfig.top_k ({self.top_k}) is larger than num_experts ({self.num_experts})")
        elif self.num_experts:
            raise ConfigError(
                f"ModelConfig.num_experts is {self.num_experts} but moe_layers is empty; "
                "set moe_layers or num_experts=0")
        if not self.moe_capacity_factor >= 0:
            raise ConfigError(
                f"ModelConfig.moe_capacity_factor must be >= 0 (0 = never drop), got {self.moe_capacity_factor!r}")
        if not isinstance(self.moe_min_capacity, int) or self.moe_min_capacity < 0:
            raise ConfigError(
                f"ModelConfig.moe_min_capacity must be a non-negative integer, got {self.moe_min_capacity!r}")

    # -- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown ModelConfig field(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # missing required fields
            raise ConfigError(f"{source}: {exc}") from None

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "ModelConfig":
        path = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        try:
            text = path.read_text() if path is not None else str(path_or_text)
            data = json.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path or 'config'}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path or "config"))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # -- sizes ---------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and those a single token touches (its top_k experts only)."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        embed = v * h + self.max_position_embeddings * h
        attn = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h)  # two LayerNorms, QKV, output
        dense_mlp = h * f + f + f * h + h
        expert = dense_mlp
        n_moe = len(self.moe_layers)
        n_dense = self.num_layers - n_moe
        lm_head = 0 if self.tie_word_embeddings else v * h
        common = embed + self.num_layers * attn + n_dense * dense_mlp + 2 * h + lm_head
        total = common + n_moe * (self.num_experts * expert + self.num_experts * h)
        active = common + n_moe * (self.top_k * expert + self.num_experts * h)
        return {"total": total, "active": active}


PRESETS: dict[str, ModelConfig] = {
    # The ModelScope / Megatron-DeepSpeed GPT-MoE 0.35B with 64 experts in every odd layer.
    "gpt-moe-350m-64e": ModelConfig(
        vocab_size=51200, hidden_size=1024, num_layers=24, num_heads=16, ffn_hidden_size=4096,
        max_position_embeddings=2048, layernorm_eps=1e-5, num_experts=64,
        moe_layers=tuple(range(1, 24, 2)), top_k=1),
    # A larger model, for tensor-parallel scaling: a 16-layer, hidden-4096 GPT with 8 experts in every odd layer;
    # 11.0B parameters (21.9 GB in fp16), of which a token uses 3.4B.
    "gpt-moe-3.4b-8e": ModelConfig(
        vocab_size=51200, hidden_size=4096, num_layers=16, num_heads=32, ffn_hidden_size=16384,
        max_position_embeddings=2048, layernorm_eps=1e-5, num_experts=8,
        moe_layers=tuple(range(1, 16, 2)), top_k=1),
    # Small enough for every test on a CPU, still every feature: 4 heads (TP up to 4),
    # MoE and dense layers interleaved, 8 experts.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, ffn_hidden_size=256,
        max_position_embeddings=256, layernorm_eps=1e-5, num_experts=8, moe_layers=(1, 3), top_k=1),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}") from None
