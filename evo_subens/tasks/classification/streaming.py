"""Inputs read when a batch needs them: data larger than memory, streamed from where it lives.

A streamed split's ``x`` is a :class:`LazyInputs`: a :class:`SampleSource` (a memory-mapped array here; an
image folder's files in :mod:`.images`, a CSV file's rows and the user's torch ``Dataset`` in :mod:`.tabular`),
the positions of the split's samples in it, and the
preprocessing (:class:`~.splits.InputTransform`). Indexing it (``x[a:b]``, ``x[index]``) reads and
preprocesses just those samples; :func:`input_batches` reads a whole sequence of batches through
``torch.utils.data.DataLoader`` worker processes when the source must decode (images, Datasets).

A batch is the same float32 numbers whichever way it is read (the transform is elementwise), so a streamed
run gives the same results as the in-memory path on data small enough for both.

    >>> inputs = LazyInputs(ArraySource(np.load("x.npy", mmap_mode="r")), np.arange(1000), InputTransform())
    >>> inputs[0:256].shape
    torch.Size([256, ...])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from ...errors import DataError

__all__ = ["SampleSource", "ArraySource", "RawTransform", "LazyInputs", "batch_slices", "input_batches"]


def batch_slices(length: int, size: int) -> list[slice]:
    """``length`` samples in order, ``size`` at a time."""
    return [slice(begin, begin + size) for begin in range(0, length, size)]


class SampleSource(ABC):
    """Raw samples by index: ``read(indices)`` stacks them into one array (uint8 images, float features)."""

    #: whether reading costs decoding work worth spreading over DataLoader worker processes
    decodes = False
    #: the dtype ``read`` returns, where it is known before reading (None: whatever the items hold)
    dtype: np.dtype | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]: ...

    @abstractmethod
    def read(self, indices: np.ndarray) -> np.ndarray: ...


class ArraySource(SampleSource):
    """An array in memory or a ``numpy.memmap``. A memory-mapped one pickles as its file, offset and shape
    (Ray actors and DataLoader workers map the same file, so its pages are cached once per node)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def read(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[indices])

    def __getstate__(self) -> dict:
        array = self.array
        if isinstance(array, np.memmap) and array.filename is not None:
            return {"memmap": (array.filename, array.offset, array.dtype.str, array.shape)}
        return {"array": array}

    def __setstate__(self, state: dict) -> None:
        if "memmap" in state:
            filename, offset, dtype, shape = state["memmap"]
            self.array = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=tuple(shape))
        else:
            self.array = state["array"]


class RawTransform:
    """No preprocessing: the source's samples as they are read (``dtype``: cast to it)."""

    def __init__(self, dtype: np.dtype | type | None = None):
        self.dtype = dtype

    def apply(self, raw: np.ndarray) -> np.ndarray:
        return np.asarray(raw, dtype=self.dtype)


class LazyInputs:
    """The float32 inputs of one split, read from ``source`` at ``positions`` and preprocessed by
    ``transform`` when indexed; ``workers`` DataLoader processes decode batch sequences (sources that
    decode only). Read-only: it stands where a split's input tensor would."""

    def __init__(self, source: SampleSource, positions: np.ndarray, transform: Any, workers: int = 0,
                 device: torch.device | str = "cpu"):
        self.source = source
        self.positions = np.asarray(positions, dtype=np.int64)
        self.transform = transform
        self.workers = workers
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.source.sample_shape))

    def _positions(self, index: Any) -> np.ndarray:
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        return self.positions[index]

    def read(self, index: Any) -> torch.Tensor:
        """The preprocessed float32 inputs at ``index`` (a slice, positions within this split, or one
        position: one sample), on CPU."""
        positions = self._positions(index)
        raw = self.source.read(np.atleast_1d(positions))
        inputs = torch.from_numpy(self.transform.apply(raw))
        return inputs[0] if np.ndim(positions) == 0 else inputs

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.read(index).to(self.device)

    def subset(self, index: Any) -> "LazyInputs":
        """The samples at ``index`` of this split, still unread."""
        return LazyInputs(self.source, self._positions(index), self.transform, self.workers, self.device)

    def to(self, device: torch.device | str, **_: Any) -> "LazyInputs":
        """The same inputs, whose batches arrive on ``device``."""
        return LazyInputs(self.source, self.positions, self.transform, self.workers, device)

    def in_memory(self) -> "LazyInputs":
        """These inputs read once into memory in the source's own compact form (uint8 images stay uint8:
        a quarter of their float32 size), preprocessed batch by batch when indexed."""
        raw = LazyInputs(self.source, self.positions, RawTransform(), self.workers)
        slices = batch_slices(len(self), 1024)
        array = np.empty((0, *self.source.sample_shape), dtype=self.source.dtype or np.uint8)
        for rows, batch in zip(slices, raw.batches(slices)):
            if rows.start == 0:  # filled in place: no second copy of the whole split while it is read
                array = np.empty((len(self), *batch.shape[1:]), dtype=batch.numpy().dtype)
            array[rows] = batch.numpy()
        return LazyInputs(ArraySource(array), np.arange(len(self)), self.transform, 0, self.device)

    def batches(self, index_batches: Iterable[Any]) -> Iterator[torch.Tensor]:
        """The inputs of each batch of ``index_batches`` (slices or positions; any iterable, consumed
        lazily), in order; read ahead by DataLoader worker processes when the source decodes and
        ``workers`` > 0."""
        if not (self.source.decodes and self.workers > 0):
            for index in index_batches:
                yield self[index]
            return
        loader = torch.utils.data.DataLoader(_Reader(self), batch_sampler=_Positions(index_batches, len(self)),
                                             collate_fn=_as_is, num_workers=self.workers)
        for batch in loader:
            if isinstance(batch, _Failure):
                raise DataError(batch.message)  # the reader's own message, not a worker's traceback
            yield batch.to(self.device)

    def __repr__(self) -> str:
        return (f"LazyInputs({type(self.source).__name__}, {len(self)} samples of shape "
                f"{tuple(self.source.sample_shape)}, workers={self.workers})")


class _Reader(torch.utils.data.Dataset):
    """What a DataLoader worker runs: reads and preprocesses one batch of a LazyInputs at a time."""

    def __init__(self, inputs: LazyInputs):
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitems__(self, index: list[int]) -> "torch.Tensor | _Failure":
        try:
            return self.inputs.read(np.asarray(index, dtype=np.int64))
        except DataError as exc:
            return _Failure(str(exc))


class _Failure:
    """A DataError raised in a worker process, sent back as data so the reading process raises it as is."""

    def __init__(self, message: str):
        self.message = message


class _Positions:
    """A batch sampler over an iterable of slices or position arrays, drawn lazily."""

    def __init__(self, index_batches: Iterable[Any], length: int):
        self.index_batches, self.length = index_batches, length

    def __iter__(self) -> Iterator[list[int]]:
        for index in self.index_batches:
            if isinstance(index, slice):
                yield list(range(*index.indices(self.length)))
            else:
                yield np.asarray(index).tolist()


def _as_is(batch: torch.Tensor) -> torch.Tensor:
    return batch


def input_batches(x: torch.Tensor | LazyInputs, index_batches: Iterable[Any]) -> Iterator[torch.Tensor]:
    """``x[index]`` for each index in ``index_batches``: tensors are indexed directly, lazy inputs read (and
    decoded by their workers) batch by batch."""
    if isinstance(x, LazyInputs):
        return x.batches(index_batches)
    return (x[index] for index in index_batches)
