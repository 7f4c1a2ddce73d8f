"""Model helpers every task and family shares (nothing here knows what a model predicts)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

SAFETENSORS_SUFFIX = ".safetensors"


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


def is_safetensors_file(path: str | Path) -> bool:
    """Whether ``path`` is in the safetensors format: by its suffix, or by its header (an 8-byte
    little-endian length, then a JSON object), so a parent file named ``*.pt`` may be either."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return True
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict file on the CPU: a ``.safetensors`` file, or a ``torch.save`` file read
    with ``weights_only=True`` (so nothing but tensors and plain containers is unpickled).

    Errors are those of the underlying reader (``pickle.UnpicklingError``, ``safetensors``' own, ``OSError``);
    callers turn them into messages naming what the file was for."""
    if is_safetensors_file(path):
        from safetensors.torch import load_file  # only files in that format need the package loaded

        return load_file(str(path), device="cpu")
    with warnings.catch_warnings():
        # A foreign pickle makes torch warn before it fails; the caller's error says it better.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)
