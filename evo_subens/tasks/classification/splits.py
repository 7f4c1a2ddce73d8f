"""Train / validation / test splits, and the preprocessing of one's own data into them.

Every split is derived from ``DataConfig.seed`` through local generators only, so the same config gives
bitwise identical splits and loading never touches the caller's global RNG state.

One's own data (csv, npz, images, a custom loader, in-memory arrays) goes through :func:`split_own_data`:
labels become class indices, a test split is carved off when the data has none, the validation split is
carved from the rest, and the inputs are preprocessed by an :class:`InputTransform` whose statistics come
from the training split only. The transform is recorded with the run, so the ensemble module applies it
itself and takes inputs as they are in the user's files.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ...core.config import DataConfig
from ...errors import DataError
from .streaming import LazyInputs, RawTransform, SampleSource, batch_slices, input_batches

__all__ = ["Split", "DatasetSplits", "InputTransform", "hold_out", "split_pool", "split_own_data",
           "split_streamed", "STREAM_ABOVE_BYTES"]

# data.stream null streams data whose float32 inputs would take more than this: below it the whole arrays
# fit comfortably and the in-memory path is faster (no per-batch decoding, no worker processes).
STREAM_ABOVE_BYTES = 2**30
# Bytes of float32 inputs per batch when a streamed split is scanned or hashed in order (DataLoader workers
# keep a few such batches in flight).
SCAN_BATCH_BYTES = 16 * 2**20


def scan_batch(sample_shape: Sequence[int]) -> int:
    """Samples per batch of an in-order scan: about :data:`SCAN_BATCH_BYTES` of float32 inputs."""
    return max(1, SCAN_BATCH_BYTES // (4 * int(np.prod(sample_shape))))


@dataclass(frozen=True)
class Split:
    """Features ``x`` (float32: a tensor, or :class:`~.streaming.LazyInputs` read batch by batch) and labels
    ``y`` (int64) of one split, each with its own storage."""

    x: torch.Tensor | LazyInputs
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"split has {self.x.shape[0]} samples but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def streamed(self) -> bool:
        """Whether the inputs are read on demand rather than held as one tensor."""
        return isinstance(self.x, LazyInputs)

    def subset(self, index: Any) -> "Split":
        """The samples at ``index`` (a slice or positions), with their own storage (streamed inputs stay
        unread)."""
        if isinstance(index, np.ndarray):
            index = torch.from_numpy(index)
        if self.streamed:
            return Split(self.x.subset(index), self.y[index].clone())
        return Split(self.x[index].clone(), self.y[index].clone())

    def input_batches(self, batch_size: int) -> "Any":
        """The inputs in order, ``batch_size`` samples at a time."""
        return input_batches(self.x, batch_slices(len(self), batch_size))


@dataclass(frozen=True)
class InputTransform:
    """``(x / scale - mean) / std``: the preprocessing from raw inputs to what the models see. ``mean`` and
    ``std`` (float32, or None) broadcast against one sample: shape (C, 1, ...) per channel, or the sample's
    shape per feature."""

    scale: float = 1.0
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.scale == 1.0 and self.mean is None:
            return np.ascontiguousarray(x, dtype=np.float32)
        # One float32 copy, then in place (the same elementwise operations): a batch of large images costs
        # its float size once, not once per step.
        out = np.array(x, dtype=np.float32, order="C")
        if self.scale != 1.0:
            out /= np.float32(self.scale)
        if self.mean is not None:
            out -= self.mean
            out /= self.std
        return out

    def to_json(self) -> dict:
        return {"scale": self.scale,
                "mean": None if self.mean is None else self.mean.tolist(),
                "std": None if self.std is None else self.std.tolist()}


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset cut into train/validation/test splits, with its per-sample shape and class count.

    ``classes``: the label of each class index (as in the data's files), None for the built-ins (0..9).
    ``transform``: how raw inputs became these splits (None: the splits are the inputs' own form).
    ``features``: the input's column names in order (csv). ``image``: the raw form of image data (size,
    Pillow mode, resizing), as :class:`evo_subens.data_info.ImageForm` records it."""

    name: str
    train: Split
    validation: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    classes: tuple | None = None
    transform: InputTransform | None = None
    features: tuple[str, ...] | None = None
    image: dict | None = None
    # Set by loaders that already read every sample in order (streamed data), so it is not read again.
    known_fingerprint: str | None = None

    @property
    def streamed(self) -> bool:
        """Whether the training inputs are read from their files batch by batch."""
        return self.train.streamed

    def fingerprint(self) -> str:
        """SHA-256 of every split's inputs and labels: the same data loads to the same fingerprint, streamed
        or in memory (the same float32 bytes are hashed in the same order)."""
        if self.known_fingerprint is not None:
            return self.known_fingerprint
        return fingerprint_of((self.train, self.validation, self.test))

    def description(self) -> dict:
        """What the run directory records (``data.json``): enough to rebuild and feed the models without the
        data, and the fingerprint that tells whether reloading the data gives what the run used."""
        return {"name": self.name, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "classes": None if self.classes is None else list(self.classes),
                "transform": None if self.transform is None else self.transform.to_json(),
                "features": None if self.features is None else list(self.features), "image": self.image,
                "sizes": {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)},
                "fingerprint": self.fingerprint()}


def fingerprint_of(splits: Sequence[Split], on_batch: Callable[[torch.Tensor], None] | None = None) -> str:
    """SHA-256 of the splits' inputs (float32 bytes) and labels, in order; ``on_batch`` sees every input
    batch of a streamed split as it is read (checks that need one pass over the data)."""
    digest = hashlib.sha256()
    for split in splits:
        if split.streamed:
            for batch in split.input_batches(scan_batch(split.x.shape[1:])):
                if on_batch is not None:
                    on_batch(batch)
                digest.update(batch.contiguous().numpy())
        else:
            digest.update(split.x.contiguous().numpy())  # hashed in place: no copy of the inputs
        digest.update(split.y.contiguous().numpy())
    return digest.hexdigest()


def hold_out(split: Split, share: float) -> tuple[Split, Split | None]:
    """``split`` cut into a part for decisions and a held-back part of ``share`` of its samples (its tail;
    validation splits are random draws of the pool, so the tail is a random subset). ``share`` 0: no
    held-back part. Each part has its own storage (see :func:`make_split`)."""
    held = int(round(share * len(split)))
    if held == 0:
        return split, None
    if held >= len(split):
        raise DataError(f"ensemble.holdout = {share} of {len(split)} validation samples leaves none to select on")
    keep = len(split) - held
    return split.subset(slice(0, keep)), split.subset(slice(keep, None))


def make_split(x: np.ndarray, y: np.ndarray) -> Split:
    # clone() gives each tensor a storage of exactly its own size: a view of a larger array would
    # drag the whole array along whenever a split is pickled to a worker process.
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).clone()
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).clone()
    return Split(xt, yt)


def _validation_count(validation_size: float, pool_size: int) -> int:
    """Number of validation samples for ``validation_size`` (fraction or whole count)."""
    v = validation_size
    is_number = isinstance(v, numbers.Real) and not isinstance(v, bool)
    if not is_number or not (0 < v < 1 or (v >= 1 and float(v).is_integer())):
        raise DataError(f"data.validation_size must be a fraction (0 < v < 1) or a whole number of "
                        f"samples (>= 1), got {v!r}")
    if v >= 1 and v >= pool_size:
        raise DataError(f"data.validation_size = {int(v)} samples must be smaller than the training "
                        f"pool ({pool_size} samples)")
    count = int(round(v * pool_size)) if v < 1 else int(v)
    if not 1 <= count < pool_size:
        raise DataError(f"data.validation_size = {v!r} leaves {count} of {pool_size} training-pool samples "
                        "for validation; both train and validation need at least one sample")
    return count


def _pool_order(pool_size: int, cfg: DataConfig, cap: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validation and training indices of a pool: shuffled with ``cfg.seed``, ``cap`` kept, validation first."""
    order = np.random.default_rng(cfg.seed).permutation(pool_size)
    if cap is not None:
        order = order[:cap]
    n_val = _validation_count(cfg.validation_size, len(order))
    return order[:n_val], order[n_val:]


def split_pool(name: str, pool_x: np.ndarray, pool_y: np.ndarray, test_x: np.ndarray,
               test_y: np.ndarray, cfg: DataConfig, num_classes: int,
               cap: int | None = None) -> DatasetSplits:
    """Shuffle the training pool with ``cfg.seed``, keep ``cap`` samples, carve validation off the front."""
    val_idx, train_idx = _pool_order(len(pool_y), cfg, cap)
    train = make_split(pool_x[train_idx], pool_y[train_idx])
    return DatasetSplits(
        name=name,
        train=train,
        validation=make_split(pool_x[val_idx], pool_y[val_idx]),
        test=make_split(test_x, test_y),
        input_shape=tuple(train.x.shape[1:]),
        num_classes=num_classes,
    )


# --- one's own data --------------------------------------------------------------------------------

# Second entropy word for carving a test split, so it is independent of the pool shuffle of the same seed.
TEST_STREAM = 1


def carve_test(size: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Test and pool indices of ``size`` samples: a seeded ``share`` for the test split."""
    order = np.random.default_rng([seed, TEST_STREAM]).permutation(size)
    n_test = int(round(share * size))
    return order[:n_test], order[n_test:]


def class_indices(labels: np.ndarray, test_labels: np.ndarray | None, source: str) -> tuple[np.ndarray, np.ndarray | None, tuple]:
    """Labels as class indices 0..K-1 in sorted label order, with the label of each index. A test label the
    training data never has is an error naming it."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"{source}: labels must be one value per sample, got shape {labels.shape}")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise DataError(f"{source}: labels are fractional or missing numbers; classification needs class "
                            f"labels (whole numbers or names)")
        labels = labels.astype(np.int64)
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"{source}: the labels hold {len(classes)} class; classification needs at least 2")
    y_test = None
    if test_labels is not None:
        test_labels = np.asarray(test_labels)
        if test_labels.dtype.kind == "f" and np.all(test_labels == np.round(test_labels)):
            test_labels = test_labels.astype(np.int64)
        unknown = sorted(set(test_labels.tolist()) - set(classes.tolist()), key=str)
        if unknown:
            raise DataError(f"{source}: the test set has labels the training data never has: "
                            f"{', '.join(map(repr, unknown[:5]))}")
        y_test = np.searchsorted(classes, test_labels)
    return y.astype(np.int64), None if y_test is None else y_test.astype(np.int64), tuple(classes.tolist())


Moments = Callable[[float], "tuple[np.ndarray, np.ndarray]"]


def _stat_axes(sample_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Axes (of a batch) statistics reduce over, and the shape they keep: one value per channel (the first
    axis of a sample) for images and signals, per feature for vectors."""
    if len(sample_shape) > 1:
        return (0,) + tuple(range(2, len(sample_shape) + 1)), (sample_shape[0],) + (1,) * (len(sample_shape) - 1)
    return (0,), tuple(sample_shape)


def array_moments(x: np.ndarray) -> Moments:
    """Per-channel (or per-feature) mean and standard deviation of ``x / scale``, from the whole array."""
    def moments(scale: float) -> tuple[np.ndarray, np.ndarray]:
        axes, stat_shape = _stat_axes(x.shape[1:])
        scaled = np.asarray(x, dtype=np.float64) / scale
        return scaled.mean(axis=axes).reshape(stat_shape), scaled.std(axis=axes).reshape(stat_shape)
    return moments


def streamed_moments(source: SampleSource, positions: np.ndarray, workers: int) -> Moments:
    """As :func:`array_moments`, read batch by batch (Chan et al.'s pairwise merge of batch moments, so
    a large mean does not cancel the variance away)."""
    def moments(scale: float) -> tuple[np.ndarray, np.ndarray]:
        axes, stat_shape = _stat_axes(source.sample_shape)
        inputs = LazyInputs(source, positions, RawTransform(np.float64), workers)
        count, mean, m2 = 0, np.zeros(stat_shape), np.zeros(stat_shape)
        for batch in inputs.batches(batch_slices(len(inputs), scan_batch(source.sample_shape) // 2)):  # float64
            values = batch.numpy() / scale
            n = values.size // int(np.prod(stat_shape))
            batch_mean = values.mean(axis=axes).reshape(stat_shape)
            batch_m2 = ((values - batch_mean[None]) ** 2).sum(axis=axes).reshape(stat_shape)
            delta, total = batch_mean - mean, count + n
            mean = mean + delta * n / total
            m2 = m2 + batch_m2 + delta ** 2 * count * n / total
            count = total
        return mean, np.sqrt(m2 / count)
    return moments


def _transform(cfg: DataConfig, sample_shape: tuple[int, ...], moments: Moments, default_scale: float,
               default_standardize: bool) -> InputTransform:
    """The preprocessing of ``cfg``; statistics (data.standardize) from the training split only."""
    scale = float(cfg.scale if cfg.scale is not None else default_scale)
    _, stat_shape = _stat_axes(tuple(sample_shape))
    if cfg.mean is not None:
        count = sample_shape[0] if sample_shape else 1
        if len(cfg.mean) != count:
            unit = "channels" if len(sample_shape) > 1 else "features"
            raise DataError(f"data.mean / data.std have {len(cfg.mean)} values but the inputs have {count} {unit} "
                            f"(sample shape {tuple(sample_shape)})")
        return InputTransform(scale, np.asarray(cfg.mean, np.float32).reshape(stat_shape),
                              np.asarray(cfg.std, np.float32).reshape(stat_shape))
    standardize = cfg.standardize if cfg.standardize is not None else default_standardize
    if not standardize:
        return InputTransform(scale)
    mean, std = moments(scale)
    # A constant feature has no spread to divide by: it is only centred.
    std = np.where(std > 0, std, 1.0)
    return InputTransform(scale, mean.astype(np.float32), std.astype(np.float32))


def should_stream(cfg: DataConfig, samples: int, sample_shape: tuple[int, ...]) -> bool:
    """``data.stream``, or when it is null whether the inputs as float32 would exceed
    :data:`STREAM_ABOVE_BYTES`."""
    if cfg.stream is not None:
        return cfg.stream
    return samples * int(np.prod(sample_shape)) * 4 > STREAM_ABOVE_BYTES


def _check_inputs(shape: tuple[int, ...], dtype: np.dtype | None, labels: int, where: str) -> None:
    """Inputs are one row of numbers per label, each with at least one feature (``dtype`` None: not known
    before reading)."""
    if len(shape) < 2 or shape[0] != labels:
        raise DataError(f"{where}: inputs must have one row per sample and at least one feature; got inputs of "
                        f"shape {tuple(shape)} for {labels} labels")
    if dtype is not None and dtype.kind not in "biuf":
        raise DataError(f"{where}: inputs must be numbers, got dtype {dtype}")


def _check_test_shape(test_shape: tuple[int, ...], shape: tuple[int, ...], where: str) -> None:
    if tuple(test_shape) != tuple(shape):
        raise DataError(f"{where}: test inputs have sample shape {tuple(test_shape)}, the training data "
                        f"{tuple(shape)}")


def _carved_test(size: int, cfg: DataConfig, where: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`carve_test` of ``size`` samples by ``cfg``, refused when too few are left on either side."""
    test_idx, pool_idx = carve_test(size, cfg.test_size, cfg.seed)
    if len(test_idx) == 0 or len(pool_idx) < 2:
        raise DataError(f"{where}: {size} samples are too few to carve a test split of data.test_size = "
                        f"{cfg.test_size}")
    return test_idx, pool_idx


def split_own_data(name: str, x: np.ndarray, labels: np.ndarray, test_x: np.ndarray | None,
                   test_labels: np.ndarray | None, cfg: DataConfig, source: str, *,
                   images: bool = False) -> DatasetSplits:
    """The splits of one's own data: class indices, a carved test split when ``test_x`` is None, validation
    carved from the pool, and the configured preprocessing (fitted on the training split)."""
    x = np.asarray(x)
    _check_inputs(x.shape, x.dtype, len(labels), source)
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise DataError(f"{source}: inputs hold NaN or infinite values ({int((~np.isfinite(x)).sum())} of them); "
                        f"fill or drop them first")
    y, y_test, classes = class_indices(labels, test_labels, source)
    if test_x is None:
        test_idx, pool_idx = _carved_test(len(y), cfg, source)
        test_x, y_test, x, y = x[test_idx], y[test_idx], x[pool_idx], y[pool_idx]
    else:
        _check_test_shape(np.asarray(test_x).shape[1:], x.shape[1:], source)
    val_idx, train_idx = _pool_order(len(y), cfg, cfg.num_samples)
    transform = _transform(cfg, x.shape[1:], array_moments(x[train_idx]), 255.0 if images else 1.0, not images)
    train = make_split(transform.apply(x[train_idx]), y[train_idx])
    return DatasetSplits(name=name, train=train,
                         validation=make_split(transform.apply(x[val_idx]), y[val_idx]),
                         test=make_split(transform.apply(test_x), y_test),
                         input_shape=tuple(train.x.shape[1:]), num_classes=len(classes), classes=classes,
                         transform=transform)


def split_streamed(name: str, source: SampleSource, labels: np.ndarray, test_source: SampleSource | None,
                   test_labels: np.ndarray | None, cfg: DataConfig, where: str, *,
                   images: bool = False) -> DatasetSplits:
    """:func:`split_own_data` for data read on demand from ``source``: the same splits, preprocessing and
    float32 inputs, but the training split stays in its files (read in batches by ``data.num_workers``
    DataLoader processes), and the validation and test splits of a source that decodes are read once into
    memory in its compact form (uint8 images). Every sample is read once here, in order, to check it and
    fingerprint the data."""
    _check_inputs((len(source), *source.sample_shape), source.dtype, len(labels), where)
    y, y_test, classes = class_indices(labels, test_labels, where)
    if test_source is None:
        test_positions, pool_positions = _carved_test(len(y), cfg, where)
        test_source, y_test, y = source, y[test_positions], y[pool_positions]
    else:
        _check_test_shape(tuple(test_source.sample_shape), tuple(source.sample_shape), where)
        test_positions, pool_positions = np.arange(len(test_source)), np.arange(len(y))
    val_idx, train_idx = _pool_order(len(y), cfg, cfg.num_samples)
    sample_shape = tuple(source.sample_shape)
    transform = _transform(cfg, sample_shape, streamed_moments(source, pool_positions[train_idx], cfg.num_workers),
                           255.0 if images else 1.0, not images)

    def split(from_source: SampleSource, positions: np.ndarray, labels: np.ndarray, keep_streamed: bool) -> Split:
        inputs = LazyInputs(from_source, positions, transform, cfg.num_workers)
        if not keep_streamed and from_source.decodes:
            inputs = inputs.in_memory()
        return Split(inputs, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).clone())

    train = split(source, pool_positions[train_idx], y[train_idx], True)
    validation = split(source, pool_positions[val_idx], y[val_idx], False)
    test = split(test_source, test_positions, y_test, False)

    def finite(batch: torch.Tensor) -> None:
        # numpy's check: torch's on a batch from a DataLoader worker grows this process's memory by each batch
        if not np.isfinite(batch.numpy()).all():
            raise DataError(f"{where}: inputs hold NaN or infinite values; fill or drop them first")

    return DatasetSplits(name=name, train=train, validation=validation, test=test, input_shape=sample_shape,
                         num_classes=len(classes), classes=classes, transform=transform,
                         known_fingerprint=fingerprint_of((train, validation, test), on_batch=finite))


def describe_preprocessing(data: DatasetSplits) -> str:
    """The preprocessing ``data`` went through, in words."""
    transform = data.transform
    if transform is None:
        return f"the {data.name} dataset's fixed preprocessing"
    steps = [f"inputs divided by {transform.scale:g}"]
    if transform.mean is not None:
        steps.append(f"then centred and scaled per {'channel' if transform.mean.ndim > 1 else 'feature'} (means "
                     f"{float(transform.mean.min()):.3g}..{float(transform.mean.max()):.3g}, standard deviations "
                     f"{float(transform.std.min()):.3g}..{float(transform.std.max()):.3g})")
    else:
        steps.append("not standardised")
    return ", ".join(steps)
