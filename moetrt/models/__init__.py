"""Models: ``ModelConfig`` and presets, the torch reference ``GPTMoE``, checkpoint formats.

Knows nothing of ONNX or engines.
"""

from __future__ import annotations

# Only the torch-free pieces are imported eagerly: the runtime reads ModelConfig without importing torch.
from moetrt.models.config import PRESETS, ModelConfig, get_preset

__all__ = ["PRESETS", "GPTMoE", "KVCache", "ModelConfig", "SamplingParams", "get_preset", "load"]

_LAZY = {"GPTMoE": "moetrt.models.gpt_moe", "KVCache": "moetrt.models.gpt_moe",
         "SamplingParams": "moetrt.models.sampling", "load": "moetrt.models.loading"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moetrt.models' has no attribute {name!r}")
