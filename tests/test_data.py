"""Tests of the dataset registry: shapes, dtypes, split determinism/disjointness, IDX parsing, errors."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from evo_subens.core.config import DataConfig
from evo_subens.tasks.classification.config import DATASET_NAMES
from evo_subens.tasks.classification.data import (DATASETS, FASHION_MNIST_MEAN, FASHION_MNIST_ROOT, FASHION_MNIST_STD,
                             DatasetSplits, Split, load_dataset, read_idx)
from evo_subens.errors import DataError

N_TRAIN_FILE, N_TEST_FILE = 60, 20


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzip when the name ends in .gz, unless ``compress`` says otherwise)."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def unique_images(n: int, offset: int) -> np.ndarray:
    """``n`` uint8 28x28 images, each made unique by its index (offset + i) in the first two pixels."""
    rng = np.random.default_rng(offset)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    ids = np.arange(offset, offset + n)
    images[:, 0, 0], images[:, 0, 1] = ids % 256, ids // 256
    return images


def image_id(x: torch.Tensor) -> int:
    """Recover the id written by ``unique_images`` from a normalised sample of shape (1, 28, 28)."""
    pixels = torch.round((x[0, 0, :2] * FASHION_MNIST_STD + FASHION_MNIST_MEAN) * 255).long()
    return int(pixels[0] + 256 * pixels[1])


@pytest.fixture()
def fashion_root(tmp_path: Path) -> Path:
    """A small fake Fashion-MNIST folder in the original IDX .gz format: ids 0..59 train, 1000..1019 test."""
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", unique_images(N_TRAIN_FILE, 0))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", (np.arange(N_TRAIN_FILE) % 10).astype(np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", unique_images(N_TEST_FILE, 1000))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", (np.arange(N_TEST_FILE) % 10).astype(np.uint8))
    return tmp_path


def fashion(root: Path, **kwargs) -> DatasetSplits:
    return load_dataset(DataConfig(name="fashion-mnist", path=str(root), **kwargs))


def mnist1d(**kwargs) -> DatasetSplits:
    kwargs.setdefault("num_samples", 1000)
    return load_dataset(DataConfig(name="mnist1d", **kwargs))


def splits_of(data: DatasetSplits) -> dict[str, Split]:
    return {"train": data.train, "validation": data.validation, "test": data.test}


def assert_identical(a: DatasetSplits, b: DatasetSplits) -> None:
    assert a.input_shape == b.input_shape and a.num_classes == b.num_classes
    for (name, sa), sb in zip(splits_of(a).items(), splits_of(b).values()):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y), name


def row_keys(split: Split) -> list[bytes]:
    return [row.numpy().tobytes() for row in split.x]


# --- shapes and dtypes -----------------------------------------------------------------------------

EXPECTED = {
    "mnist1d": ((1, 40), (640, 160, 200)),
    "digits": ((1, 8, 8), (1150, 288, 359)),
    "fashion-mnist": ((1, 28, 28), (48, 12, N_TEST_FILE)),  # the small fake IDX files below
}


def test_registry_covers_config_choices() -> None:
    assert set(DATASETS) == set(DATASET_NAMES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dataset_shapes_and_dtypes(name: str, fashion_root: Path) -> None:
    kwargs = {"mnist1d": {"num_samples": 1000}, "digits": {}, "fashion-mnist": {"path": str(fashion_root)}}
    data = load_dataset(DataConfig(name=name, **kwargs[name]))
    input_shape, sizes = EXPECTED[name]
    assert data.name == name
    assert data.input_shape == input_shape
    assert data.num_classes == 10
    assert (len(data.train), len(data.validation), len(data.test)) == sizes
    for split_name, split in splits_of(data).items():
        assert split.x.shape == (len(split), *input_shape), split_name
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.is_contiguous() and split.y.is_contiguous()
        # Own storage: pickling a split must not ship a larger parent array.
        assert split.x.untyped_storage().nbytes() == split.x.numel() * 4
        assert split.y.untyped_storage().nbytes() == split.y.numel() * 8
        assert int(split.y.min()) >= 0 and int(split.y.max()) < data.num_classes
        assert torch.isfinite(split.x).all()


def test_split_pickles_compactly() -> None:
    data = mnist1d()
    blob = pickle.dumps(data.validation)
    assert len(blob) < data.validation.x.numel() * 4 * 1.5 + 10_000


def test_digits_pixels_in_unit_range() -> None:
    data = load_dataset(DataConfig(name="digits"))
    assert float(data.train.x.min()) == 0.0 and float(data.train.x.max()) == 1.0


@pytest.mark.slow
@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_files() -> None:
    data = load_dataset(DataConfig(name="fashion-mnist", validation_size=5000))
    assert (len(data.train), len(data.validation), len(data.test)) == (55000, 5000, 10000)
    assert data.input_shape == (1, 28, 28)
    assert abs(float(data.train.x.mean())) < 0.05 and abs(float(data.train.x.std()) - 1) < 0.05
    assert Counter(data.test.y.tolist()) == {c: 1000 for c in range(10)}


# --- splits ----------------------------------------------------------------------------------------

def test_fashion_splits_disjoint_and_test_untouched(fashion_root: Path) -> None:
    data = fashion(fashion_root)
    train_ids = {image_id(x) for x in data.train.x}
    val_ids = {image_id(x) for x in data.validation.x}
    assert len(train_ids) == len(data.train) and len(val_ids) == len(data.validation)
    assert not train_ids & val_ids
    assert train_ids | val_ids == set(range(N_TRAIN_FILE))
    # The test split is the t10k file, in file order, never mixed into train/validation.
    assert [image_id(x) for x in data.test.x] == list(range(1000, 1000 + N_TEST_FILE))
    assert data.test.y.tolist() == [i % 10 for i in range(N_TEST_FILE)]
    # Labels travel with their images.
    for split in (data.train, data.validation):
        assert all(int(y) == image_id(x) % 10 for x, y in zip(split.x, split.y))


def test_fashion_normalisation(fashion_root: Path) -> None:
    data = fashion(fashion_root)
    raw = unique_images(N_TEST_FILE, 1000).astype(np.float32)
    expected = (raw / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(data.test.x[:, 0], torch.from_numpy(expected))


@pytest.mark.parametrize("name", ["mnist1d", "digits"])
def test_splits_disjoint_and_cover_pool(name: str) -> None:
    data = mnist1d() if name == "mnist1d" else load_dataset(DataConfig(name="digits"))
    keys = {split_name: row_keys(split) for split_name, split in splits_of(data).items()}
    if name == "mnist1d":  # continuous samples: every row is unique, so overlap means a leaked index
        sets = {k: set(v) for k, v in keys.items()}
        assert all(len(sets[k]) == len(keys[k]) for k in keys)
        assert not sets["train"] & sets["validation"]
        assert not sets["train"] & sets["test"]
        assert not sets["validation"] & sets["test"]
    else:  # digits repeats some images: check the splits are a permutation of the whole dataset
        from sklearn.datasets import load_digits
        full = (load_digits().data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
        everything = Counter(keys["train"] + keys["validation"] + keys["test"])
        assert everything == Counter(row.tobytes() for row in full)


@pytest.mark.parametrize("name", [pytest.param("mnist1d", marks=pytest.mark.slow), "digits", "fashion-mnist"])
def test_splits_deterministic_per_seed(name: str, fashion_root: Path) -> None:
    def load(seed: int) -> DatasetSplits:
        if name == "mnist1d":
            return mnist1d(seed=seed)
        if name == "fashion-mnist":
            return fashion(fashion_root, seed=seed)
        return load_dataset(DataConfig(name=name, seed=seed))

    first, again, other = load(0), load(0), load(1)
    assert_identical(first, again)
    assert not torch.equal(first.train.x, other.train.x)
    assert not torch.equal(first.validation.x, other.validation.x)
    if name == "fashion-mnist":  # the test split comes from its own file, whatever the seed
        assert torch.equal(first.test.x, other.test.x)


@pytest.mark.parametrize(("validation_size", "sizes"),
                         [(0.25, (45, 15)), (0.5, (30, 30)), (7, (53, 7)), (7.0, (53, 7)), (59, (1, 59))])
def test_validation_size(fashion_root: Path, validation_size: float, sizes: tuple[int, int]) -> None:
    data = fashion(fashion_root, validation_size=validation_size)
    assert (len(data.train), len(data.validation), len(data.test)) == (*sizes, N_TEST_FILE)


@pytest.mark.parametrize("validation_size", [60, 100, 2.5, 0.001, 0.999, 0, -1])
def test_bad_validation_size(fashion_root: Path, validation_size: float) -> None:
    with pytest.raises(DataError, match="data.validation_size"):
        fashion(fashion_root, validation_size=validation_size)


def test_num_samples_caps_training_pool(fashion_root: Path) -> None:
    data = fashion(fashion_root, num_samples=30)
    assert (len(data.train), len(data.validation), len(data.test)) == (24, 6, N_TEST_FILE)
    digits = load_dataset(DataConfig(name="digits", num_samples=100, validation_size=10))
    assert (len(digits.train), len(digits.validation), len(digits.test)) == (90, 10, 359)


def test_mnist1d_num_samples() -> None:
    data = mnist1d(num_samples=500)
    assert (len(data.train), len(data.validation), len(data.test)) == (320, 80, 100)


def test_mnist1d_keeps_global_rng_state() -> None:
    random.seed(5)
    np.random.seed(7)
    torch.manual_seed(123)
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    mnist1d(num_samples=200)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)


# --- errors ----------------------------------------------------------------------------------------

def test_unknown_dataset_lists_known() -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar'") as err:
        load_dataset(DataConfig(name="cifar"))
    for name in DATASETS:
        assert name in str(err.value)


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        fashion(missing)
    assert str(missing) in str(err.value) and "dataset-fashion-mnist" in str(err.value)


def test_missing_file(fashion_root: Path) -> None:
    (fashion_root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        fashion(fashion_root)
    assert str(fashion_root / "t10k-labels-idx1-ubyte.gz") in str(err.value)
    assert "dataset-fashion-mnist" in str(err.value)


def test_uncompressed_files_accepted(fashion_root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    raw_root = tmp_path_factory.mktemp("raw")
    for gz in fashion_root.glob("*.gz"):
        (raw_root / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    assert_identical(fashion(fashion_root), fashion(raw_root))


def test_truncated_idx_in_dataset(fashion_root: Path) -> None:
    path = fashion_root / "train-images-idx3-ubyte.gz"
    payload = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(payload[:-100]))
    with pytest.raises(DataError, match="truncated") as err:
        fashion(fashion_root)
    assert str(path) in str(err.value)


def test_mismatched_labels(fashion_root: Path) -> None:
    path = write_idx(fashion_root / "train-labels-idx1-ubyte.gz", np.zeros(N_TRAIN_FILE - 1, np.uint8))
    with pytest.raises(DataError, match="labels") as err:
        fashion(fashion_root)
    assert str(path) in str(err.value)


# --- read_idx --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("type_code", "dtype"), [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16),
                                                  (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_roundtrip(tmp_path: Path, type_code: int, dtype: type, suffix: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / f"a-idx3{suffix}", array, type_code)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable


def test_read_idx_sniffs_compression(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "raw.gz", array, compress=False)), array)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "packed", array, compress=True)), array)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


BAD_IDX = {
    "empty": (b"", "not an IDX file"),
    "bad magic": (b"\x01\x02\x08\x01" + bytes(8), "not an IDX file"),
    "unknown type": (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "not an IDX file"),
    "zero dims": (b"\x00\x00\x08\x00", "not an IDX file"),
    "short header": (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated"),
    "truncated data": (_idx_bytes(np.zeros((5, 4, 4)))[:-1], "truncated"),
    "trailing data": (_idx_bytes(np.zeros((5, 4, 4))) + b"\x00", "longer than its header"),
}


@pytest.mark.parametrize("case", sorted(BAD_IDX))
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_malformed(tmp_path: Path, case: str, compress: bool) -> None:
    payload, message = BAD_IDX[case]
    path = tmp_path / f"bad-{case.replace(' ', '-')}.gz"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    with pytest.raises(DataError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("damage", ["cut gzip", "corrupt gzip"])
def test_read_idx_broken_gzip(tmp_path: Path, damage: str) -> None:
    packed = gzip.compress(_idx_bytes(np.arange(4000).reshape(10, 20, 20) % 251))
    if damage == "cut gzip":
        packed = packed[: len(packed) // 2]
    else:
        packed = packed[:20] + bytes(b ^ 0xFF for b in packed[20:40]) + packed[40:]
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(packed)
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent-idx1-ubyte.gz"
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert str(path) in str(err.value)
