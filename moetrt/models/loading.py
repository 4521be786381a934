"""``load``: a checkpoint of any supported format into the torch reference model."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from moetrt.errors import CheckpointError
from moetrt.models.checkpoints import open_checkpoint
from moetrt.models.gpt_moe import GPTMoE


def load(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, overrides: dict | None = None,
         progress: bool = False) -> GPTMoE:
    """The reference model with the weights of any supported checkpoint (format detected).

    Tensors are streamed into parameters allocated once, so peak memory is the model in ``dtype``
    plus the largest single tensor (one MoE layer's stacked expert weight).
    """
    with open_checkpoint(checkpoint_dir, overrides) as reader:
        with torch.device("meta"):
            model = GPTMoE(reader.config, dtype)
        model = model.to_empty(device="cpu")
        params = dict(model.named_parameters())
        names = reader.names()
        if set(names) != set(params):
            raise CheckpointError(f"{checkpoint_dir}: tensors do not match the model: "
                                  f"{sorted(set(names) ^ set(params))[:5]}")
        for name in tqdm(names, desc="loading", unit="tensor", disable=not progress):
            with torch.no_grad():
                params[name].copy_(reader.get(name))
    return model.eval()
