"""Smoke tests of ``evo-subens bench latency``: every form of a run's ensemble gets a row per batch size with
sane counts, and the CLI prints the table. No timing is asserted (the machine is shared; times are noise)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import evo_subens
from evo_subens import cli
from evo_subens.bench.latency import FORMS, build_forms, latency_rows, measure_batch
from evo_subens.ensemble import Ensemble

from conftest import tiny_dict
from test_export import Branchy

BATCHES = (1, 8)
# A packed run in seconds: the tiny config's digits with a two-hidden-layer MLP, so the packed network's later
# layers are grouped and it has fewer parameters than its parent.
PACKED = {"name": "packed", "model": {"name": "mlp", "kwargs": {"hidden": [32, 16]}}, "parent": {"epochs": 3},
          "method": "packed", "packed": {"members": 4, "candidates": 1, "tune": {"epochs": 1}}}


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny packed run, distilled (one epoch)."""
    out = tmp_path_factory.mktemp("latency")
    run_dir = evo_subens.run(tiny_dict(out, PACKED), progress=lambda line: None).run_dir
    evo_subens.distill(run_dir, epochs=1, progress=lambda line: None)
    return run_dir


def _by_form(rows: list[dict], batch: int) -> dict[str, dict]:
    return {row["form"]: row for row in rows if row["batch"] == batch}


@pytest.mark.slow
def test_every_form_of_a_packed_run_has_a_row_per_batch(packed_run: Path) -> None:
    rows = latency_rows(packed_run, batches=BATCHES, repeats=3, threads=1)
    expected = list(FORMS)
    assert [row["batch"] for row in rows] == [b for b in BATCHES for _ in expected]
    for batch in BATCHES:
        forms = _by_form(rows, batch)
        assert list(forms) == expected
        assert forms["parent"]["ratio"] == 1.0
        assert forms["packed"]["params"] < forms["parent"]["params"]
        # The same members, three ways: one count of parameters and of FLOPs.
        assert forms["members looped"]["params"] == forms["members vmapped"]["params"] == forms["packed"]["params"]
        looped_flops = forms["members looped"]["flops_per_sample"]
        assert forms["members vmapped"]["flops_per_sample"] == pytest.approx(looped_flops)
        assert forms["student"]["params"] == forms["parent"]["params"]  # the parent's architecture
        for row in forms.values():
            assert row["error"] is None and row["repeats"] == 3
            assert row["median_s"] > 0 and row["iqr_s"] >= 0 and row["ratio"] > 0
            assert row["flops_per_sample"] > 0


@pytest.mark.slow
def test_the_cli_prints_one_table_per_run(packed_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "latency", str(packed_run), "--batches", "1,4", "--repeats", "2",
                     "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{packed_run}: 4 members (packed)" in out
    assert "torch threads 1, torch " in out and "interquartile range" in out
    header = next(line for line in out.splitlines() if line.startswith("form"))
    assert header.split() == ["form", "batch", "median", "ms", "spread", "ms", "x", "parent", "params",
                              "MFLOPs/sample"]
    table = [line for line in out.splitlines() if line.startswith(("parent ", "members ", "packed ", "student "))]
    assert len(table) == 2 * len(FORMS)
    assert all(float(line.split()[-1]) > 0 for line in table)  # every row measured, down to its MFLOPs


@pytest.mark.slow
def test_an_ordinary_run_has_no_packed_row(tmp_path: Path) -> None:
    run_dir = evo_subens.run(tiny_dict(tmp_path, {"name": "plain"}), progress=lambda line: None).run_dir
    forms = _by_form(latency_rows(run_dir, batches=(4,), repeats=2, threads=1), 4)
    assert list(forms) == ["parent", "members looped", "members vmapped"]
    assert forms["members vmapped"]["error"] is None
    assert forms["members looped"]["params"] == 3 * forms["parent"]["params"]  # 3 parent-sized members
    assert forms["members looped"]["flops_per_sample"] == pytest.approx(3 * forms["parent"]["flops_per_sample"])


def test_an_architecture_vmap_cannot_run_is_named_in_its_row() -> None:
    torch.manual_seed(0)
    ensemble = Ensemble([Branchy() for _ in range(2)], input_shape=(4,), num_classes=3, parent=Branchy())
    forms = build_forms(ensemble, None, torch.device("cpu"))
    with torch.inference_mode():
        rows = {row["form"]: row for row in measure_batch(forms, (4,), 5, repeats=2, seconds=0.0,
                                                          device=torch.device("cpu"))}
    assert "vmap cannot run this architecture" in rows["members vmapped"]["error"]
    assert rows["members vmapped"]["median_s"] is None and rows["members vmapped"]["ratio"] is None
    assert rows["members looped"]["error"] is None and rows["members looped"]["median_s"] > 0


@pytest.mark.slow
def test_bad_run_dirs_are_user_errors(packed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "latency", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(packed_run / "config.yaml", unfinished / "config.yaml")
    # A bad directory after a good one fails before the good one is timed.
    assert cli.main(["bench", "latency", str(packed_run), str(unfinished)]) == 2
    captured = capsys.readouterr()
    assert "the run has not finished" in captured.err and "median ms" not in captured.out
    if not torch.cuda.is_available():
        assert cli.main(["bench", "latency", str(packed_run), "--device", "cuda"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "latency", str(packed_run), "--batches", "0"])
