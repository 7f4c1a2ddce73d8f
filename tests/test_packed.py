"""Packed partition ensembles (method: packed): the packed network is its members side by side, trains as
they would one by one, resumes bit-exactly after a kill, loads and exports as one module, and refuses
architectures it cannot cut with the layer named."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import evo_subens
from evo_subens.core.config import ModelConfig, PackedTuneConfig
from evo_subens.ensemble import PackedRunEnsemble, load_ensemble
from evo_subens.errors import ConfigError
from evo_subens.export import FORMATS, export_ensemble
from evo_subens.nn import load_state_file
from evo_subens.packed import PackedEnsemble, cut_parent
from evo_subens.tasks.classification.models import build_model
from evo_subens.tasks.classification.packed_run import tune_packed
from evo_subens.tasks.classification.splits import Split
from evo_subens.tasks.classification.training import train

from conftest import tiny_dict
from test_export import _predict_without_evo_subens

MODELS = [("mlp", (1, 8, 8), {"hidden": [32, 16]}), ("cnn1d", (1, 40), {}), ("cnn2d", (1, 12, 12), {}),
          ("lenet", (1, 12, 12), {"size": "L"})]
PACKED_RUN = {"data": {"name": "digits", "num_samples": 1000, "validation_size": 0.2},
              "model": {"name": "cnn2d", "kwargs": {"channels": [8, 16], "hidden": 16}},
              "parent": {"epochs": 10, "batch_size": 64, "lr": 0.05},
              "method": "packed", "packed": {"members": 4, "candidates": 2, "tune": {"epochs": 1}}}


def _parent(name: str, shape: tuple, kwargs: dict, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, kwargs=kwargs), shape, 10).to(dtype).eval()


# --- packing and unpacking ------------------------------------------------------------------------------

@pytest.mark.parametrize("members,overlap", [(4, 1), (8, 2), (4, 3)])
@pytest.mark.parametrize("name,shape,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_unpacked_members_give_the_packed_members_outputs(name, shape, kwargs, members, overlap) -> None:
    parent = _parent(name, shape, kwargs)
    packed = cut_parent(parent, shape, members, overlap=overlap, seed=3).eval()
    x = torch.randn(6, *shape, dtype=torch.float64)
    logits = packed.member_logits(x)
    narrow = packed.unpack()
    assert len(narrow) == members
    for i, member in enumerate(narrow):
        torch.testing.assert_close(member(x), logits[:, i], atol=1e-6, rtol=0)
    torch.testing.assert_close(packed(x), logits.softmax(-1).mean(1))
    repacked = PackedEnsemble.from_members(narrow, packed.layout, 10)
    for (key, a), (_, b) in zip(packed.state_dict().items(), repacked.state_dict().items()):
        assert torch.equal(a, b), key


def test_a_member_is_the_parent_restricted_to_its_own_units() -> None:
    """Zeroing every hidden unit outside member i's share (its weights in and its bias) leaves the parent
    computing member i's logits: the member is cut out, not approximated."""
    shape = (1, 40)
    parent = _parent("cnn1d", shape, {})
    packed = cut_parent(parent, shape, 4, seed=1)
    x = torch.randn(5, *shape, dtype=torch.float64)
    shares = [spec["units"] for spec in packed.layout if "units" in spec]
    assert len(shares) == 3  # two convolutions and the hidden Linear; the classifier is every member's
    for i, member in enumerate(packed.unpack()):
        masked = copy.deepcopy(parent)
        hidden = [m for m in masked.modules() if isinstance(m, (nn.Conv1d, nn.Linear))][:-1]
        with torch.no_grad():
            for layer, units in zip(hidden, shares):
                dropped = torch.ones(layer.weight.shape[0], dtype=torch.bool)
                dropped[units[i]] = False
                layer.weight[dropped] = 0
                layer.bias[dropped] = 0
        torch.testing.assert_close(masked(x), member(x), atol=1e-9, rtol=0)


def test_packed_tuning_equals_tuning_the_members_one_by_one() -> None:
    """One optimiser over the packed network, each member's loss its own: the same SGD steps (momentum,
    weight decay, one-cycle) each member takes when trained alone on the same batches."""
    shape = (1, 40)
    parent = _parent("cnn1d", shape, {}, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    split = Split(torch.randn(96, *shape, generator=generator), torch.randint(0, 10, (96,), generator=generator))
    cfg = PackedTuneConfig(epochs=2, batch_size=32, lr=0.05)
    packed = cut_parent(parent, shape, 4, seed=2)
    alone = packed.unpack()
    tune_packed(packed, split, cfg, seed=7)
    for member in alone:
        train(member, split, cfg, seed=7)
    x = torch.randn(8, *shape, generator=generator)
    logits = packed.eval().member_logits(x)
    for i, member in enumerate(alone):
        torch.testing.assert_close(member.eval()(x), logits[:, i], atol=1e-5, rtol=1e-5)


# --- architectures it cannot cut ------------------------------------------------------------------------

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.skip = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.out(F.relu(self.skip(x)) + x)


class ViewFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x.view(x.size(0), -1))))


class WithLayerNorm(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(64, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 10))


def test_a_traced_user_architecture_with_batchnorm_is_cut() -> None:
    class Simple(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.norm = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 16, 16)
            self.out = nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.norm(self.conv(x)))
            return self.out(F.relu(self.fc(torch.flatten(x, 1))))

    torch.manual_seed(0)
    parent = Simple().double()
    parent.train()
    parent(torch.randn(32, 1, 4, 4, dtype=torch.float64))  # running statistics that are not the defaults
    parent.eval()
    packed = cut_parent(parent, (1, 4, 4), 4, seed=0).eval()
    assert [spec["kind"] for spec in packed.layout][:3] == ["dense", "norm", "unit"]
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    logits = packed.member_logits(x)
    for i, member in enumerate(packed.unpack()):
        torch.testing.assert_close(member(x), logits[:, i], atol=1e-6, rtol=0)


@pytest.mark.parametrize("model,layer,why", [
    (Residual, "add", "skip connection"),
    (ViewFlatten, "size", "calls the tensor method .size()"),
    (WithLayerNorm, "2", "LayerNorm"),
])
def test_architectures_it_cannot_cut_are_refused_naming_the_layer(model, layer, why) -> None:
    with pytest.raises(ConfigError) as error:
        cut_parent(model(), (1, 8, 8), 4)
    message = str(error.value)
    assert f"layer '{layer}" in message and why in message, message


def test_widths_that_do_not_divide_among_the_members_are_refused() -> None:
    parent = build_model(ModelConfig(name="mlp", kwargs={"hidden": [30]}), (1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"packed.members.*features.1.*30 units"):
        cut_parent(parent, (1, 8, 8), 4)


# --- runs -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packed_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed")
    return evo_subens.run(tiny_dict(out, dict(PACKED_RUN, name="packed")), progress=lambda line: None).run_dir


def test_a_packed_run_loads_as_one_packed_module(packed_run: Path) -> None:
    metrics = json.loads((packed_run / "metrics.json").read_text())
    assert metrics["method"] == "packed" and len(metrics["members"]) == 4
    assert metrics["packed"]["packed"]["parameters"] < metrics["packed"]["parent"]["parameters"]
    ensemble = load_ensemble(packed_run)
    assert isinstance(ensemble, PackedRunEnsemble) and ensemble.num_members == 4
    own = {id(p) for p in ensemble.packed.parameters()}
    assert own == {id(p) for p in ensemble.parameters()}  # its parameters are the packed network's
    x = np.random.default_rng(0).integers(0, 17, size=(9, 1, 8, 8)).astype(np.uint8)
    members = evo_subens.Ensemble(ensemble.members, input_shape=ensemble.input_shape, num_classes=10,
                                  transform=ensemble.transform.to_dict())
    np.testing.assert_allclose(ensemble.predict_proba(x), members.predict_proba(x), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "pt2", "onnx"])
def test_an_exported_packed_ensemble_predicts_like_load_ensemble(packed_run: Path, fmt: str, tmp_path: Path) -> None:
    path = export_ensemble(packed_run, fmt, tmp_path / f"packed{FORMATS[fmt]}", progress=lambda line: None)
    x = np.random.default_rng(1).integers(0, 17, size=(7, 1, 8, 8)).astype(np.float32)
    expected = load_ensemble(packed_run).predict_proba(x)
    np.testing.assert_allclose(_predict_without_evo_subens(fmt, path, x, tmp_path), expected, atol=1e-5)


def test_packed_safetensors_hold_the_packed_network(packed_run: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    path = export_ensemble(packed_run, "safetensors", tmp_path / "packed.safetensors", progress=lambda line: None)
    ensemble = load_ensemble(packed_run)
    with safe_open(str(path), "pt") as handle:
        description = json.loads(handle.metadata()["evo_subens"])
        for name, value in ensemble.packed.state_dict().items():
            assert torch.equal(handle.get_tensor(f"packed.{name}"), value)
    assert description["packed"] == ensemble.packed.layout and description["members"] == 4


def test_a_killed_packed_run_resumes_to_the_same_result(tmp_path: Path, cli_command: list[str]) -> None:
    config = tmp_path / "packed.yaml"
    # An MLP parent: the kill test runs three times, and what it checks does not depend on the layer kinds.
    mlp = dict(PACKED_RUN, model={"name": "mlp", "kwargs": {"hidden": [32, 16]}}, parent={"epochs": 2})
    config.write_text(yaml.safe_dump(tiny_dict(tmp_path / "runs", mlp)))
    killed = subprocess.run(cli_command + ["run", str(config), "name=killed"], capture_output=True, text=True,
                            env=dict(os.environ, EVO_SUBENS_CRASH_AT="packed.after_candidate"), timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / "runs" / "killed"
    assert not (run_dir / "metrics.json").exists()
    resumed = subprocess.run(cli_command + ["resume", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "[resume] parent and 1 of 2 packed candidate(s) done" in resumed.stdout + resumed.stderr
    whole = subprocess.run(cli_command + ["run", str(config), "name=whole"], capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr
    reference = tmp_path / "runs" / "whole"
    for name in ("members/packed.pt", "parent.pt", "candidates/0.pt", "candidates/1.pt"):
        a, b = load_state_file(run_dir / name), load_state_file(reference / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    for key in ("parent", "ensemble", "members", "packed", "temperature", "cost"):
        assert ma[key] == mb[key], key


@pytest.mark.slow
def test_the_packed_bench_runs_each_config_per_seed_from_one_parent(tmp_path: Path, capsys) -> None:
    """Per seed the first config trains the parent and the second cuts its ensemble from that parent file;
    every run is distilled and timed, and the table says whether it reached the bar."""
    from evo_subens.bench.packed import packed_bench

    folder = tmp_path / "configs"
    folder.mkdir()
    mlp = dict(PACKED_RUN, model={"name": "mlp", "kwargs": {"hidden": [32, 16]}}, parent={"epochs": 2})
    for members in (4, 8):
        run = tiny_dict(tmp_path / "unused", dict(mlp, packed={"members": members, "candidates": 1,
                                                               "tune": {"epochs": 1}}))
        (folder / f"packed-{members}.yaml").write_text(yaml.safe_dump(run))
    rows = packed_bench(seeds=[0], config_dirs=str(folder), output_dir=str(tmp_path / "study"), seconds=0.1)
    assert [(r["config"], r["seed"]) for r in rows] == [("packed-4", 0), ("packed-8", 0)]
    second = yaml.safe_load((Path(rows[1]["run_dir"]) / "config.yaml").read_text())
    assert second["model"]["parent_path"] == str(Path(rows[0]["run_dir"]) / "parent.pt")
    assert rows[0]["parent_nll"] == rows[1]["parent_nll"]
    assert all(r["params"] < 1 and r["latency"] > 0 and isinstance(r["reached"], bool) for r in rows)
    assert all((Path(r["run_dir"]) / "student" / "student.pt").is_file() for r in rows)
    table = (tmp_path / "study" / "packed-table.txt").read_text()
    assert "mean over seeds:" in table and table in capsys.readouterr().out
