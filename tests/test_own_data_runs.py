"""Whole runs on one's own data: a CSV run from the command line with a user model module in a folder of
its own (report and export included), and a run on in-memory arrays that reloads for resume and report."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import evo_subens
from evo_subens.errors import DataError

from conftest import tiny_dict
from test_export import _predict_without_evo_subens
from test_own_data import write_csv

pytestmark = pytest.mark.slow

USER_MODULE = '''
import math
from torch import nn


class FruitNet(nn.Module):
    def __init__(self, input_shape, num_classes, width=16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x))
'''


@pytest.fixture(scope="module")
def csv_project(tmp_path_factory: pytest.TempPathFactory, cli_command: list[str]) -> dict:
    """A user's folder (data, model module, config) and the CLI run made in it."""
    folder = tmp_path_factory.mktemp("fruit-project")
    write_csv(folder / "fruit.csv", n=300)
    (folder / "fruitnets.py").write_text(USER_MODULE)
    config = tiny_dict("runs", {"data": {"name": "csv", "path": "fruit.csv", "target": "kind", "num_samples": None}})
    config["model"] = {"architecture": "fruitnets:FruitNet", "kwargs": {"width": 16}}
    (folder / "fruit.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def cli(*args: str, cwd: Path = folder) -> subprocess.CompletedProcess:
        return subprocess.run([*cli_command, *args], cwd=cwd, capture_output=True, text=True, timeout=300)

    proc = cli("run", "fruit.yaml", "name=fruit")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return {"folder": folder, "run_dir": folder / "runs" / "fruit", "cli": cli, "stdout": proc.stdout}


def test_csv_run_from_the_command_line(csv_project: dict) -> None:
    run_dir, stdout = csv_project["run_dir"], csv_project["stdout"]
    assert "[data] loading csv from" in stdout and "ensemble (" in stdout
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["data"]["path"] == str(csv_project["folder"] / "fruit.csv")  # reloadable from anywhere
    # The user's architecture built the models; the registry's default name, never used, is not recorded.
    assert recorded["model"] == {"kwargs": {"width": 16}, "architecture": "fruitnets:FruitNet", "parent_path": None}
    proc = csv_project["cli"]("report", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "report.md").is_file()


@pytest.mark.parametrize("fmt, suffix", [("torchscript", "pt"), ("pt2", "pt2"), ("onnx", "onnx")])
def test_exported_csv_ensemble_takes_raw_rows(csv_project: dict, fmt: str, suffix: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The exported file holds the preprocessing (standardisation with the training split's statistics): it
    predicts from the CSV's own numbers, in a Python that has neither evo_subens nor the user's module."""
    folder, run_dir = csv_project["folder"], csv_project["run_dir"]
    proc = csv_project["cli"]("export", "runs/fruit", "--format", fmt, "--out", f"fruit.{suffix}")
    assert proc.returncode == 0 and f"fruit.{suffix}" in proc.stdout, proc.stderr
    raw = pd.read_csv(folder / "fruit.csv").drop(columns=["kind"]).to_numpy(np.float32)
    exported = _predict_without_evo_subens(fmt, folder / f"fruit.{suffix}", raw, tmp_path)
    monkeypatch.chdir(folder)  # the user's model module is importable from the project folder
    ensemble = evo_subens.load_ensemble(run_dir)
    assert ensemble.classes == ["apple", "banana", "cherry"]
    np.testing.assert_allclose(exported, ensemble.predict_proba(raw), atol=1e-5)
    # The same as the members on the inputs the run trained on, averaged by hand.
    data = evo_subens.load_dataset(ensemble.config.data)
    model_inputs = torch.from_numpy(data.transform.apply(raw))
    with torch.no_grad():
        by_hand = torch.stack([m(model_inputs).softmax(-1) for m in ensemble.members]).mean(0)
    np.testing.assert_allclose(exported, by_hand.numpy(), atol=1e-5)


def test_the_csv_ensemble_takes_the_csv_rows_by_column_name(csv_project: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """data.json names the columns; the ensemble takes the CSV read with pandas as it is (label column and
    column order whatever they are) and gives numpy; the exported metadata names what was used."""
    from safetensors import safe_open

    folder, run_dir = csv_project["folder"], csv_project["run_dir"]
    monkeypatch.chdir(folder)
    ensemble = evo_subens.load_ensemble(run_dir)
    assert ensemble.features == ["size", "weight", "constant"]
    rows = pd.read_csv(folder / "fruit.csv")
    expected = ensemble.predict_proba(rows.drop(columns=["kind"]).to_numpy(np.float32))
    probs = ensemble.predict_proba(rows[["kind", "weight", "constant", "size"]])
    assert isinstance(probs, np.ndarray)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert set(ensemble.classes_[ensemble.predict(rows)]) <= {"apple", "banana", "cherry"}
    out = tmp_path / "fruit.safetensors"
    evo_subens.export_ensemble(run_dir, "safetensors", out, progress=lambda line: None)
    with safe_open(str(out), "pt") as handle:
        described = yaml.safe_load(handle.metadata()["evo_subens"])  # JSON is YAML
    assert described["model"] == {"architecture": "fruitnets:FruitNet", "kwargs": {"width": 16}}
    assert described["features"] == ["size", "weight", "constant"]


def test_changed_data_file_stops_a_resume(csv_project: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(csv_project["run_dir"]), str(run_dir)], check=True)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    write_csv(tmp_path / "other.csv", n=300, seed=5)
    config["data"]["path"] = str(tmp_path / "other.csv")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    proc = csv_project["cli"]("resume", str(run_dir))
    assert proc.returncode == 2 and "no longer loads to what the run was made with" in proc.stderr, proc.stderr


def test_in_memory_data_is_saved_and_reloads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 240)
    x = (rng.normal(size=(240, 6)) + labels[:, None]).astype(np.float32)
    config = tiny_dict(tmp_path / "runs", {"model": {"name": "mlp"}, "name": "memory"})
    result = evo_subens.run(config, data=(x, labels))
    run_dir = result.run_dir
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert recorded["name"] == "npz" and recorded["path"] == str(run_dir.absolute() / "data.npz")
    saved = np.load(run_dir / "data.npz")
    assert np.array_equal(saved["x"], x) and np.array_equal(saved["y"], labels)
    extended = evo_subens.resume(run_dir, ["search.generations=3"])
    assert extended.population["generation"].max() == 2
    ensemble = evo_subens.load_ensemble(run_dir)
    assert len(ensemble.members) == 3
    np.savez(run_dir / "data.npz", x=x[::-1], y=labels[::-1])
    with pytest.raises(DataError, match="no longer loads"):
        evo_subens.resume(run_dir, ["search.generations=4"])
