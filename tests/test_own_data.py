"""One's own data: CSV, NPZ, image folders and CIFAR batches written in their real formats, custom loaders,
in-memory arrays, the configured preprocessing, user architectures and a loaded parent's fit check."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from evo_subens.core.config import DataConfig, config_from_dict
from evo_subens.errors import ConfigError, DataError
from evo_subens.tasks.classification.data import load_dataset
from evo_subens.tasks.classification.models import build_model
from evo_subens.tasks.classification.tabular import as_arrays
from evo_subens.tasks.classification.task import ClassificationTask
from evo_subens.core.config import ModelConfig

from conftest import tiny_dict


def write_csv(path: Path, n: int = 200, seed: int = 0, offset: float = 0.0) -> pd.DataFrame:
    """Two informative features (far from zero mean and unit scale), one constant, string labels."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n)
    frame = pd.DataFrame({"size": 100 + 30 * label + rng.normal(0, 3, n) + offset,
                          "weight": 5 * label + rng.normal(0, 1, n), "constant": np.full(n, 7.0),
                          "kind": np.array(["apple", "banana", "cherry"])[label]})
    frame.to_csv(path, index=False)
    return frame


def csv_config(path: Path, **kwargs) -> DataConfig:
    return DataConfig(name="csv", path=str(path), target="kind", **kwargs)


# --- CSV -------------------------------------------------------------------------------------------

def test_csv_loads_with_named_classes_and_training_statistics(tmp_path: Path) -> None:
    write_csv(tmp_path / "fruit.csv")
    data = load_dataset(csv_config(tmp_path / "fruit.csv"))
    assert data.classes == ("apple", "banana", "cherry") and data.num_classes == 3
    assert data.input_shape == (3,)
    assert len(data.train) + len(data.validation) + len(data.test) == 200
    assert len(data.test) == 40  # data.test_size 0.2, carved before validation
    # Standardised with the training split's own statistics; a constant column is only centred.
    assert torch.allclose(data.train.x.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(data.train.x.std(0, unbiased=False), torch.tensor([1.0, 1.0, 0.0]), atol=1e-4)
    # Reproducible, and the recorded transform maps the raw file values to the split values.
    again = load_dataset(csv_config(tmp_path / "fruit.csv"))
    assert again.fingerprint() == data.fingerprint()
    raw = pd.read_csv(tmp_path / "fruit.csv").drop(columns=["kind"]).to_numpy(np.float32)
    transformed = data.transform.apply(raw)
    rows = {row.tobytes() for row in transformed}
    assert all(row.numpy().tobytes() in rows for row in data.test.x)


def test_csv_seed_changes_the_split_and_splits_are_disjoint(tmp_path: Path) -> None:
    write_csv(tmp_path / "fruit.csv")
    a = load_dataset(csv_config(tmp_path / "fruit.csv", standardize=False))
    b = load_dataset(csv_config(tmp_path / "fruit.csv", standardize=False, seed=1))
    assert a.fingerprint() != b.fingerprint()
    keys = [{tuple(r.tolist()) for r in s.x} for s in (a.train, a.validation, a.test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert float(a.train.x[:, 0].min()) > 50  # not standardised: the raw values


def test_csv_test_path_and_unknown_test_labels(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", n=150)
    write_csv(tmp_path / "test.csv", n=30, seed=1)
    data = load_dataset(csv_config(tmp_path / "train.csv", test_path=str(tmp_path / "test.csv")))
    assert len(data.test) == 30 and len(data.train) + len(data.validation) == 150
    frame = pd.read_csv(tmp_path / "test.csv")
    frame.loc[0, "kind"] = "durian"
    frame.to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(DataError, match="durian"):
        load_dataset(csv_config(tmp_path / "train.csv", test_path=str(tmp_path / "test.csv")))


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.rename(columns={"kind": "fruit"}), "no column 'kind'; its columns are 'size', 'weight'"),
    (lambda f: f.assign(colour="red"), "'colour' is not"),
    (lambda f: f.assign(size=f["size"].where(f.index != 3)), "empty cells: 'size'"),
])
def test_csv_errors_name_the_column(tmp_path: Path, edit, message: str) -> None:
    frame = write_csv(tmp_path / "fruit.csv")
    edit(frame).to_csv(tmp_path / "fruit.csv", index=False)
    with pytest.raises(DataError, match=message):
        load_dataset(csv_config(tmp_path / "fruit.csv"))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.path: .*nothere.csv does not exist"):
        load_dataset(csv_config(tmp_path / "nothere.csv"))


# --- NPZ -------------------------------------------------------------------------------------------

def test_npz_with_own_test_set(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(100, 2, 5)).astype(np.float32), rng.integers(0, 2, 100)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:10], y_test=y[:10])
    data = load_dataset(DataConfig(name="npz", path=str(tmp_path / "d.npz"), validation_size=20))
    assert data.input_shape == (2, 5) and data.classes == (0, 1)
    assert (len(data.train), len(data.validation), len(data.test)) == (80, 20, 10)
    assert data.transform.mean.shape == (2, 1)  # per channel of a (channels, length) signal
    np.savez(tmp_path / "bad.npz", inputs=x, y=y)
    with pytest.raises(DataError, match="needs arrays named x .* it has inputs, y"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "bad.npz")))
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(DataError, match="not plain numbers"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "objects.npz")))


# --- image folders ---------------------------------------------------------------------------------

def write_images(root: Path, classes: dict[str, int], size=(6, 5), mode: str = "RGB", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")
        (root / name / "notes.txt").write_text("not an image")


def test_imagefolder_reads_a_class_per_folder_tree(tmp_path: Path) -> None:
    write_images(tmp_path / "train", {"cat": 12, "dog": 8})
    write_images(tmp_path / "test", {"cat": 3, "dog": 2}, seed=1)
    cfg = DataConfig(name="imagefolder", path=str(tmp_path / "train"), test_path=str(tmp_path / "test"),
                     validation_size=4)
    data = load_dataset(cfg)
    assert data.classes == ("cat", "dog") and data.input_shape == (3, 6, 5)
    assert len(data.test) == 5 and len(data.train) == 16
    assert 0.0 <= float(data.train.x.min()) and float(data.train.x.max()) <= 1.0  # scaled by 255
    # The first test image (sorted: cat/0.png), pixel for pixel, channels first.
    pixels = np.asarray(Image.open(tmp_path / "test" / "cat" / "0.png"), dtype=np.float32) / np.float32(255)
    assert torch.equal(data.test.x[0], torch.from_numpy(pixels.transpose(2, 0, 1)))
    assert data.test.y[0] == 0


def test_imagefolder_grayscale_resize_and_size_errors(tmp_path: Path) -> None:
    write_images(tmp_path / "g", {"a": 5, "b": 5}, mode="L")
    data = load_dataset(DataConfig(name="imagefolder", path=str(tmp_path / "g"), image_size=[4, 3]))
    assert data.input_shape == (1, 4, 3)
    data = load_dataset(DataConfig(name="imagefolder", path=str(tmp_path / "g"), channels=3))
    assert data.input_shape == (3, 6, 5)
    Image.fromarray(np.zeros((9, 9), np.uint8), "L").save(tmp_path / "g" / "a" / "big.png")
    with pytest.raises(DataError, match="set data.image_size"):
        load_dataset(DataConfig(name="imagefolder", path=str(tmp_path / "g")))
    (tmp_path / "g" / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        load_dataset(DataConfig(name="imagefolder", path=str(tmp_path / "g"), image_size=[4, 4]))


# --- CIFAR -----------------------------------------------------------------------------------------

def pickle_batch(path: Path, batch: dict) -> None:
    """A batch as the python versions of CIFAR ship it: a protocol-2 pickle with byte-string keys."""
    with open(path, "wb") as handle:
        pickle.dump({k.encode(): v for k, v in batch.items()}, handle, protocol=2)


def write_cifar10(root: Path, per_batch: int = 20) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        labels = [int(v) for v in (np.arange(per_batch) + i) % 10]
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        pickle_batch(root / name, {"batch_label": f"batch {i}".encode(), "labels": labels, "data": data,
                                   "filenames": [f"{k}.png".encode() for k in range(per_batch)]})
    names = [n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                  "ship", "truck"]]
    pickle_batch(root / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": names,
                                         "num_vis": 3072})


def test_cifar10_python_batches(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar-10-batches-py")
    data = load_dataset(DataConfig(name="cifar10", path=str(tmp_path), validation_size=10))
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert data.classes[0] == "airplane" and data.classes[-1] == "truck"
    assert (len(data.train), len(data.validation), len(data.test)) == (90, 10, 20)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    # Rows are 1024 red, then green, then blue values of a 32x32 image.
    first = batch[b"data"][0].reshape(3, 32, 32).astype(np.float32) / np.float32(255)
    assert torch.equal(data.test.x[0], torch.from_numpy(first))
    assert data.test.y.tolist() == batch[b"labels"]


def test_cifar100_and_hostile_pickles(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 300), ("test", 100)):
        pickle_batch(root / name, {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                   "fine_labels": [i % 100 for i in range(n)],
                                   "coarse_labels": [i % 20 for i in range(n)]})
    pickle_batch(root / "meta", {"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                 "coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    data = load_dataset(DataConfig(name="cifar100", path=str(root), validation_size=50, mean=[0.5, 0.5, 0.5],
                                   std=[0.25, 0.25, 0.25]))
    assert data.num_classes == 100 and data.classes[7] == "c7" and len(data.test) == 100
    assert float(data.train.x.min()) >= -2.0 and float(data.train.x.max()) <= 2.0  # (x/255 - 0.5) / 0.25

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    with open(root / "test", "wb") as handle:
        pickle.dump({b"data": Evil(), b"fine_labels": []}, handle)
    with pytest.raises(DataError, match="refused to load .*system"):
        load_dataset(DataConfig(name="cifar100", path=str(root)))


# --- custom loaders and in-memory data -------------------------------------------------------------

def test_custom_loader_from_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "myloader_mod.py").write_text(
        "import numpy as np\n"
        "def load(cfg):\n"
        "    rng = np.random.default_rng(cfg.seed)\n"
        "    return rng.normal(size=(60, 4)), rng.integers(0, 2, 60)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    data = load_dataset(DataConfig(name="custom", loader="myloader_mod:load"))
    assert data.input_shape == (4,) and data.name == "custom" and len(data.test) == 12
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_dataset(DataConfig(name="custom", loader="myloader_mod:nope"))


def test_in_memory_forms() -> None:
    x, y = np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20) % 2
    assert set(as_arrays((x, y))) == {"x", "y"}
    arrays = as_arrays((torch.from_numpy(x), torch.from_numpy(y), x[:4].tolist(), y[:4].tolist()))
    assert arrays["x_test"].shape == (4, 2)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    arrays = as_arrays(dataset)
    assert np.array_equal(arrays["x"], x) and np.array_equal(arrays["y"], y)
    assert set(as_arrays((dataset, dataset))) == {"x", "y", "x_test", "y_test"}
    with pytest.raises(DataError, match="x_test and y_test come together"):
        as_arrays({"x": x, "y": y, "x_test": x})
    with pytest.raises(DataError, match="expected \\(x, y\\)"):
        as_arrays("data.csv")


# --- config checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data, field", [
    ({"name": "digits", "path": "x"}, "data.path"),
    ({"name": "csv", "path": "x.csv"}, "data.target"),
    ({"name": "csv", "target": "y"}, "data.path"),
    ({"name": "npz", "path": "x.npz", "mean": [0.5]}, "data.std"),
    ({"name": "mnist1d", "standardize": True}, "data.standardize"),
    ({"name": "custom"}, "data.loader"),
    ({"name": "imagefolder", "path": "x", "image_size": [32]}, "data.image_size"),
    ({"name": "cifar10", "path": "x", "test_path": "y"}, "data.test_path"),
])
def test_fields_a_dataset_does_not_read_are_refused(tmp_path: Path, data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        config_from_dict(tiny_dict(tmp_path, {"data": data}))


# --- user architectures ----------------------------------------------------------------------------

def test_user_architecture_gets_what_its_signature_asks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_nets_mod.py").write_text(
        "import math\n"
        "from torch import nn\n"
        "class Shaped(nn.Sequential):\n"
        "    def __init__(self, input_shape, num_classes, width=8):\n"
        "        super().__init__(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),\n"
        "                         nn.Linear(width, num_classes))\n"
        "class Fixed(nn.Sequential):\n"
        "    def __init__(self, width=8):\n"
        "        super().__init__(nn.Flatten(), nn.Linear(12, width), nn.ReLU(), nn.Linear(width, 2))\n")
    monkeypatch.chdir(tmp_path)
    model = build_model(ModelConfig(architecture="my_nets_mod:Shaped", kwargs={"width": 5}), (3, 4), 7)
    assert model(torch.zeros(2, 3, 4)).shape == (2, 7) and model[1].out_features == 5
    model = build_model(ModelConfig(architecture="my_nets_mod:Fixed"), (3, 4), 2)
    assert model(torch.zeros(2, 3, 4)).shape == (2, 2)
    with pytest.raises(ConfigError, match="model.kwargs.num_classes"):
        build_model(ModelConfig(architecture="my_nets_mod:Shaped", kwargs={"num_classes": 3}), (3, 4), 7)
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    sys.modules.pop("my_nets_mod", None)
    with pytest.raises(ConfigError, match="the current folder .* is searched"):
        build_model(ModelConfig(architecture="my_nets_mod:Shaped"), (3, 4), 7)


# --- a loaded parent that does not fit the data ----------------------------------------------------

def test_mis_scaled_parent_is_reported(tmp_path: Path) -> None:
    write_csv(tmp_path / "fruit.csv", n=300, offset=400.0)
    lines: list[str] = []

    def task_for(standardize: bool) -> ClassificationTask:
        cfg = config_from_dict(tiny_dict(tmp_path, {
            "data": {"name": "csv", "path": str(tmp_path / "fruit.csv"), "target": "kind",
                     "standardize": standardize, "num_samples": None},
            "parent": {"epochs": 20, "lr": 0.05}, "model": {"parent_path": str(tmp_path / "parent.pt")}}))
        task = ClassificationTask(cfg, lines.append)
        task.load()
        return task

    trainer = task_for(True)
    torch.manual_seed(0)
    parent = trainer.new_model()
    trainer.train_parent(parent)
    torch.save(parent.state_dict(), tmp_path / "parent.pt")
    for standardize, warned in ((True, False), (False, True)):
        task = task_for(standardize)
        model = task.new_model()
        task.load_parent(tmp_path / "parent.pt", model)
        lines.clear()
        task.check_loaded_parent(model)
        assert any("warning" in line and "differently preprocessed" in line for line in lines) == warned, lines
    assert "inputs divided by 1, not standardised" in lines[-1]
