"""One's own images: a class-per-folder tree (read with Pillow) and CIFAR-10/100's python batches.

    >>> load_dataset(DataConfig(name="imagefolder", path="flowers/train", test_path="flowers/test",
    ...                         image_size=[64, 64]))
    >>> load_dataset(DataConfig(name="cifar10", path="cifar-10-batches-py"))

Images become (channels, height, width) arrays of their pixel values; ``data.scale`` (255 by default)
brings them to [0, 1] and ``data.mean`` / ``data.std`` or ``data.standardize`` normalise them. The splits'
``image`` records that form (size, Pillow mode, whether images were resized) for ``data.json``, so the
ensemble takes PIL images and (height, width, channels) arrays and resizes them as the run did.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from ...core.config import DataConfig
from ...errors import DataError
from .splits import DatasetSplits, should_stream, split_own_data, split_streamed
from .streaming import SampleSource

__all__ = ["load_imagefolder", "load_cifar10", "load_cifar100"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


# --- image folders ---------------------------------------------------------------------------------

def _class_folders(root: Path, field: str) -> dict[str, list[Path]]:
    """Class name -> its image files (sorted), for a folder with one sub-folder per class."""
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"{field}: image folder {root} {what}")
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[folder.name] = files
    if len(classes) < 2:
        raise DataError(f"{field}: {root} must hold one sub-folder of images ({', '.join(IMAGE_SUFFIXES)}) per "
                        f"class, at least 2; found {len(classes)} with images")
    return classes


def read_image(file: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """One image as a (channels, height, width) uint8 array in Pillow ``mode``, resized (bilinear) to ``size``
    (height, width) when given; a DataError names a file Pillow cannot read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            image = image.convert(mode)
            if size is not None:
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read image {file}: {exc}") from None
    return (array if array.ndim == 3 else array[:, :, None]).transpose(2, 0, 1)


class ImageFiles(SampleSource):
    """Image files decoded with Pillow into (channels, height, width) uint8 arrays, converted to ``mode``
    and resized to ``size`` (height, width) when given; every image must come out as ``shape``."""

    decodes = True
    dtype = np.dtype(np.uint8)

    def __init__(self, files: Sequence[Path | str], mode: str, size: tuple[int, int] | None,
                 shape: tuple[int, int, int]):
        self.files = [str(f) for f in files]
        self.mode, self.size, self.shape = mode, size, tuple(shape)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape

    def read(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        for row, index in enumerate(np.asarray(indices).tolist()):
            image = read_image(Path(self.files[index]), self.mode, self.size)
            if image.shape != self.shape:
                raise DataError(f"image {self.files[index]} is {image.shape[2]}x{image.shape[1]} but the others are "
                                f"{self.shape[2]}x{self.shape[1]}; set data.image_size: [height, width] to resize all")
            out[row] = image
        return out


def _read_images(files: list[Path], mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """Every image of ``files`` decoded into one uint8 array (all must come out the size of the first)."""
    shape = read_image(files[0], mode, size).shape
    return ImageFiles(files, mode, size, shape).read(np.arange(len(files)))


def _image_mode(cfg: DataConfig, files: list[Path]) -> str:
    if cfg.channels is not None:
        return "L" if cfg.channels == 1 else "RGB"
    from PIL import Image

    def grayscale(file: Path) -> bool:
        try:
            with Image.open(file) as image:  # reads the header only
                return image.mode in GRAYSCALE_MODES
        except OSError as exc:
            raise DataError(f"cannot read image {file}: {exc}") from None

    return "L" if all(grayscale(f) for f in files) else "RGB"


def load_imagefolder(cfg: DataConfig) -> DatasetSplits:
    """``data.path``/<class>/<image files>, and the same tree at ``data.test_path`` if given (else a seeded
    test split); class labels are the folder names, in sorted order."""
    root = Path(cfg.path)
    train = _class_folders(root, "data.path")
    test = _class_folders(Path(cfg.test_path), "data.test_path") if cfg.test_path is not None else None
    files = [f for fs in train.values() for f in fs] + ([f for fs in test.values() for f in fs] if test else [])
    mode = _image_mode(cfg, files)
    size = tuple(cfg.image_size) if cfg.image_size is not None else None

    def labels_of(classes: dict[str, list[Path]]) -> np.ndarray:
        return np.array([name for name, fs in classes.items() for _ in fs])

    def files_of(classes: dict[str, list[Path]]) -> list[Path]:
        return [f for fs in classes.values() for f in fs]

    labels, test_labels = labels_of(train), labels_of(test) if test is not None else None
    shape = read_image(files_of(train)[0], mode, size).shape
    if should_stream(cfg, len(files), shape):
        source = ImageFiles(files_of(train), mode, size, shape)
        test_source = ImageFiles(files_of(test), mode, size, shape) if test is not None else None
        splits = split_streamed("imagefolder", source, labels, test_source, test_labels, cfg, str(root), images=True)
    else:
        x = _read_images(files_of(train), mode, size)
        test_x = _read_images(files_of(test), mode, size) if test is not None else None
        if test_x is not None and test_x.shape[1:] != x.shape[1:]:
            raise DataError(f"data.test_path: its images are {test_x.shape[1:]} (channels, height, width), the "
                            f"training images {x.shape[1:]}; set data.image_size to resize both")
        splits = split_own_data("imagefolder", x, labels, test_x, test_labels, cfg, str(root), images=True)
    # What the ensemble needs to take images as a user has them (PIL images, other sizes) the way these were read.
    return dataclasses.replace(splits, image={"size": list(shape[1:]), "mode": mode,
                                              "resize": "bilinear" if size is not None else None})


# --- CIFAR -----------------------------------------------------------------------------------------

class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle naming any other callable (which could
    run code) is refused."""

    # Protocol-2 pickles written by Python 3 encode byte strings with _codecs.encode (harmless).
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are read")


def _read_batch(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"data.path: CIFAR file {path} not found (the folder must hold the python version's "
                        f"files, as extracted from cifar-10-python.tar.gz / cifar-100-python.tar.gz)")
    try:
        batch = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as exc:  # corrupt, truncated or hostile pickles fail in many ways
        raise DataError(f"cannot read CIFAR file {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR file {path} holds a {type(batch).__name__}, expected a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _batch_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_batch(path)
    if "data" not in batch or label_key not in batch:
        raise DataError(f"CIFAR file {path} has no 'data' / '{label_key}' entries (it has {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"CIFAR file {path}: expected uint8 data of shape (n, 3072) and n labels, got "
                        f"{data.dtype} {data.shape} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_root(cfg: DataConfig, folder: str) -> Path:
    """``data.path`` itself, or its ``cifar-10-batches-py`` / ``cifar-100-python`` sub-folder."""
    root = Path(cfg.path)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"data.path: CIFAR folder {root} {what}")
    return root / folder if (root / folder).is_dir() else root


def _label_names(path: Path, key: str, count: int) -> tuple:
    names = _read_batch(path).get(key)
    if not isinstance(names, list) or len(names) != count:
        raise DataError(f"CIFAR file {path}: expected {count} names under '{key}'")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _cifar(name: str, cfg: DataConfig, train_files: list[str], test_file: str, meta: str, label_key: str,
           names_key: str, folder: str) -> DatasetSplits:
    root = _cifar_root(cfg, folder)
    parts = [_batch_arrays(root / f, label_key) for f in train_files]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_x, test_y = _batch_arrays(root / test_file, label_key)
    names = _label_names(root / meta, names_key, int(max(y.max(), test_y.max())) + 1)
    splits = split_own_data(name, x, y, test_x, test_y, cfg, str(root), images=True)
    # Labels are indices into the meta file's names; every class appears in the real data. The batches are
    # 32x32 RGB images, never resized.
    return dataclasses.replace(splits, classes=tuple(names[i] for i in splits.classes),
                               image={"size": [32, 32], "mode": "RGB", "resize": None})


def load_cifar10(cfg: DataConfig) -> DatasetSplits:
    """CIFAR-10's python batches: data_batch_1..5 (training pool), test_batch, batches.meta (class names)."""
    return _cifar("cifar10", cfg, [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                  "labels", "label_names", "cifar-10-batches-py")


def load_cifar100(cfg: DataConfig) -> DatasetSplits:
    """CIFAR-100's python files: train, test, meta; the 100 fine labels are the classes."""
    return _cifar("cifar100", cfg, ["train"], "test", "meta", "fine_labels", "fine_label_names",
                  "cifar-100-python")
