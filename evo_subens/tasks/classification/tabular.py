"""One's own data as arrays: a CSV file, an ``.npz`` file, a custom loader, or arrays passed in memory.

    >>> load_dataset(DataConfig(name="csv", path="cancer.csv", target="diagnosis"))
    >>> load_dataset(DataConfig(name="npz", path="data.npz"))   # arrays x, y (and x_test, y_test)
    >>> evo_subens.run("configs/tabular.yaml", data=(x, y))     # saved into the run directory as data.npz

Every route ends in :func:`~.splits.split_own_data`, so they share labels, splits and preprocessing.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ...core.config import DataConfig
from ...errors import DataError
from ...imports import import_object
from .splits import DatasetSplits, should_stream, split_own_data, split_streamed
from .streaming import ArraySource, SampleSource

__all__ = ["load_csv", "load_npz", "load_custom", "as_arrays", "save_npz"]

NPZ_KEYS = ("x", "y", "x_test", "y_test")


def _existing_file(path: str | None, field: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise DataError(f"{field}: {file} does not exist")
    if not file.is_file():
        raise DataError(f"{field}: {file} is a folder; expected a file")
    return file


class CsvRows(SampleSource):
    """The numeric feature columns of a CSV file's rows, parsed by pandas from the bytes of just the rows a
    batch needs (``starts`` and ``lengths``: each row's byte range, from one scan of the file)."""

    decodes = True
    dtype = np.dtype(np.float32)

    def __init__(self, path: Path | str, columns: Sequence[str], target: str, starts: np.ndarray,
                 lengths: np.ndarray):
        self.path, self.columns, self.target = str(path), list(columns), target
        self.starts, self.lengths = starts, lengths

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (len(self.columns) - 1,)

    def read(self, indices: np.ndarray) -> np.ndarray:
        import pandas as pd

        indices = np.asarray(indices)
        with open(self.path, "rb") as handle:
            rows = []
            for index in indices.tolist():
                handle.seek(int(self.starts[index]))
                rows.append(handle.read(int(self.lengths[index])))
        try:
            frame = pd.read_csv(io.BytesIO(b"\n".join(rows)), header=None, names=self.columns,
                                skip_blank_lines=False)
            return frame.drop(columns=[self.target]).to_numpy(dtype=np.float32)
        except Exception as exc:  # pandas raises parser and conversion errors of many types
            raise DataError(f"{self.path}: cannot read rows {indices[:5].tolist()}...: feature columns must hold "
                            f"numbers ({type(exc).__name__}: {exc})") from None


def _read_csv(path: Path, target: str, field: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # pandas raises parser, encoding and empty-file errors of many types
        raise DataError(f"{field}: cannot read {path} as CSV: {type(exc).__name__}: {exc}") from None
    features, labels = _checked_columns(frame, path, target)
    return features.to_numpy(dtype=np.float32), labels.to_numpy(), [str(c) for c in features.columns]


def _checked_columns(frame: Any, path: Path, target: str) -> tuple[Any, Any]:
    """A CSV frame's feature columns and label column, each checked (numeric, filled; labels filled)."""
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
    return features, labels


def _same_columns(test_file: Path, test_columns: list[str], path: Path, columns: list[str]) -> None:
    if test_columns != columns:
        raise DataError(f"data.test_path: {test_file} has feature columns {test_columns[:8]}, "
                        f"{path} has {columns[:8]}; they must match, in order")


def _row_ranges(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offset and length of each non-empty line after the header, from one pass over the file in
    chunks."""
    ends, size, chunk = [], path.stat().st_size, 16 * 2**20
    with open(path, "rb") as handle:
        for begin in range(0, size, chunk):
            block = np.frombuffer(handle.read(chunk), dtype=np.uint8)
            ends.append(np.flatnonzero(block == ord("\n")) + begin)
    newlines = np.concatenate(ends) if ends else np.empty(0, dtype=np.int64)
    if not len(newlines) or newlines[-1] != size - 1:
        newlines = np.append(newlines, size)  # a last line without its line break
    starts, lengths = newlines[:-1] + 1, np.diff(newlines) - 1
    keep = lengths > 0
    return starts[keep].astype(np.int64), lengths[keep].astype(np.int64)


def _csv_rows(path: Path, target: str, field: str,
              ranges: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[CsvRows, np.ndarray, list[str]]:
    """A CSV file as rows read on demand (``ranges``: its :func:`_row_ranges`, when already scanned), its
    labels (read in chunks: only that column) and its feature columns; the first rows are checked as the
    in-memory reader checks them all."""
    import pandas as pd

    try:
        head = pd.read_csv(path, nrows=1000)
        _checked_columns(head, path, target)
        labels = pd.concat([chunk[target] for chunk in pd.read_csv(path, usecols=[target], chunksize=2**20)],
                           ignore_index=True)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{field}: cannot read {path} as CSV: {type(exc).__name__}: {exc}") from None
    starts, lengths = ranges if ranges is not None else _row_ranges(path)
    if len(labels) != len(starts):
        raise DataError(f"{field}: {path} has {len(labels)} rows as CSV but {len(starts)} lines: a quoted value "
                        f"holds a line break, which streaming cannot seek to; set data.stream: false")
    if labels.isna().any():
        raise DataError(f"{path}: the label column {target!r} is empty in {int(labels.isna().sum())} rows")
    columns = [str(c) for c in head.columns]
    return CsvRows(path, columns, target, starts, lengths), labels.to_numpy(), [c for c in columns if c != target]


def _streamed_csv(cfg: DataConfig, path: Path, test_file: Path | None) -> DatasetSplits | None:
    """The CSV (and its test file) read row by row as batches need them, or None when data.stream says to
    load it whole (null: when its float32 features would fit under the streaming threshold)."""
    if cfg.stream is False:
        return None
    ranges = _row_ranges(path)  # one fast byte scan: the exact row count the decision needs
    with open(path, "rb") as handle:
        features = handle.readline().count(b",")
    if not should_stream(cfg, len(ranges[0]), (features,)):
        return None
    source, labels, names = _csv_rows(path, cfg.target, "data.path", ranges)
    test_source = test_labels = None
    if test_file is not None:
        test_source, test_labels, test_names = _csv_rows(test_file, cfg.target, "data.test_path")
        _same_columns(test_file, test_names, path, names)
    splits = split_streamed("csv", source, labels, test_source, test_labels, cfg, str(path))
    return dataclasses.replace(splits, features=tuple(names))


def load_csv(cfg: DataConfig) -> DatasetSplits:
    """A CSV file with a header row: ``data.target`` is the label column, every other column a feature (their
    names, in order, are the splits' ``features``). Streamed (data.stream), the file is scanned once for its
    rows' byte ranges and each batch's rows are parsed when it is read."""
    path = _existing_file(cfg.path, "data.path")
    streamed = _streamed_csv(cfg, path, _existing_file(cfg.test_path, "data.test_path")
                             if cfg.test_path is not None else None)
    if streamed is not None:
        return streamed
    x, labels, columns = _read_csv(path, cfg.target, "data.path")
    test_x = test_labels = None
    if cfg.test_path is not None:
        test_file = _existing_file(cfg.test_path, "data.test_path")
        test_x, test_labels, test_columns = _read_csv(test_file, cfg.target, "data.test_path")
        _same_columns(test_file, test_columns, path, columns)
    splits = split_own_data("csv", x, labels, test_x, test_labels, cfg, str(path))
    # Recorded, so the ensemble can take rows by column name (a DataFrame in another column order).
    return dataclasses.replace(splits, features=tuple(columns))


def _read_npz(path: Path, field: str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in (archive.files if keys is None else keys)}
    except ValueError as exc:  # object arrays need pickle, which could run code: refused
        raise DataError(f"{field}: {path} holds arrays that are not plain numbers ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{field}: cannot read {path} as .npz: {exc}") from None
    return arrays


def map_npz_member(path: Path, key: str) -> np.memmap | None:
    """Array ``key`` of the ``.npz`` file ``path`` memory-mapped where it lies in the archive (read-only),
    or None when the member is compressed (``numpy.savez_compressed``) and so cannot be mapped."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as handle:
            handle.seek(info.header_offset)
            local = handle.read(30)  # the member's local header: its name and extra field lengths at 26..29
            name_length, extra_length = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            handle.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(handle)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(handle) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(handle))
            offset = handle.tell()
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot map array {key} of {path}: {exc}") from None
    if dtype.hasobject:
        raise DataError(f"{path}: array {key} holds objects, not plain numbers")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _test_arrays(cfg: DataConfig, path: Path, keys: Any) -> tuple[Path, str, str] | None:
    """Where an npz run's test arrays are: (file, inputs key, labels key), or None when the test split is
    carved from the data; ``keys``: the arrays of ``path``."""
    if cfg.test_path is not None:
        if "x_test" in keys:
            raise DataError(f"data.test_path: {path} has its own x_test; give one test set, not two")
        return _existing_file(cfg.test_path, "data.test_path"), "x", "y"
    return (path, "x_test", "y_test") if "x_test" in keys else None


def _streamed_npz(cfg: DataConfig, path: Path) -> DatasetSplits | None:
    """The npz data memory-mapped (its ``x`` arrays stay on disk), or None when it is not to be streamed
    (data.stream false, or null and small) or, with data.stream null, cannot be (compressed)."""
    if cfg.stream is False:
        return None
    with np.load(path, allow_pickle=False) as archive:
        keys = {k[:-4] if k.endswith(".npy") else k for k in archive.files}
    _check_keys(dict.fromkeys(keys), f"data.path {path}")
    x = map_npz_member(path, "x")
    if x is None:
        if cfg.stream:
            raise DataError(f"data.stream: {path} stores x compressed (numpy.savez_compressed), which cannot be "
                            f"memory-mapped; save it with numpy.savez, or set data.stream: false")
        return None
    if not should_stream(cfg, len(x), x.shape[1:]):
        return None
    test = _test_arrays(cfg, path, keys)
    test_source = test_y = None
    if test is not None:
        file, x_key, y_key = test
        test_x = map_npz_member(file, x_key)
        if test_x is None:
            raise DataError(f"data.stream: the test inputs of {file} are stored compressed, which cannot be "
                            f"memory-mapped; save them with numpy.savez, or set data.stream: false")
        test_source = ArraySource(test_x)
        test_y = _read_npz(file, "data.test_path" if file != path else "data.path", keys=(y_key,))[y_key]
    y = _read_npz(path, "data.path", keys=("y",))["y"]
    return split_streamed("npz", ArraySource(x), y, test_source, test_y, cfg, str(path))


def load_npz(cfg: DataConfig) -> DatasetSplits:
    """An ``.npz`` file (``numpy.savez``) with arrays ``x`` (inputs, one row per sample) and ``y`` (labels),
    and optionally ``x_test`` and ``y_test``; ``data.test_path`` may name another file with ``x`` and ``y``.
    Streamed (data.stream), ``x`` is memory-mapped where it lies in the file: only labels are read whole."""
    path = _existing_file(cfg.path, "data.path")
    try:
        streamed = _streamed_npz(cfg, path)
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"data.path: cannot read {path} as .npz: {exc}") from None
    if streamed is not None:
        return streamed
    arrays = _read_npz(path, "data.path")
    test = _test_arrays(cfg, path, arrays)
    if test is not None and test[0] != path:
        other = _read_npz(test[0], "data.test_path")
        _check_keys(other, f"data.test_path {cfg.test_path}", test_keys=False)
        arrays = dict(arrays, x_test=other["x"], y_test=other["y"])
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
    where = f"in-memory data: {what}"
    try:
        count = len(dataset)
    except TypeError as exc:  # an IterableDataset has no length and no items by index
        raise DataError(f"{where} must be a map-style Dataset of (input, label) pairs ({exc})") from None
    items = [_dataset_item(dataset, i, where) for i in range(count)]
    if not items:
        raise DataError(f"{where} must yield (input, label) pairs; it is empty")
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


def _dataset_item(dataset: Any, index: int, what: str) -> tuple[Any, Any]:
    """Item ``index`` of a map-style Dataset, checked to be an (input, label) pair."""
    try:
        item = dataset[index]
    except Exception as exc:
        raise DataError(f"{what}: reading item {index} raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(f"{what}: item {index} is not an (input, label) pair")
    return item[0], item[1]


def dataset_input(dataset: Any, index: int, what: str) -> np.ndarray:
    """The input of item ``index`` of a map-style Dataset of (input, label) pairs, as an array."""
    return _numpy(_dataset_item(dataset, index, what)[0], f"{what} item {index} input")


def _dataset_labels(dataset: Any, what: str) -> np.ndarray:
    """Every label of a Dataset, from its ``targets`` (the torchvision convention) when it has them, else
    read item by item (each input is dropped as soon as it is read)."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        labels = _numpy(targets, f"{what} targets")
        if len(labels) != len(dataset):
            raise DataError(f"{what}: {len(labels)} targets for {len(dataset)} items")
        return labels
    return np.asarray([_numpy(_dataset_item(dataset, i, what)[1], f"{what} item {i} label").item()
                       for i in range(len(dataset))])


class DatasetSource(SampleSource):
    """A map-style torch ``Dataset`` of (input, label) pairs, read item by item; only the items of a batch
    are ever held."""

    decodes = True

    def __init__(self, dataset: Any, sample_shape: tuple[int, ...], what: str):
        self.dataset, self.shape, self.what = dataset, tuple(sample_shape), what

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape

    def read(self, indices: np.ndarray) -> np.ndarray:
        rows = [dataset_input(self.dataset, i, self.what) for i in np.asarray(indices).tolist()]
        for i, row in zip(np.asarray(indices).tolist(), rows):
            if row.shape != self.shape:
                raise DataError(f"{self.what}: item {i} has input shape {row.shape}, item 0 has {self.shape}")
        return np.stack(rows) if rows else np.empty((0, *self.shape), dtype=np.float32)


def _streamed_datasets(data: Any, cfg: DataConfig) -> DatasetSplits | None:
    """A Dataset (or (train, test) Datasets) the loader returned, read item by item as batches need them; None
    for anything else, or when data.stream is false (or null and the inputs are small)."""
    import torch.utils.data

    def is_dataset(value: Any) -> bool:
        return isinstance(value, torch.utils.data.Dataset) and hasattr(value, "__len__")

    pair = isinstance(data, (tuple, list)) and len(data) == 2 and all(map(is_dataset, data))
    if cfg.stream is False or not (is_dataset(data) or pair):
        return None
    train, test = (data[0], data[1]) if pair else (data, None)
    what = f"data.loader {cfg.loader}"
    if len(train) == 0:
        raise DataError(f"{what}: the Dataset is empty")
    shape = dataset_input(train, 0, what).shape
    if not should_stream(cfg, len(train) + (len(test) if test is not None else 0), shape):
        return None
    source = DatasetSource(train, shape, what)
    test_source = DatasetSource(test, shape, f"{what} (test)") if test is not None else None
    return split_streamed("custom", source, _dataset_labels(train, what), test_source,
                          _dataset_labels(test, f"{what} (test)") if test is not None else None, cfg, what)


def load_custom(cfg: DataConfig) -> DatasetSplits:
    """``data.loader``'s function called with ``cfg``; what it returns is read as in-memory data, or, for
    a torch Dataset that data.stream says to stream, item by item as batches need it (never all at once)."""
    loader = import_object(cfg.loader, "data.loader", "function")
    try:
        data = loader(cfg)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data.loader: {cfg.loader}(cfg) raised {type(exc).__name__}: {exc}") from exc
    if isinstance(data, DatasetSplits):
        return data
    streamed = _streamed_datasets(data, cfg)
    if streamed is not None:
        return streamed
    arrays = as_arrays(data)
    return split_own_data("custom", arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test"), cfg,
                          f"data.loader {cfg.loader}")
