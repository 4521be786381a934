"""Canonical tensor names, shapes and storage dtypes of a ``ModelConfig``.

This is the single home of the weight layout: ``GPTMoE`` registers its parameters under
these names, every checkpoint reader produces them and every writer consumes them.

Layouts (torch ``Linear`` convention, ``[out, in]``):

- ``wte.weight [V, h]``, ``wpe.weight [P, h]``
- ``layers.{l}.ln1.{weight,bias} [h]``, ``layers.{l}.ln2.{weight,bias} [h]``
- ``layers.{l}.attn.qkv.weight [3h, h]``, ``.bias [3h]``: output dim laid out ``[heads, 3, head_dim]``
  (Megatron), i.e. row ``(n*3 + j)*head_dim + d`` is head n, j in (q, k, v), channel d.
- ``layers.{l}.attn.out.weight [h, h]``, ``.bias [h]``
- dense layers: ``layers.{l}.mlp.fc1.weight [f, h]``, ``.bias [f]``, ``layers.{l}.mlp.fc2.weight [h, f]``, ``.bias [h]``
- MoE layers: ``layers.{l}.moe.gate.weight [E, h]`` (always float32), experts stacked:
  ``layers.{l}.moe.fc1.weight [E, f, h]``, ``.bias [E, f]``, ``layers.{l}.moe.fc2.weight [E, h, f]``, ``.bias [E, h]``
- ``ln_f.{weight,bias} [h]``; ``lm_head.weight [V, h]`` only when embeddings are untied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moetrt.models.config import ModelConfig

GATE_DTYPE = torch.float32


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    fp32_always: bool = False  # kept in float32 whatever the model dtype (the MoE gate)

    def dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return GATE_DTYPE if self.fp32_always else model_dtype


def layer_tensor_specs(config: ModelConfig, layer: int) -> list[TensorSpec]:
    h, f, E = config.hidden_size, config.ffn_hidden_size, config.num_experts
    p = f"layers.{layer}."
    specs = [
        TensorSpec(p + "ln1.weight", (h,)), TensorSpec(p + "ln1.bias", (h,)),
        TensorSpec(p + "attn.qkv.weight", (3 * h, h)), TensorSpec(p + "attn.qkv.bias", (3 * h,)),
        TensorSpec(p + "attn.out.weight", (h, h)), TensorSpec(p + "attn.out.bias", (h,)),
        TensorSpec(p + "ln2.weight", (h,)), TensorSpec(p + "ln2.bias", (h,)),
    ]
    if config.is_moe_layer(layer):
        specs += [
            TensorSpec(p + "moe.gate.weight", (E, h), fp32_always=True),
            TensorSpec(p + "moe.fc1.weight", (E, f, h)), TensorSpec(p + "moe.fc1.bias", (E, f)),
            TensorSpec(p + "moe.fc2.weight", (E, h, f)), TensorSpec(p + "moe.fc2.bias", (E, h)),
        ]
    else:
        specs += [
            TensorSpec(p + "mlp.fc1.weight", (f, h)), TensorSpec(p + "mlp.fc1.bias", (f,)),
            TensorSpec(p + "mlp.fc2.weight", (h, f)), TensorSpec(p + "mlp.fc2.bias", (h,)),
        ]
    return specs


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """All tensors of the model, in a stable order (embeddings, layers, final norm, head)."""
    h = config.hidden_size
    specs = [TensorSpec("wte.weight", (config.vocab_size, h)),
             TensorSpec("wpe.weight", (config.max_position_embeddings, h))]
    for layer in range(config.num_layers):
        specs += layer_tensor_specs(config, layer)
    specs += [TensorSpec("ln_f.weight", (h,)), TensorSpec("ln_f.bias", (h,))]
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (config.vocab_size, h)))
    return specs


def spec_map(config: ModelConfig) -> dict[str, TensorSpec]:
    return {s.name: s for s in tensor_specs(config)}
