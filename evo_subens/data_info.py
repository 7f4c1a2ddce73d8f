"""What a run's models take as input, from its ``data.json``: the sample shape, the classes, and the
transform from the data's raw form to the model's input, as a torch module.

``data.json`` (written by runs that have one)::

    {"input_shape": [1, 28, 28], "num_classes": 10, "classes": ["T-shirt", ...] or null,
     "transform": null or {"scale": 255.0, "mean": [[[0.28]]] or null, "std": [[[0.35]]] or null}}

The model input is ``(raw / scale - mean) / std``; ``mean`` and ``std`` are nested lists in a shape that
broadcasts against one sample. A missing ``scale``, ``mean`` or ``std`` is the identity.

    >>> info = read_data_info("runs/default-s0-20261126-033727")   # None: the run has no data.json
    >>> InputTransform(info.transform)(raw_batch)                    # the members' input
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import RunDirError

DATA_FILE = "data.json"


@dataclass(frozen=True)
class DataInfo:
    """A run's input description: per-sample shape, classes, raw-to-model transform (None: identity)."""

    input_shape: tuple[int, ...]
    num_classes: int
    classes: list[str | int | float] | None = None
    transform: dict[str, Any] | None = None


def read_data_info(run_dir: str | Path) -> DataInfo | None:
    """``run_dir/data.json`` checked and parsed; None when the run has none (runs made before it existed).
    A file that is not the described JSON is a :class:`RunDirError` naming the file and the field."""
    path = Path(run_dir) / DATA_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is not valid JSON ({exc})") from None

    def bad(field: str, expected: str, got: Any) -> RunDirError:
        return RunDirError(f"{path}: '{field}' should be {expected}, got {got!r}")

    if not isinstance(raw, dict):
        raise RunDirError(f"{path} holds a {type(raw).__name__}; expected a JSON object with input_shape, "
                          f"num_classes, classes and transform")
    shape = raw.get("input_shape")
    if not (isinstance(shape, list) and shape and all(_is_int(s) and s > 0 for s in shape)):
        raise bad("input_shape", "a non-empty list of positive integers", shape)
    num_classes = raw.get("num_classes")
    if not (_is_int(num_classes) and num_classes >= 2):
        raise bad("num_classes", "an integer of at least 2", num_classes)
    classes = raw.get("classes")
    if classes is not None and not (isinstance(classes, list) and len(classes) == num_classes
                                    and all(isinstance(c, (str, int, float)) for c in classes)):
        raise bad("classes", f"null or a list of {num_classes} labels (names or numbers)", classes)
    transform = raw.get("transform")
    if transform is not None:
        transform = _checked_transform(transform, tuple(shape), bad)
    return DataInfo(tuple(shape), num_classes, classes, transform)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_transform(transform: Any, input_shape: tuple[int, ...], bad: Any) -> dict[str, Any]:
    if not isinstance(transform, dict):
        raise bad("transform", "null or an object with scale, mean and std", transform)
    unknown = sorted(set(transform) - {"scale", "mean", "std"})
    if unknown:
        raise bad("transform", "an object with only scale, mean and std", unknown)
    scale = transform.get("scale", 1.0)
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise bad("transform.scale", "a positive finite number", scale)
    for name in ("mean", "std"):
        value = transform.get(name)
        if value is None:
            continue
        try:
            tensor = torch.tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise bad(f"transform.{name}", "null or a number or nested list of numbers", value) from None
        try:
            fits = torch.broadcast_shapes(tensor.shape, input_shape) == input_shape
        except RuntimeError:
            fits = False
        if not fits:
            raise bad(f"transform.{name}", f"values in a shape that broadcasts against one sample "
                                           f"{list(input_shape)}", list(tensor.shape))
        if not torch.isfinite(tensor).all() or (name == "std" and (tensor <= 0).any()):
            raise bad(f"transform.{name}", "finite numbers" + (", all positive" if name == "std" else ""), value)
    return {"scale": float(scale), "mean": transform.get("mean"), "std": transform.get("std")}


class InputTransform(nn.Module):
    """``(x / scale - mean) / std`` with the constants as buffers (so ``.to(device)`` moves them and they
    are saved with the module); the identity when ``transform`` is None. The input is first cast to the
    buffers' float type, so raw integer data (e.g. uint8 pixels) can be passed as it is."""

    def __init__(self, transform: Mapping[str, Any] | None = None):
        super().__init__()
        transform = dict(transform or {})
        scale = float(transform.get("scale", 1.0))
        self.register_buffer("scale", torch.tensor(scale))
        # Decided here, not by reading the buffer in forward: graph capture (torch.export) cannot branch on
        # a tensor's value.
        self.divides = scale != 1.0
        for name in ("mean", "std"):
            value = transform.get(name)
            self.register_buffer(name, None if value is None else torch.tensor(value, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.dtype)
        # The identity parts are skipped, not computed: traced exports then hold no needless operations.
        if self.divides:
            x = x / self.scale
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        return x

    def to_dict(self) -> dict[str, Any] | None:
        """The transform as ``data.json`` writes it (None: identity)."""
        if float(self.scale) == 1.0 and self.mean is None and self.std is None:
            return None
        return {"scale": float(self.scale),
                "mean": None if self.mean is None else self.mean.tolist(),
                "std": None if self.std is None else self.std.tolist()}
