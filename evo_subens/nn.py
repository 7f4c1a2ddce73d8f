"""Model helpers every task and family shares (nothing here knows what a model predicts)."""

from __future__ import annotations

import torch
from torch import nn


def output_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the output layer's parameters (a classifier's final
    layer, a policy's head): those of the last module, in ``named_modules()`` order, that directly owns
    parameters."""
    # Map by identity so a parameter shared with an earlier module keeps the name
    # named_parameters() gives it.
    names = {id(p): name for name, p in model.named_parameters()}
    last: nn.Module | None = None
    for _, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = module
    if last is None:
        return []
    return [names[id(p)] for p in last.parameters(recurse=False)]


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model.state_dict()`` (safe to keep while the model changes)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (each shared parameter counted once)."""
    return sum(p.numel() for p in model.parameters())
