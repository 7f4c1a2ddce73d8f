"""Dataset registry: each dataset loads into seeded, reproducible train/validation/test splits.

The built-in datasets are here; one's own data is read by :mod:`.tabular` (csv, npz, custom loaders,
in-memory arrays) and :mod:`.images` (image folders, CIFAR)::

    >>> splits = load_dataset(DataConfig(name="digits"))
    >>> splits.input_shape, splits.num_classes
    ((1, 8, 8), 10)
    >>> splits = load_dataset(DataConfig(name="csv", path="cancer.csv", target="diagnosis"))

A new format is one ``DataConfig -> DatasetSplits`` function in ``DATASETS`` (and its name in
``tasks.classification.config.DATASET_NAMES``); for a one-off dataset, ``data.name: custom`` with
``data.loader: module:function`` needs no change here.
"""

from __future__ import annotations

import gzip
import math
import random
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...core.config import DataConfig
from ...errors import DataError
from .images import load_cifar10, load_cifar100, load_imagefolder
from .splits import DatasetSplits, Split, hold_out, split_pool
from .tabular import load_csv, load_custom, load_npz

__all__ = ["Split", "DatasetSplits", "DATASETS", "hold_out", "load_dataset", "read_idx"]


# --- mnist1d ---------------------------------------------------------------------------------------

MNIST1D_DEFAULT_SAMPLES = 5000


def load_mnist1d(cfg: DataConfig) -> DatasetSplits:
    """MNIST-1D generated locally (never downloaded): 80% training pool, 20% test, shape (1, 40)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = cfg.num_samples or MNIST1D_DEFAULT_SAMPLES
    args.seed = cfg.seed
    # make_dataset reseeds the global RNGs; restore them so loading data cannot silently change
    # the random stream of the caller (e.g. parent initialisation).
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
    pool_x = np.asarray(data["x"], dtype=np.float32)[:, None, :]
    test_x = np.asarray(data["x_test"], dtype=np.float32)[:, None, :]
    return split_pool("mnist1d", pool_x, np.asarray(data["y"]), test_x, np.asarray(data["y_test"]),
                       cfg, num_classes=10)


# --- digits ----------------------------------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.2
# Second entropy word for the test carve, so it is independent of the pool shuffle of the same seed.
_DIGITS_TEST_STREAM = 1  # (the value of splits.TEST_STREAM, which one's own data uses the same way)


def load_digits(cfg: DataConfig) -> DatasetSplits:
    """scikit-learn's 8x8 digits (bundled, no download): seeded 20% test, shape (1, 8, 8), pixels in [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng([cfg.seed, _DIGITS_TEST_STREAM]).permutation(len(y))
    n_test = int(round(DIGITS_TEST_FRACTION * len(y)))
    test_idx, pool_idx = order[:n_test], order[n_test:]
    return split_pool("digits", x[pool_idx], y[pool_idx], x[test_idx], y[test_idx], cfg,
                       num_classes=10, cap=cfg.num_samples)


# --- fashion-mnist ---------------------------------------------------------------------------------

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
_FASHION_HINT = ("install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
                 "or set data.path to a folder with the original IDX files")

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw), checking magic number, dimensions and size.

    Raises DataError naming the file when it is unreadable, malformed or truncated.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        # Sniff the gzip magic rather than trust the suffix: IDX files start with two zero bytes.
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated: header needs {header} bytes, file has {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"IDX file {path} is {state}: dimensions {shape} need {expected} bytes, "
                        f"file has {len(raw)}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(root: Path, stem: str) -> Path:
    """Path of ``stem`` in ``root``, preferring the .gz file the dataset ships as."""
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"fashion-mnist file {root / (stem + '.gz')} not found (nor the uncompressed {stem}); "
                    f"{_FASHION_HINT}")


def _read_fashion_part(root: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_idx(root, f"{part}-images-idx3-ubyte")
    labels_path = _find_idx(root, f"{part}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: expected uint8 images of shape (n, 28, 28), "
                        f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: expected {len(images)} uint8 labels, got {labels.dtype} {labels.shape}")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: labels must be in 0..9, found {int(labels.max())}")
    x = (images.astype(np.float32) / 255.0 - np.float32(FASHION_MNIST_MEAN)) / np.float32(FASHION_MNIST_STD)
    return x[:, None, :, :], labels.astype(np.int64)


def load_fashion_mnist(cfg: DataConfig) -> DatasetSplits:
    """Fashion-MNIST from local IDX files: 60k training pool, 10k test, shape (1, 28, 28), normalised."""
    root = Path(cfg.path if cfg.path is not None else FASHION_MNIST_ROOT)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"data.path: fashion-mnist folder {root} {what}; {_FASHION_HINT}")
    pool_x, pool_y = _read_fashion_part(root, "train")
    test_x, test_y = _read_fashion_part(root, "t10k")
    return split_pool("fashion-mnist", pool_x, pool_y, test_x, test_y, cfg, num_classes=10,
                       cap=cfg.num_samples)


# --- registry --------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[[DataConfig], DatasetSplits]] = {
    "mnist1d": load_mnist1d,
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
    "csv": load_csv,
    "npz": load_npz,
    "imagefolder": load_imagefolder,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "custom": load_custom,
}


def load_dataset(cfg: DataConfig) -> DatasetSplits:
    """Load the dataset ``cfg.name`` from the registry, split per ``cfg`` (a :class:`DataConfig`, e.g.
    ``load_config(path).data``): train / validation / test :class:`Split` tensors, preprocessed, with the
    input shape, class count, class labels and the preprocessing (``transform``) they went through."""
    cfg.check()
    try:
        loader = DATASETS[cfg.name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise DataError(f"unknown dataset {cfg.name!r}; known datasets: {known}") from None
    return loader(cfg)
