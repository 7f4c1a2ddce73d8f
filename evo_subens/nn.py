"""Model helpers every task and family shares (nothing here knows what a model predicts)."""

from __future__ import annotations

import torch
from torch import nn


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model.state_dict()`` (safe to keep while the model changes)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (each shared parameter counted once)."""
    return sum(p.numel() for p in model.parameters())
