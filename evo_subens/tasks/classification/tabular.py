"""One's own data as arrays: a CSV file, an ``.npz`` file, a custom loader, or arrays passed in memory.

    >>> load_dataset(DataConfig(name="csv", path="cancer.csv", target="diagnosis"))
    >>> load_dataset(DataConfig(name="npz", path="data.npz"))   # arrays x, y (and x_test, y_test)
    >>> evo_subens.run("configs/tabular.yaml", data=(x, y))     # saved into the run directory as data.npz

Every route ends in :func:`~.splits.split_own_data`, so they share labels, splits and preprocessing.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ...core.config import DataConfig
from ...errors import DataError
from ...imports import import_object
from .splits import DatasetSplits, split_own_data

__all__ = ["load_csv", "load_npz", "load_custom", "as_arrays", "save_npz"]

NPZ_KEYS = ("x", "y", "x_test", "y_test")


def _existing_file(path: str | None, field: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise DataError(f"{field}: {file} does not exist")
    if not file.is_file():
        raise DataError(f"{field}: {file} is a folder; expected a file")
    return file


def _read_csv(path: Path, target: str, field: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # pandas raises parser, encoding and empty-file errors of many types
        raise DataError(f"{field}: cannot read {path} as CSV: {type(exc).__name__}: {exc}") from None
    if target not in frame.columns:
        raise DataError(f"data.target: {path} has no column {target!r}; its columns are "
                        f"{', '.join(map(repr, frame.columns[:20]))}")
    labels = frame[target]
    if labels.isna().any():
        raise DataError(f"{path}: the label column {target!r} is empty in {int(labels.isna().sum())} rows")
    features = frame.drop(columns=[target])
    if features.shape[1] == 0:
        raise DataError(f"{path}: no feature columns besides the label column {target!r}")
    text = [c for c in features.columns if not (features[c].dtype.kind in "biuf")]
    if text:
        raise DataError(f"{path}: feature columns must be numeric; {', '.join(map(repr, text[:5]))} "
                        f"{'is' if len(text) == 1 else 'are'} not (encode categories as numbers first, or read "
                        f"the file with data.name: custom and a data.loader)")
    missing = [c for c in features.columns if features[c].isna().any()]
    if missing:
        raise DataError(f"{path}: feature columns with empty cells: {', '.join(map(repr, missing[:5]))} "
                        f"(fill or drop them first)")
    return features.to_numpy(dtype=np.float32), labels.to_numpy(), [str(c) for c in features.columns]


def load_csv(cfg: DataConfig) -> DatasetSplits:
    """A CSV file with a header row: ``data.target`` is the label column, every other column a feature (their
    names, in order, are the splits' ``features``)."""
    path = _existing_file(cfg.path, "data.path")
    x, labels, columns = _read_csv(path, cfg.target, "data.path")
    test_x = test_labels = None
    if cfg.test_path is not None:
        test_file = _existing_file(cfg.test_path, "data.test_path")
        test_x, test_labels, test_columns = _read_csv(test_file, cfg.target, "data.test_path")
        if test_columns != columns:
            raise DataError(f"data.test_path: {test_file} has feature columns {test_columns[:8]}, "
                            f"{path} has {columns[:8]}; they must match, in order")
    splits = split_own_data("csv", x, labels, test_x, test_labels, cfg, str(path))
    # Recorded, so the ensemble can take rows by column name (a DataFrame in another column order).
    return dataclasses.replace(splits, features=tuple(columns))


def _read_npz(path: Path, field: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as exc:  # object arrays need pickle, which could run code: refused
        raise DataError(f"{field}: {path} holds arrays that are not plain numbers ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{field}: cannot read {path} as .npz: {exc}") from None
    return arrays


def load_npz(cfg: DataConfig) -> DatasetSplits:
    """An ``.npz`` file (``numpy.savez``) with arrays ``x`` (inputs, one row per sample) and ``y`` (labels),
    and optionally ``x_test`` and ``y_test``; ``data.test_path`` may name another file with ``x`` and ``y``."""
    path = _existing_file(cfg.path, "data.path")
    arrays = _read_npz(path, "data.path")
    if cfg.test_path is not None:
        test = _read_npz(_existing_file(cfg.test_path, "data.test_path"), "data.test_path")
        if "x_test" in arrays:
            raise DataError(f"data.test_path: {path} has its own x_test; give one test set, not two")
        _check_keys(test, f"data.test_path {cfg.test_path}", test_keys=False)
        arrays = dict(arrays, x_test=test["x"], y_test=test["y"])
    _check_keys(arrays, f"data.path {path}")
    return split_own_data("npz", arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test"), cfg,
                          str(path))


def _check_keys(arrays: Mapping[str, Any], source: str, test_keys: bool = True) -> None:
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{source}: needs arrays named x (inputs) and y (labels); it has "
                        f"{', '.join(sorted(arrays)) or 'none'}")
    if test_keys and ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{source}: x_test and y_test come together; it has only "
                        f"{'x_test' if 'x_test' in arrays else 'y_test'}")


def _numpy(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise DataError(f"in-memory data: {what} cannot be made an array ({type(exc).__name__}: {exc})") from None
    if array.dtype == object:
        raise DataError(f"in-memory data: {what} is not an array of numbers or labels (dtype object)")
    return array


def _dataset_arrays(dataset: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of a map-style torch Dataset whose items are (input, label) pairs."""
    try:
        items = [dataset[i] for i in range(len(dataset))]
    except Exception as exc:
        raise DataError(f"in-memory data: cannot read {what} as a map-style Dataset of (input, label) pairs "
                        f"({type(exc).__name__}: {exc})") from None
    if not items or not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
        raise DataError(f"in-memory data: {what} must yield (input, label) pairs")
    return (np.stack([_numpy(i[0], f"{what} inputs") for i in items]),
            np.asarray([_numpy(i[1], f"{what} labels").item() for i in items]))


def as_arrays(data: Any) -> dict[str, np.ndarray]:
    """``data`` as arrays ``x``, ``y`` (and ``x_test``, ``y_test``): from ``(x, y)``, ``(x, y, x_test,
    y_test)``, a dict of those keys, a torch Dataset of (input, label) pairs or ``(train, test)`` Datasets.
    Inputs and labels may be numpy arrays, torch tensors or lists."""
    import torch.utils.data

    def is_dataset(value: Any) -> bool:
        return isinstance(value, torch.utils.data.Dataset)

    if is_dataset(data):
        x, y = _dataset_arrays(data, "the Dataset")
        return {"x": x, "y": y}
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(map(is_dataset, data)):
        x, y = _dataset_arrays(data[0], "the training Dataset")
        x_test, y_test = _dataset_arrays(data[1], "the test Dataset")
        return {"x": x, "y": y, "x_test": x_test, "y_test": y_test}
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - set(NPZ_KEYS))
        if unknown:
            raise DataError(f"in-memory data: unknown keys {unknown}; expected {', '.join(NPZ_KEYS)}")
        _check_keys(data, "in-memory data")
        return {k: _numpy(v, k) for k, v in data.items()}
    if isinstance(data, (tuple, list)) and len(data) in (2, 4):
        return {k: _numpy(v, k) for k, v in zip(NPZ_KEYS, data)}
    raise DataError(f"in-memory data: expected (x, y), (x, y, x_test, y_test), a dict with keys x, y[, x_test, "
                    f"y_test], a torch Dataset of (input, label) pairs or (train, test) Datasets; got "
                    f"{type(data).__name__}")


def save_npz(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` that :func:`load_npz` reads back unchanged (atomically:
    a kill leaves either no file or the whole one)."""
    from ...core.rundir import atomic_write

    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def load_custom(cfg: DataConfig) -> DatasetSplits:
    """``data.loader``'s function called with ``cfg``; what it returns is read as in-memory data."""
    loader = import_object(cfg.loader, "data.loader", "function")
    try:
        data = loader(cfg)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data.loader: {cfg.loader}(cfg) raised {type(exc).__name__}: {exc}") from exc
    if isinstance(data, DatasetSplits):
        return data
    arrays = as_arrays(data)
    return split_own_data("custom", arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test"), cfg,
                          f"data.loader {cfg.loader}")
