"""Model helpers every task and family shares (nothing here knows what a model predicts)."""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import ParentFileError

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


def _some(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _unpickler_reason(exc: Exception) -> str:
    """The specific cause inside torch's weights_only error, without its paragraphs of advice about
    ``weights_only=False`` (which is never an option here)."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, re.S)
    reason = " ".join((match.group(1) if match else text).split())
    return reason.split(". Please use")[0] or type(exc).__name__


def load_parent_state(path: str | Path, model: nn.Module) -> None:
    """Load a state_dict file into ``model`` (strict): a ``torch.save`` file, of which only tensors are
    unpickled (``weights_only=True``), or a safetensors file. Every failure is a :class:`ParentFileError`
    naming the file."""
    path = Path(path)
    if not path.exists():
        raise ParentFileError(f"parent weights file {path} does not exist")
    if not path.is_file():
        raise ParentFileError(f"parent weights file {path} is not a file")
    if path.stat().st_size == 0:
        raise ParentFileError(f"parent weights file {path} is empty")
    try:
        state = load_state_file(path)
    except pickle.UnpicklingError as exc:
        raise ParentFileError(f"cannot read parent weights file {path}: it is corrupt or not a plain "
                              f"state_dict saved with torch.save (only tensors are loaded; "
                              f"{_unpickler_reason(exc)})") from None
    except Exception as exc:  # the readers raise many types on truncated/foreign files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ParentFileError(f"cannot read parent weights file {path}: {type(exc).__name__}"
                              + (f": {first_line}" if first_line else "")) from None

    if not isinstance(state, Mapping):
        raise ParentFileError(f"parent weights file {path} is not a state_dict: it holds a "
                              f"{type(state).__name__}, expected a mapping of parameter names to tensors")
    bad = [repr(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ParentFileError(f"parent weights file {path} is not a state_dict: entries that are not "
                              f"name -> tensor: {_some(bad)}")

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_some(shapes)}")
    if problems:
        raise ParentFileError(f"parent weights file {path} does not fit the architecture "
                              f"{type(model).__name__}: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # custom modules may reject what the key/shape check let through
        raise ParentFileError(f"parent weights file {path} does not fit the architecture "
                              f"{type(model).__name__}: {exc}") from None
