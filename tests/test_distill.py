"""evo-subens distill: one student trained on a finished run's ensemble is kept in the run directory with its
metrics beside parent and ensemble, is a function of the run and the options, loads as a one-member
ensemble and exports like the ensemble; bad input is a one-line error naming what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import evo_subens
from evo_subens import cli
from evo_subens.distillation import METRICS_FILE, STUDENT_FILE, distill, load_student, summary
from evo_subens.ensemble import load_ensemble
from evo_subens.errors import RunDirError, UserError
from evo_subens.export import export_ensemble
from evo_subens.nn import load_state_file
from evo_subens.tasks.classification.data import load_dataset
from evo_subens.tasks.classification.models import build_model

EPOCHS = 2
# A packed run in seconds: 1,000 8x8 digits (raw pixels 0..16, so the ensemble has an input transform), an
# MLP cut into 4 members, one partition.
RUN = {"seed": 0, "name": "r", "data": {"name": "digits", "num_samples": 1000, "validation_size": 0.2},
       "model": {"name": "mlp", "kwargs": {"hidden": [64]}},
       "parent": {"epochs": 5, "batch_size": 64, "lr": 0.1},
       "method": "packed", "packed": {"members": 4, "candidates": 1, "tune": {"epochs": 3, "lr": 0.1}}}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished packed run, distilled once (its progress lines kept), and a copy distilled again."""
    root = tmp_path_factory.mktemp("distill")
    result = evo_subens.run(dict(RUN, output_dir=str(root / "runs")), progress=lambda line: None)
    run_dir = result.run_dir
    again = root / "again"
    shutil.copytree(run_dir, again)
    lines: list[str] = []
    rng = torch.random.get_rng_state()
    metrics = distill(run_dir, epochs=EPOCHS, progress=lines.append)
    rng_untouched = torch.equal(rng, torch.random.get_rng_state())
    distill(again, epochs=EPOCHS, progress=lambda line: None)
    # The same run as if configured with data.augment: the soft targets are then the ensemble's on each
    # augmented batch.
    augmented = root / "augmented"
    shutil.copytree(again, augmented)
    config = yaml.safe_load((augmented / "config.yaml").read_text())
    config["data"]["augment"] = True
    (augmented / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    distill(augmented, epochs=EPOCHS, progress=lambda line: None)
    return {"run_dir": run_dir, "again": again, "augmented": augmented, "metrics": metrics, "lines": lines,
            "rng_untouched": rng_untouched, "run_metrics": result.metrics}


def _student_module(run_dir: Path) -> torch.nn.Module:
    ensemble = load_ensemble(run_dir)
    model = build_model(ensemble.config.model, ensemble.input_shape, ensemble.num_classes)
    model.load_state_dict(load_state_file(run_dir / STUDENT_FILE))
    return model.eval()


def test_the_student_and_its_metrics_are_kept_in_the_run(distilled) -> None:
    run_dir, metrics = distilled["run_dir"], distilled["metrics"]
    assert (run_dir / STUDENT_FILE).is_file()
    assert json.loads((run_dir / METRICS_FILE).read_text()) == json.loads(json.dumps(metrics))
    assert metrics["options"].items() >= {"epochs": EPOCHS, "lr": 0.05, "alpha": 1.0, "seed": 0}.items()
    for name in ("parent", "ensemble", "student"):
        test = metrics["test"][name]
        assert set(test) >= {"accuracy", "nll", "ece"} and 0 <= test["accuracy"] <= 1
        assert 0 < metrics["temperature"][name]["temperature"] and metrics["temperature"][name]["test"]["nll"] > 0
    # One model's size: the parent's architecture; the packed ensemble is counted whole.
    assert metrics["parameters"]["student"] == metrics["parameters"]["parent"]
    assert metrics["parameters"]["ensemble"] > 0
    # Parent and ensemble are the run's own, as its metrics.json has them.
    for name in ("parent", "ensemble"):
        assert metrics["test"][name]["nll"] == pytest.approx(distilled["run_metrics"][name]["nll"], abs=1e-6)
        assert metrics["test"][name]["accuracy"] == distilled["run_metrics"][name]["accuracy"]
    assert len(metrics["training"]["losses"]) == EPOCHS
    assert distilled["rng_untouched"], "distill changed the caller's global torch random state"


def test_the_table_shows_parent_ensemble_and_student(distilled) -> None:
    lines, metrics = distilled["lines"], distilled["metrics"]
    header = next(i for i, line in enumerate(lines) if "nll (T)" in line)
    assert all(word in lines[header] for word in ("accuracy", "nll", "ece", "parameters"))
    rows = lines[header + 1:header + 4]
    assert [row.split()[0] for row in rows] == ["parent", "ensemble", "student"]
    assert f"{metrics['test']['student']['nll']:.4f}" in rows[2]
    assert f"{metrics['temperature']['student']['test']['nll']:.4f}" in rows[2]
    assert all(line.startswith("[distill] ") or line.startswith("[data] ") for line in lines[:header])
    assert any(str(distilled["run_dir"] / STUDENT_FILE) in line for line in lines[header:])


def test_distilling_again_gives_the_same_student_bit_for_bit(distilled) -> None:
    first = load_state_file(distilled["run_dir"] / STUDENT_FILE)
    second = load_state_file(distilled["again"] / STUDENT_FILE)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    first_metrics = json.loads((distilled["again"] / METRICS_FILE).read_text())
    assert first_metrics["test"] == distilled["metrics"]["test"]


def test_augmented_runs_distill_on_augmented_batches(distilled) -> None:
    augmented = json.loads((distilled["augmented"] / METRICS_FILE).read_text())
    assert augmented["options"]["augment"] is True and distilled["metrics"]["options"]["augment"] is False
    plain = load_state_file(distilled["run_dir"] / STUDENT_FILE)
    other = load_state_file(distilled["augmented"] / STUDENT_FILE)
    assert not all(torch.equal(plain[k], other[k]) for k in plain)
    assert all(torch.isfinite(v).all() for v in other.values())


def test_the_share_of_the_gain_kept_is_reported() -> None:
    """Half of the NLL gain and all of the accuracy gain kept; an ensemble that gained nothing: said so."""
    test = {"parent": {"accuracy": 0.80, "nll": 1.0, "ece": 0.1},
            "ensemble": {"accuracy": 0.90, "nll": 0.8, "ece": 0.1},
            "student": {"accuracy": 0.90, "nll": 0.9, "ece": 0.1}}
    metrics = {"members": 4, "test": test, "temperature": {k: {"test": v} for k, v in test.items()},
               "parameters": {"parent": 100, "ensemble": 400, "student": 100}}
    from evo_subens.distillation import _kept

    metrics["kept"] = _kept(test)
    assert metrics["kept"] == pytest.approx({"nll": 0.5, "accuracy": 1.0})
    assert "keeps 50% of the ensemble's test NLL gain" in summary(metrics)[-1]
    assert "0.25x the ensemble's parameters" in summary(metrics)[-1]
    test["ensemble"] = dict(test["parent"])
    metrics["kept"] = _kept(test)
    assert metrics["kept"] == {"nll": None, "accuracy": None}
    assert "no gain to keep" in summary(metrics)[-1]


def test_the_student_moved_from_the_parent_towards_the_ensemble(distilled) -> None:
    """On test data the student's outputs are closer to the ensemble's than its starting point's."""
    run_dir = distilled["run_dir"]
    ensemble = load_ensemble(run_dir)
    test_x = load_dataset(ensemble.config.data).test.x
    with torch.no_grad():
        target = ensemble(test_x)
        kl = {name: F.kl_div(model(test_x).log_softmax(dim=1), target, reduction="batchmean").item()
              for name, model in (("parent", ensemble.parent), ("student", _student_module(run_dir)))}
    assert kl["student"] < kl["parent"]


def test_load_student_predicts_the_students_softmax(distilled) -> None:
    run_dir = distilled["run_dir"]
    student = load_student(run_dir)
    ensemble = evo_subens.load_ensemble(run_dir)
    assert student.num_members == 1 and student.parent is not None
    assert (student.input_shape, student.num_classes, student.classes) == \
           (ensemble.input_shape, ensemble.num_classes, ensemble.classes)
    x = torch.randn(7, *student.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _student_module(run_dir)(x).softmax(dim=1)
    torch.testing.assert_close(student.predict_proba(x), expected, atol=1e-6, rtol=0)
    assert student.predict_proba(x.numpy()[0]).shape == (student.num_classes,)
    assert evo_subens.load_student is load_student and evo_subens.distill is distill


def test_export_student_round_trips(distilled, tmp_path: Path) -> None:
    run_dir = distilled["run_dir"]
    path = export_ensemble(run_dir, "torchscript", progress=lambda line: None, model="student")
    assert path == run_dir / "export" / "student.pt"
    out = tmp_path / "student.pt"
    assert cli.main(["export", str(run_dir), "--student", "--format", "torchscript", "--out", str(out)]) == 0
    x = torch.randn(9, *load_student(run_dir).input_shape, generator=torch.Generator().manual_seed(1))
    expected = load_student(run_dir).predict_proba(x)
    for file in (path, out):
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.load(str(file))(x), expected, atol=1e-5, rtol=0)


def test_bad_input_names_the_problem(distilled, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = distilled["run_dir"]
    with pytest.raises(RunDirError, match="does not exist"):
        distill(tmp_path / "nowhere")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_dir / "config.yaml", unfinished / "config.yaml")
    with pytest.raises(RunDirError, match="members.json: the run has not finished"):
        distill(unfinished)
    with pytest.raises(RunDirError, match=r"student\.pt does not exist.*evo-subens distill"):
        load_student(unfinished)
    shutil.copy(run_dir / "members.json", unfinished / "members.json")  # finished, but never distilled
    with pytest.raises(RunDirError, match=r"no student yet \(evo-subens distill"):
        export_ensemble(unfinished, "torchscript", model="student")
    rl = tmp_path / "rl"
    rl.mkdir()
    (rl / "config.yaml").write_text("task: rl\nsearch:\n  fitness: return\n")
    (rl / "members.json").write_text("[{}]\n")
    with pytest.raises(RunDirError, match="rl task"):
        distill(rl)
    for options, word in (({"epochs": 0}, "--epochs"), ({"lr": -1.0}, "--lr"), ({"lr": float("nan")}, "--lr"),
                          ({"alpha": 1.5}, "--alpha")):
        with pytest.raises(UserError, match=word):
            distill(run_dir, **options)
    capsys.readouterr()
    assert cli.main(["distill", str(run_dir), "--alpha", "-0.5"]) == 2
    assert "evo-subens: error: distill needs --alpha in [0, 1]" in capsys.readouterr().err
    assert cli.main(["export", str(unfinished), "--student", "--format", "torchscript"]) == 2
    assert "evo-subens distill" in capsys.readouterr().err
