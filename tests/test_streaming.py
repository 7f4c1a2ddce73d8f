"""Data larger than memory: streamed image folders, memory-mapped NPZ files and user Datasets give the same
splits, runs and fingerprints as the in-memory path, hold validation compact, and a run over images larger
than the memory it is allowed completes."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

import evo_subens
from conftest import RUNTIME_COLUMNS, tiny_dict, untimed
from evo_subens.bench.streaming import streaming_bench, write_image_folder
from evo_subens.core.config import DataConfig
from evo_subens.errors import ConfigError, DataError
from evo_subens.tasks.classification.data import load_dataset
from evo_subens.tasks.classification.streaming import LazyInputs
from evo_subens.tasks.classification.training import augment_batch


def write_folder(root: Path, count: int, size: int, classes: int = 3, variants: int = 25) -> None:
    write_image_folder(root, count, size, classes=classes, variants=variants)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images") / "train"
    write_folder(root, 150, 12)
    return root


def image_config(path: Path, **fields) -> DataConfig:
    return DataConfig(name="imagefolder", path=str(path), **fields)


# --- splits ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("standardize", [False, True])
def test_streamed_splits_are_the_in_memory_splits(folder: Path, standardize: bool) -> None:
    memory = load_dataset(image_config(folder, stream=False, standardize=standardize))
    streamed = load_dataset(image_config(folder, stream=True, standardize=standardize, num_workers=2))
    assert streamed.streamed and not memory.streamed
    for name in ("train", "validation", "test"):
        lazy, whole = getattr(streamed, name), getattr(memory, name)
        assert torch.equal(lazy.y, whole.y)
        assert torch.equal(torch.cat(list(lazy.input_batches(16))), whole.x), name
    # One pass over the streamed data fingerprints it exactly as the in-memory tensors hash.
    assert streamed.fingerprint() == memory.fingerprint()
    assert streamed.description() == memory.description()
    # Validation is held as the images' uint8 pixels (a quarter of float32), training stays in the files.
    assert streamed.validation.x.source.array.dtype == np.uint8
    assert len(pickle.dumps(streamed.validation.x)) < memory.validation.x.numel() * 4 / 3
    assert len(pickle.dumps(streamed.train.x)) < streamed.train.x.shape.numel() * 4 / 10  # file names, not pixels


def test_lazy_inputs_index_like_a_tensor(folder: Path) -> None:
    data = load_dataset(image_config(folder, stream=True, num_workers=0))
    whole = torch.cat(list(data.train.input_batches(1000)))
    x = data.train.x
    assert torch.equal(x[3], whole[3]) and torch.equal(x[2:9], whole[2:9])
    index = torch.tensor([7, 0, 7, 4])
    assert torch.equal(x[index], whole[index])
    subset = data.train.subset(np.array([5, 1]))
    assert subset.streamed and torch.equal(subset.x[0:2], whole[[5, 1]]) and torch.equal(subset.y, data.train.y[[5, 1]])
    assert x.shape == whole.shape and len(x) == len(whole)


def test_an_unreadable_image_in_a_streamed_folder_is_named_at_load(folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "train"
    write_folder(root, 30, 8)
    (root / "class1" / "000004.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*000004\.png") as error:
        load_dataset(image_config(root, stream=True, num_workers=2))
    assert "Traceback" not in str(error.value)  # the reader's message, not a worker process's traceback
    odd = tmp_path / "odd"
    write_folder(odd, 30, 8)
    Image.new("RGB", (9, 8)).save(odd / "class0" / "000003.png")
    with pytest.raises(DataError, match=r"000003\.png is 9x8 but the others are 8x8; set data.image_size"):
        load_dataset(image_config(odd, stream=True, num_workers=0))


def test_stream_is_refused_where_it_means_nothing() -> None:
    """The built-in datasets are small and fixed: data.stream is an error there, not silently ignored."""
    with pytest.raises(ConfigError, match="data.stream"):
        DataConfig(name="digits", stream=True).check()


# --- npz -------------------------------------------------------------------------------------------

def test_npz_streams_memory_mapped_and_matches_the_in_memory_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    x = (rng.normal(size=(300, 2, 10)) * 5 + 100 + labels[:, None, None]).astype(np.float64)
    np.savez(tmp_path / "d.npz", x=x, y=labels, x_test=x[:40], y_test=labels[:40])
    memory = load_dataset(DataConfig(name="npz", path=str(tmp_path / "d.npz"), stream=False))
    streamed = load_dataset(DataConfig(name="npz", path=str(tmp_path / "d.npz"), stream=True))
    assert isinstance(streamed.train.x.source.array, np.memmap)
    assert isinstance(streamed.validation.x.source.array, np.memmap)  # the page cache holds it, once per node
    for name in ("train", "validation", "test"):
        lazy, whole = getattr(streamed, name), getattr(memory, name)
        assert torch.equal(torch.cat(list(lazy.input_batches(64))), whole.x) and torch.equal(lazy.y, whole.y)
    assert np.allclose(streamed.transform.mean, memory.transform.mean, rtol=1e-6)
    assert np.allclose(streamed.transform.std, memory.transform.std, rtol=1e-6)
    # A worker process maps the same file: the inputs pickle as a file name, not as their values.
    copy = pickle.loads(pickle.dumps(streamed.train.x))
    assert len(pickle.dumps(streamed.train.x)) < 10_000 and torch.equal(copy[0:5], streamed.train.x[0:5])
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=labels)
    with pytest.raises(DataError, match="compressed .* numpy.savez, or set data.stream: false"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "packed.npz"), stream=True))
    assert not load_dataset(DataConfig(name="npz", path=str(tmp_path / "packed.npz"))).streamed


# --- csv -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_csv_streams_row_by_row_and_matches_the_in_memory_path(tmp_path: Path, line_end: str) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(400, 4)) * 3 + 7, columns=["a", "b", "c", "d"])
    frame["a"] = rng.integers(0, 10, 400)  # an integer column
    frame["label"] = np.where(rng.random(400) < 0.5, "yes", "no")
    frame.to_csv(tmp_path / "d.csv", index=False, lineterminator=line_end)
    frame[:50].to_csv(tmp_path / "t.csv", index=False, lineterminator=line_end)
    for test_path in (None, str(tmp_path / "t.csv")):
        fields = dict(name="csv", path=str(tmp_path / "d.csv"), target="label", test_path=test_path)
        memory = load_dataset(DataConfig(stream=False, **fields))
        streamed = load_dataset(DataConfig(stream=True, num_workers=2, **fields))
        assert streamed.streamed and streamed.features == ("a", "b", "c", "d") == memory.features
        for name in ("train", "validation", "test"):
            lazy, whole = getattr(streamed, name), getattr(memory, name)
            assert torch.equal(torch.cat(list(lazy.input_batches(64))), whole.x) and torch.equal(lazy.y, whole.y)
        assert streamed.description() == memory.description()


def test_streamed_csv_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    rows = ["a,b,label"] + [f"{i},{i % 3},{i % 2}" for i in range(1500)]
    rows[1200] = "1,x,0"  # past the rows checked up front: found by the scan at load
    (tmp_path / "late.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"late\.csv: cannot read rows .* must hold numbers"):
        load_dataset(DataConfig(name="csv", path=str(tmp_path / "late.csv"), target="label", stream=True,
                                num_workers=0))
    (tmp_path / "quoted.csv").write_text('a,label\n1,"two\nlines"\n2,x\n3,y\n')
    with pytest.raises(DataError, match="line break, which streaming cannot seek to; set data.stream: false"):
        load_dataset(DataConfig(name="csv", path=str(tmp_path / "quoted.csv"), target="label", stream=True))


# --- a user Dataset --------------------------------------------------------------------------------

class CountingDataset(torch.utils.data.Dataset):
    """Signals made on demand; the largest number of items ever held at once by a read is recorded by
    the reading code's batches, here only the count of reads."""

    reads = 0

    def __init__(self, count: int = 240, seed: int = 0):
        self.labels = np.random.default_rng(seed).integers(0, 3, count)
        self.targets = self.labels.tolist()
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        CountingDataset.reads += 1
        signal = np.random.default_rng([self.seed, i]).normal(size=(1, 16)).astype(np.float32)
        return torch.from_numpy(signal + float(self.labels[i])), int(self.labels[i])


def counting_loader(cfg: DataConfig) -> CountingDataset:
    return CountingDataset()


def untargeted_loader(cfg: DataConfig) -> CountingDataset:
    dataset = CountingDataset()
    dataset.targets = None  # labels then come item by item
    return dataset


def test_a_user_dataset_is_streamed_without_being_materialised(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    from evo_subens.tasks.classification import tabular

    def refuse(*args, **kwargs):
        raise AssertionError("the Dataset was read whole")

    monkeypatch.setattr(tabular, "_dataset_arrays", refuse)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    cfg = DataConfig(name="custom", loader="test_streaming:counting_loader", stream=True, num_workers=0)
    data = load_dataset(cfg)
    assert data.streamed and isinstance(data.train.x, LazyInputs)
    dataset = CountingDataset()
    whole = torch.stack([dataset[i][0] for i in range(len(dataset))]).numpy()
    positions = data.train.x.positions
    expected = (whole[positions] - data.transform.mean) / data.transform.std
    assert torch.allclose(data.train.x[0:len(positions)], torch.from_numpy(expected.astype(np.float32)), atol=1e-5)
    untargeted = load_dataset(DataConfig(name="custom", loader="test_streaming:untargeted_loader", stream=True,
                                         num_workers=0))
    assert untargeted.fingerprint() == data.fingerprint()
    config = tiny_dict(tmp_path / "runs", {"data": {"name": "custom", "loader": "test_streaming:counting_loader",
                                                     "stream": True, "num_workers": 0, "num_samples": None},
                                           "children": {"sigma": 0.1}})
    result = evo_subens.run(config)
    assert result.metrics["ensemble"]["accuracy"] > 0.5


# --- augmentation ----------------------------------------------------------------------------------

def test_augmentation_crops_and_flips_each_image_reproducibly() -> None:
    x = torch.rand(12, 3, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, augment_batch(x, torch.Generator().manual_seed(1)))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops), i
    flipped_only = augment_batch(x, torch.Generator().manual_seed(0), padding=0)
    same = [torch.equal(flipped_only[i], x[i]) for i in range(len(x))]
    assert any(same) and not all(same)
    assert all(s or torch.equal(flipped_only[i], x[i].flip(-1)) for i, s in enumerate(same))


def test_augmentation_is_refused_for_inputs_that_are_not_images(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.augment"):
        evo_subens.run(tiny_dict(tmp_path / "runs", {"data": {"name": "mnist1d", "num_samples": 200,
                                                               "augment": True}}))


# --- whole runs ------------------------------------------------------------------------------------

def run_on(folder: Path, out: Path, executor: str = "local", **data) -> evo_subens.RunResult:
    config = tiny_dict(out, {
        "data": {"name": "imagefolder", "path": str(folder), "num_samples": None, "standardize": True, **data},
        "parent": {"epochs": 3}, "finetune": {"epochs": 1},
        "workers": {"executor": executor} if executor == "local" else {"executor": "ray", "num_actors": 2}})
    # Sparse children are tuned on the training split inside the workers: streamed there too.
    config["children"] = {"family": "sparse", "mask": "random", "sparsity": 0.5, "tune": {"epochs": 1}}
    return evo_subens.run(config)


@pytest.mark.slow
@pytest.mark.parametrize("augment, executor", [(False, "local"), pytest.param(True, "ray", marks=pytest.mark.ray)])
def test_a_streamed_run_equals_the_in_memory_run(folder: Path, tmp_path: Path, augment: bool, executor: str,
                                                capsys: pytest.CaptureFixture, request: pytest.FixtureRequest) -> None:
    """On Ray, the actors read the streamed training split themselves when they tune children."""
    if executor == "ray":
        request.getfixturevalue("ray_session")
    memory = run_on(folder, tmp_path / "memory", stream=False, augment=augment)
    streamed = run_on(folder, tmp_path / "streamed", executor, stream=True, num_workers=2, augment=augment)
    assert "streamed from its files" in capsys.readouterr().out
    assert untimed(streamed.metrics) == untimed(memory.metrics)
    population = [pd.read_parquet(r.run_dir / "population.parquet").drop(columns=RUNTIME_COLUMNS)
                  for r in (memory, streamed)]
    pd.testing.assert_frame_equal(population[0], population[1])
    recorded = [json.loads((r.run_dir / "data.json").read_text()) for r in (memory, streamed)]
    assert recorded[0] == recorded[1]


# --- a memory cap ----------------------------------------------------------------------------------

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


@contextmanager
def memory_cap(limit: int) -> Iterator[Callable[[], None] | None]:
    """A fresh memory cgroup capped at ``limit`` bytes, as a ``preexec_fn`` that moves the child into it
    (with every process it starts); None where no cgroup can be made here (not root, no controller)."""
    name = f"evo-subens-test-{uuid.uuid4().hex[:8]}"
    group = None
    try:
        if (CGROUP_V1 / "memory.limit_in_bytes").exists():
            group = CGROUP_V1 / name
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(limit))
            if (group / "memory.swappiness").exists():
                (group / "memory.swappiness").write_text("0")
        elif "memory" in (CGROUP_V2 / "cgroup.subtree_control").read_text().split():
            group = CGROUP_V2 / name
            group.mkdir()
            (group / "memory.max").write_text(str(limit))
            (group / "memory.swap.max").write_text("0")
        else:
            raise OSError("no memory controller")
    except OSError:
        if group is not None and group.exists():
            group.rmdir()
        yield None
        return
    procs = str(group / "cgroup.procs")

    def enter() -> None:
        with open(procs, "w") as handle:
            handle.write(str(os.getpid()))

    try:
        yield enter
    finally:
        for _ in range(50):  # the group empties as its processes are reaped
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def tree_memory(pid: int) -> int:
    """Proportional resident bytes (PSS: a page shared by n processes counts 1/n in each) of process ``pid``
    and its descendants: what they hold together, forked DataLoader workers included."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


@pytest.mark.slow
def test_a_run_over_images_larger_than_its_memory_cap_completes(tmp_path: Path, cli_command: list[str]) -> None:
    """16,000 images of 128x128 RGB are 3.1 GB as the float32 inputs the in-memory path holds (0.8 GB of
    uint8 pixels). The run is capped at half of that: the in-memory path is killed, the streamed one
    completes. Where no cgroup can be made, the streamed run's peak memory (proportional resident memory of
    the run and its DataLoader workers) is measured against the same bound."""
    count, size = 16_000, 128
    write_image_folder(tmp_path / "images", count, size)
    decoded = count * 3 * size * size * 4
    cap = decoded // 2
    config = tiny_dict(tmp_path / "runs", {
        "data": {"name": "imagefolder", "path": str(tmp_path / "images"), "num_samples": None,
                 "standardize": True, "num_workers": 2},
        "parent": {"epochs": 1, "batch_size": 128, "lr": 0.01},
        "search": {"population": 4, "generations": 1, "eval_batch_size": 250},
        "ensemble": {"size": 2}})

    def run(stream: bool, enter: Callable[[], None] | None) -> tuple[subprocess.CompletedProcess, int]:
        path = tmp_path / f"stream-{stream}.yaml"
        path.write_text(yaml.safe_dump(dict(config, data=dict(config["data"], stream=stream))))
        process = subprocess.Popen([*cli_command, "run", str(path)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, preexec_fn=enter)
        peak = [0]

        def watch() -> None:
            while process.poll() is None:
                peak[0] = max(peak[0], tree_memory(process.pid))
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        output, _ = process.communicate(timeout=600)
        watcher.join()
        return subprocess.CompletedProcess(process.args, process.returncode, output), peak[0]

    with memory_cap(cap) as enter:
        streamed, peak = run(True, enter)
        assert streamed.returncode == 0, streamed.stdout[-3000:]
        assert "streamed from its files" in streamed.stdout
        print(f"decoded inputs {decoded / 2**30:.2f} GiB, cap {cap / 2**30:.2f} GiB "
              f"({'cgroup' if enter else 'none: peak memory measured'}), streamed run's peak proportional resident "
              f"memory (run and DataLoader workers) {peak / 2**30:.2f} GiB = {peak / decoded:.2f}x the decoded size")
        if enter is None:
            assert peak <= cap
        else:
            in_memory, _ = run(False, enter)
            assert in_memory.returncode != 0  # the cap is real: the whole data does not fit under it
    metrics = json.loads(next((tmp_path / "runs").glob("*/metrics.json")).read_text())
    assert metrics["parent"]["accuracy"] > 0.5 and metrics["ensemble"]["accuracy"] > 0.5


@pytest.mark.slow
def test_the_streaming_bench_reports_each_method_with_identical_weights(tmp_path: Path) -> None:
    write_folder(tmp_path / "images", 240, 16)
    rows = streaming_bench(folder=str(tmp_path / "images"), workers=[0, 2], repeats=1, model="mlp")
    assert [row["method"] for row in rows] == ["in memory", "streamed, 0 workers", "streamed, 2 workers"]
    assert all(row["same_weights"] and row["samples_per_s"] > 0 for row in rows)
    assert rows[0]["ratio"] == 1.0


@pytest.mark.ray
def test_actors_share_one_copy_of_the_compact_validation_split(ray_session, folder: Path) -> None:
    """The validation pixels reach Ray workers through the object store: each worker maps the node's one
    copy (a read-only view of shared memory), not a private float32 copy."""
    import ray

    data = load_dataset(image_config(folder, stream=True, num_workers=0))
    ref = ray.put(data.validation.x)

    @ray.remote(num_cpus=0)
    def inspect(inputs: LazyInputs) -> tuple[str, bool, list]:
        array = inputs.source.array
        return str(array.dtype), bool(array.flags.writeable), inputs[0:3].tolist()

    dtype, writeable, first = ray.get(inspect.remote(ref))
    assert dtype == "uint8" and not writeable  # zero-copy from the object store: no private copy
    assert first == data.validation.x[0:3].tolist()
