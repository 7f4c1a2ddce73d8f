"""What a run's models take as input, from its ``data.json``: the sample shape, the classes, the transform
from the data's raw form to the model's input (as a torch module), and how the raw form is laid out: the
CSV's feature columns, or the size, colour mode and resizing of image runs.

``data.json`` (written by runs that have one)::

    {"input_shape": [1, 28, 28], "num_classes": 10, "classes": ["T-shirt", ...] or null,
     "transform": null or {"scale": 255.0, "mean": [[[0.28]]] or null, "std": [[[0.35]]] or null},
     "features": null or ["mean radius", ...],
     "image": null or {"size": [28, 28], "mode": "L", "resize": "bilinear" or null}}

The model input is ``(raw / scale - mean) / std``; ``mean`` and ``std`` are nested lists in a shape that
broadcasts against one sample. A missing ``scale``, ``mean`` or ``std`` is the identity.

``features`` (csv runs) names the input's columns in order. ``image`` (image-folder and CIFAR runs): the
raw form is (channels, height, width) pixels of ``size``; the run read its images with Pillow, converted
them to ``mode`` ("L": 1 channel, "RGB": 3) and, where ``resize`` is "bilinear", resized every image to
``size`` with Pillow's bilinear filter (null: the run never resized; its images all had ``size``). Both are
absent from runs made before they were recorded, which load as before.

    >>> info = read_data_info("runs/default-s0-20261126-033727")   # None: the run has no data.json
    >>> InputTransform(info.transform)(raw_batch)                    # the members' input
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import RunDirError

DATA_FILE = "data.json"


@dataclass(frozen=True)
class DataInfo:
    """A run's input description: per-sample shape, classes, raw-to-model transform (None: identity), the
    feature column names (csv runs) and the image form (image runs; see :class:`ImageForm`)."""

    input_shape: tuple[int, ...]
    num_classes: int
    classes: list[str | int | float] | None = None
    transform: dict[str, Any] | None = None
    features: list[str] | None = None
    image: dict[str, Any] | None = None


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
    features = raw.get("features")
    if features is not None and not (len(shape) == 1 and isinstance(features, list) and len(features) == shape[0]
                                     and all(isinstance(f, str) for f in features)):
        raise bad("features", f"null or a list of {shape[0]} column names (strings), for a sample shape of one "
                              f"dimension", features)
    image = raw.get("image")
    if image is not None:
        try:
            image = ImageForm.from_dict(image, tuple(shape)).to_dict()
        except ValueError as exc:
            raise RunDirError(f"{path}: 'image' {exc}") from None
    return DataInfo(tuple(shape), num_classes, classes, transform, features, image)


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


# --------------------------------------------------------------------------------------- images' raw form

IMAGE_MODES = {"L": 1, "RGB": 3}  # Pillow modes the runs read images in -> channels
RESIZE_FILTERS = ("bilinear",)


@dataclass(frozen=True)
class ImageForm:
    """How an image run's raw inputs are laid out: (channels, height, width) pixels of ``size`` in Pillow's
    ``mode``; where ``resize`` is "bilinear", images of another size were resized to ``size`` with Pillow's
    bilinear filter (None: the run never resized, so only images of ``size`` are its raw form).

    :meth:`from_pil` and :meth:`layout` bring images in their other usual forms to that layout: PIL images,
    (height, width, channels) arrays, and batches of either."""

    size: tuple[int, int]
    mode: str
    resize: str | None = None

    @classmethod
    def from_dict(cls, record: Any, input_shape: Sequence[int]) -> ImageForm:
        """``data.json``'s ``image`` record, checked against samples of ``input_shape``; a ValueError says
        what is wrong."""
        if not isinstance(record, Mapping) or set(record) - {"size", "mode", "resize"}:
            raise ValueError(f"should be null or an object with size, mode and resize, got {record!r}")
        size, mode, resize = record.get("size"), record.get("mode"), record.get("resize")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
            raise ValueError(f"size should be [height, width], two positive integers, got {size!r}")
        if mode not in IMAGE_MODES:
            raise ValueError(f"mode should be one of {', '.join(map(repr, IMAGE_MODES))}, got {mode!r}")
        if resize is not None and resize not in RESIZE_FILTERS:
            raise ValueError(f"resize should be null or one of {', '.join(map(repr, RESIZE_FILTERS))}, got {resize!r}")
        form = cls((int(size[0]), int(size[1])), mode, resize)
        if tuple(input_shape) != form.shape:
            raise ValueError(f"describes {mode} images of {size[0]}x{size[1]}, samples of shape {form.shape}, but "
                             f"the input shape is {tuple(input_shape)}")
        return form

    def to_dict(self) -> dict[str, Any]:
        """The form as ``data.json`` records it."""
        return {"size": list(self.size), "mode": self.mode, "resize": self.resize}

    @property
    def channels(self) -> int:
        """Channels of one image: 1 for "L", 3 for "RGB"."""
        return IMAGE_MODES[self.mode]

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image's shape in the raw form: (channels, height, width)."""
        return (self.channels, *self.size)

    def describe(self) -> str:
        """The raw form in words (error messages, exported metadata)."""
        h, w = self.size
        how = (f"images of another size are resized to {h}x{w} first (Pillow: image.convert({self.mode!r})"
               f".resize(({w}, {h}), Image.BILINEAR))" if self.resize else
               f"the run never resized its images: others must be brought to {h}x{w} the way the training "
               f"images were")
        return (f"{self.mode} images {h} high and {w} wide, channels first, pixel values as the image files "
                f"hold them (0..255); {how}")

    def from_pil(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images as a (B, C, H, W) uint8 batch: converted to :attr:`mode` and resized as the run did."""
        from PIL import Image

        arrays = []
        for image in images:
            image = image.convert(self.mode)
            if image.size != (self.size[1], self.size[0]):
                if self.resize is None:
                    raise ValueError(self.wrong_size(image.height, image.width))
                image = image.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
            arrays.append(array if array.ndim == 3 else array[:, :, None])
        return np.stack(arrays).transpose(0, 3, 1, 2)

    def layout(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray | torch.Tensor, bool]:
        """``x`` (one image or a batch; channels first or last; a grayscale image also without a channel
        axis) as a (B, C, H, W) batch of :attr:`size`, and whether it was one image. uint8 numpy images of
        another size are resized as the run did, where it did; any other size is a ValueError naming this one."""
        c, shape = self.channels, tuple(x.shape)
        if len(shape) == 2 and c == 1:
            batch, single, last = x[None, :, :, None], True, True
        elif len(shape) == 3 and (shape[-1] == c or shape[0] == c):
            batch, single, last = x[None], True, shape[-1] == c
        elif len(shape) == 3 and c == 1:
            batch, single, last = x[..., None], False, True
        elif len(shape) == 4 and (shape[-1] == c or shape[1] == c):
            batch, single, last = x, False, shape[-1] == c
        else:
            raise ValueError(f"expected a batch of shape (B, {c}, {self.size[0]}, {self.size[1]}), one such image, "
                             f"or either with the channels last (height, width, {c}): {self.describe()}; got an "
                             f"input of shape {shape}")
        if last:
            batch = batch.permute(0, 3, 1, 2) if isinstance(batch, torch.Tensor) else batch.transpose(0, 3, 1, 2)
        height, width = batch.shape[2:]
        if (height, width) == self.size:
            return batch, single
        if self.resize is None or not isinstance(batch, np.ndarray) or batch.dtype != np.uint8:
            raise ValueError(self.wrong_size(height, width, resizable=False))
        from PIL import Image

        images = [Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0).squeeze(-1) if c == 1
                                                       else image.transpose(1, 2, 0))) for image in batch]
        return self.from_pil(images), single

    def wrong_size(self, height: int, width: int, resizable: bool = True) -> str:
        """The error for an image of ``height`` x ``width``, naming the size to use."""
        h, w = self.size
        if self.resize is None:
            hint = f"the run never resized its images (data.image_size unset): bring them to {h}x{w} first"
        elif resizable:
            hint = ""
        else:
            hint = (f"images of another size are resized (bilinear, as the run did) from PIL images or uint8 "
                    f"arrays (0..255) only; resize to {h}x{w} first")
        return f"this ensemble takes {self.mode} images of {h}x{w} (height x width), got {height}x{width}" + \
            (f"; {hint}" if hint else "")


def pil_images(x: Any) -> tuple[list[Any], bool] | None:
    """``x`` as a list of PIL images and whether it was one, when it is a PIL image or a list or tuple of
    them; else None. Pillow is never imported here: where it is not loaded, nothing is a PIL image."""
    module = sys.modules.get("PIL.Image")
    if module is None:
        return None
    if isinstance(x, module.Image):
        return [x], True
    if isinstance(x, (list, tuple)) and x and all(isinstance(item, module.Image) for item in x):
        return list(x), False
    return None
