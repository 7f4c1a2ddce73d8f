"""Matched-budget baselines: budgets and cost records, cyclic schedules, snapshots, MC dropout, bagging,
their run directories, config checks and the quality benchmark's table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evo_subens.tasks.classification import baselines
from evo_subens.tasks.classification.baselines import BASELINES, bagging_subsets, check_baseline, fge_epochs
from evo_subens.bench.quality import format_table, quality
from evo_subens.core.config import METHODS, config_from_dict, load_config
from evo_subens.core.config import baseline_budget, subnetwork_budget_epochs
from evo_subens.tasks.classification.data import load_dataset
from evo_subens.errors import ConfigError, UserError
from evo_subens.core.runner import grow, resume, run
from evo_subens.tasks.classification.training import lr_factor

from conftest import REPO, tiny_dict, untimed

METRIC_KEYS = {"method", "ensemble", "members", "growth", "diversity", "test_samples", "cost"}


@pytest.fixture(scope="module")
def data():
    return load_dataset(config_from_dict(tiny_dict("unused")).data)


def baseline(make_config, method: str, **fields):
    return make_config({"method": method, "baseline": fields})


# --- schedules ---------------------------------------------------------------------------------------

def test_cyclic_cosine_restarts_at_each_cycle() -> None:
    factors = [lr_factor("cyclic_cosine", step, 40, cycles=4) for step in range(40)]
    assert [factors[i] for i in (0, 10, 20, 30)] == [1.0] * 4
    assert factors[5] == pytest.approx(0.5)
    for start in (0, 10, 20, 30):  # a full cosine decay inside each cycle, then the restart
        cycle = factors[start:start + 10]
        assert all(a > b for a, b in zip(cycle, cycle[1:]))
        assert cycle[-1] < 0.03


def test_cyclic_linear_goes_down_to_low_and_back() -> None:
    factors = [lr_factor("cyclic_linear", step, 20, cycles=2, low=0.01) for step in range(20)]
    assert factors[0] == factors[10] == 1.0
    assert factors[5] == factors[15] == pytest.approx(0.01)
    assert factors[1] == pytest.approx(1 - 0.2 * 0.99)
    assert factors[7] == pytest.approx(0.01 + 0.4 * 0.99)


# --- budgets and costs -------------------------------------------------------------------------------

def test_matched_budget_follows_the_subnetwork_method(make_config) -> None:
    assert baseline_budget(baseline(make_config, "single")) == 2  # noisy: the parent's epochs
    finetuned = make_config({"method": "single", "finetune": {"epochs": 1}})
    assert baseline_budget(finetuned) == 2 + 1 * 3  # + finetune epochs x ensemble.size
    sparse = config_from_dict(dict(tiny_dict("/tmp/unused", {"method": "single"}),
                                   children={"family": "sparse", "tune": {"epochs": 1}}))
    assert baseline_budget(sparse) == 2 + 1 * 8 * 2  # + tune epochs x population x generations
    assert baseline_budget(baseline(make_config, "single", budget_epochs=7)) == 7


@pytest.mark.slow
def test_deep_ensemble_splits_the_budget(make_config, data) -> None:
    cfg = baseline(make_config, "deep_ensemble", budget_epochs=7, members=3)
    out = BASELINES["deep_ensemble"](cfg, data, 0)
    assert [m["epochs"] for m in out.models] == [2, 2, 2]  # 7 // 3 each; the spare epoch is not spent
    assert out.cost == {"train_epochs": 6, "train_sample_passes": 6 * len(data.train),
                        "eval_forward_passes": 3 * len(data.test)}
    assert len(out.test_probs) == 3
    first = out.states[0]["classifier.weight"]
    assert not any(torch.equal(first, s["classifier.weight"]) for s in out.states[1:])  # independent inits


@pytest.mark.slow
def test_bagging_members_see_different_subsets(make_config, data) -> None:
    subsets = bagging_subsets(100, 0.9, 3, seed=0)
    assert all(len(s) == 90 and len(np.unique(s)) == 90 for s in subsets)
    assert len({tuple(s) for s in subsets}) == 3
    assert all(np.array_equal(a, b) for a, b in zip(subsets, bagging_subsets(100, 0.9, 3, seed=0)))
    assert not np.array_equal(subsets[0], bagging_subsets(100, 0.9, 3, seed=1)[0])
    cfg = baseline(make_config, "bagging", budget_epochs=4, members=2, bagging_share=0.5)
    out = BASELINES["bagging"](cfg, data, 0)
    share = round(0.5 * len(data.train))
    assert [m["train_samples"] for m in out.models] == [share, share]
    assert out.cost == {"train_epochs": 4, "train_sample_passes": 4 * share,
                        "eval_forward_passes": 2 * len(data.test)}


@pytest.mark.slow
def test_snapshots_one_per_cosine_cycle(make_config, data, monkeypatch) -> None:
    seen = []

    def recording(schedule, step, total, **kw):
        factor = lr_factor(schedule, step, total, **kw)
        seen.append(factor)
        return factor

    monkeypatch.setattr(baselines, "lr_factor", recording)
    cfg = baseline(make_config, "snapshot", budget_epochs=6, members=3)
    out = BASELINES["snapshot"](cfg, data, 0)
    steps_per_epoch = math.ceil(len(data.train) / cfg.parent.batch_size)
    assert len(seen) == 6 * steps_per_epoch
    restarts = [i for i, f in enumerate(seen) if f == 1.0]
    assert restarts == [0, 2 * steps_per_epoch, 4 * steps_per_epoch]
    assert len(out.states) == 3 and [m["epochs"] for m in out.models] == [2, 4, 6]
    assert out.cost["train_epochs"] == 6 and out.cost["eval_forward_passes"] == 3 * len(data.test)
    assert not torch.equal(out.states[0]["classifier.weight"], out.states[2]["classifier.weight"])


@pytest.mark.slow
def test_fge_pretrains_then_snapshots_at_the_lr_minima(make_config, data, monkeypatch) -> None:
    seen = []

    def recording(schedule, step, total, **kw):
        factor = lr_factor(schedule, step, total, **kw)
        seen.append((schedule, factor))
        return factor

    monkeypatch.setattr(baselines, "lr_factor", recording)
    cfg = baseline(make_config, "fge", budget_epochs=6, members=2, fge_cycle_epochs=2, fge_lr_max=0.05,
                   fge_lr_min=0.0005)
    assert fge_epochs(cfg) == (3, 3)  # 2 cycles of 2 epochs, stopped at the second minimum
    out = BASELINES["fge"](cfg, data, 0)
    assert [m["epochs"] for m in out.models] == [4, 6]
    assert out.cost["train_epochs"] == 6 and len(out.test_probs) == 2
    spe = math.ceil(len(data.train) / cfg.parent.batch_size)
    cyclic = [f for s, f in seen if s == "cyclic_linear"]
    assert len(cyclic) == 3 * spe
    for snapshot_epoch in (0, 2):  # the last batch before each snapshot trains near fge_lr_min
        assert cyclic[(snapshot_epoch + 1) * spe - 1] * 0.05 < 0.05 / spe + 0.0005
    assert cyclic[2 * spe] == 1.0  # the second cycle starts again at fge_lr_max


@pytest.mark.slow
def test_mc_dropout_passes_differ_but_the_average_is_seeded(make_config, data) -> None:
    cfg = make_config({"method": "mc_dropout", "model": {"kwargs": {"hidden": [32], "dropout": 0.3}},
                       "baseline": {"budget_epochs": 2, "mc_samples": 4}})
    first = BASELINES["mc_dropout"](cfg, data, 0)
    again = BASELINES["mc_dropout"](cfg, data, 0)
    other = BASELINES["mc_dropout"](cfg, data, 1)
    assert len(first.test_probs) == 4
    assert not torch.allclose(first.test_probs[0], first.test_probs[1])
    mean = torch.stack(first.test_probs).mean(0)
    assert torch.equal(mean, torch.stack(again.test_probs).mean(0))
    assert not torch.allclose(mean, torch.stack(other.test_probs).mean(0))
    assert first.cost["eval_forward_passes"] == 4 * len(data.test)
    off = BASELINES["mc_dropout"](make_config({"method": "mc_dropout", "baseline": {
        "budget_epochs": 2, "mc_samples": 0, "dropout": 0.3}}), data, 0)
    assert len(off.test_probs) == 1 and off.cost["eval_forward_passes"] == len(data.test)


def test_mc_dropout_needs_a_dropout_layer(make_config, data) -> None:
    with pytest.raises(ConfigError) as err:
        check_baseline(baseline(make_config, "mc_dropout"), data)  # the tiny MLP has no dropout
    assert err.value.field == "baseline.dropout"
    cnn = make_config({"method": "mc_dropout", "model": {"name": "cnn2d", "kwargs": {}},
                       "baseline": {"dropout": 0.3}})
    with pytest.raises(ConfigError) as err:
        check_baseline(cnn, data)  # cnn2d takes no dropout keyword
    assert err.value.field == "baseline.dropout" and "dropout" in str(err.value)


# --- run directories ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_baseline_run_directory_matches_a_subnetwork_run(make_config, tmp_path: Path) -> None:
    sub = run(make_config(), progress=lambda line: None)
    cfg = make_config({"method": "deep_ensemble", "baseline": {"members": 2}})
    result = run(cfg, progress=lambda line: None)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics) and METRIC_KEYS - {"method"} <= set(sub.metrics)
    assert metrics["method"] == "deep_ensemble" and sub.metrics["method"] == "subnetworks"
    assert len(metrics["members"]) == len(metrics["growth"]) == 2
    assert [m["weights"] for m in json.loads((result.run_dir / "members.json").read_text())] == \
        ["members/0.pt", "members/1.pt"]
    assert all((result.run_dir / f"members/{i}.pt").is_file() for i in range(2))
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["method"] == "deep_ensemble"
    n_val, n_test = sub.metrics["cost"]["eval_forward_passes"] - 3 * 359, 359
    # 16 candidates on the 100-sample selection part (the other 100 validation samples are held back)
    assert sub.metrics["cost"] == {"train_epochs": 2, "train_sample_passes": 2 * 800,
                                   "eval_forward_passes": 8 * 2 * 100 + 3 * n_test}
    assert n_val == 8 * 2 * 100
    # A single model trained for the parent's budget with the run seed is exactly that run's parent.
    single = run(make_config({"method": "single"}), progress=lambda line: None)
    parent = torch.load(sub.run_dir / "parent.pt", weights_only=True)
    trained = torch.load(single.run_dir / "members/0.pt", weights_only=True)
    assert all(torch.equal(parent[k], trained[k]) for k in parent)
    assert single.metrics["ensemble"] == sub.metrics["parent"]
    with pytest.raises(UserError, match="baseline"):
        grow(result.run_dir, members=1, progress=lambda line: None)
    assert untimed(resume(result.run_dir, progress=lambda line: None).metrics) == untimed(result.metrics)


@pytest.mark.parametrize("extra, field", [
    ({"method": "ensemble"}, "method"),
    ({"method": "fge", "baseline": {"fge_cycle_epochs": 3, "budget_epochs": 20}}, "baseline.fge_cycle_epochs"),
    ({"method": "fge", "baseline": {"fge_lr_min": 0.1, "fge_lr_max": 0.05}}, "baseline.fge_lr_min"),
    ({"method": "fge", "baseline": {"budget_epochs": 6, "members": 4}}, "baseline.members"),
    ({"method": "deep_ensemble", "baseline": {"members": 3}}, "baseline.members"),  # budget: 2 epochs
    ({"method": "single", "parent": {"epochs": 0}}, "baseline.budget_epochs"),
    ({"method": "single", "model": {"parent_path": "parent.pt"}}, "model.parent_path"),
    ({"method": "bagging", "baseline": {"bagging_share": 0}}, "baseline.bagging_share"),
    ({"method": "mc_dropout", "baseline": {"mc_samples": -1}}, "baseline.mc_samples"),
])
def test_bad_baseline_configs_name_the_field(make_config, extra: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_config(extra)
    assert err.value.field == field


# --- the quality benchmark ---------------------------------------------------------------------------

@pytest.mark.parametrize("folder", sorted(p.name for p in (REPO / "configs" / "study").iterdir()
                                           if any(p.glob("*.yaml"))))
def test_study_configs_compare_every_method_at_one_budget(folder: str) -> None:
    """Each study folder: every method, one dataset, model and parent; matched-budget baselines spend what
    the noisy family spends, and a deep_ensemble-<N>x config N times that."""
    paths = sorted((REPO / "configs" / "study" / folder).glob("*.yaml"))
    configs = {p.stem: load_config(p) for p in paths}
    assert set(METHODS) <= {c.method for c in configs.values()}
    noisy = configs["noisy"]
    for name, cfg in configs.items():
        assert (cfg.data, cfg.model, cfg.parent) == (noisy.data, noisy.model, noisy.parent), name
        if cfg.method != "subnetworks":
            multiple = int(name.rsplit("-", 1)[1].rstrip("x")) if name.endswith("x") else 1
            assert baseline_budget(cfg) == multiple * subnetwork_budget_epochs(noisy), name


@pytest.mark.slow
def test_quality_runs_each_config_per_seed_and_tabulates(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "bench"
    folder.mkdir()
    for name, extra in {"noisy": {}, "single": {"method": "single"}}.items():
        text = yaml.safe_dump(tiny_dict(tmp_path / "unused", extra))
        (folder / f"{name}.yaml").write_text(text)
    tables = quality(seeds=[0, 1], config_dir=str(folder), output_dir=str(tmp_path / "runs"), executor="local")
    table = tables["bench"]
    assert list(table) == ["parent", "noisy", "single"]
    assert all(len(rows) == 2 for rows in table.values())
    # the single model of the parent's budget is the parent, seed by seed
    assert [r["accuracy"] for r in table["parent"]] == [r["accuracy"] for r in table["single"]]
    assert table["parent"][0]["train_epochs"] == table["single"][0]["train_epochs"] == 2
    assert table["noisy"][0]["accuracy"] != table["noisy"][1]["accuracy"]
    assert table["single"][0]["disagreement"] is None and table["noisy"][0]["disagreement"] > 0
    assert table["single"][0]["beats_parent"] is False  # it is the parent: not better
    assert all(r["nll_ts"] is not None and r["seconds"] > 0 for r in table["noisy"] + table["single"])
    out = capsys.readouterr().out
    assert format_table(table) in out and "+-" in out
    assert len(list((tmp_path / "runs" / "bench").iterdir())) == 4
    # A second call reads the finished runs back instead of running them again.
    again = quality(seeds=[0, 1], config_dir=str(folder), output_dir=str(tmp_path / "runs"), executor="local")
    assert again["bench"]["noisy"] == table["noisy"]


def test_cli_bench_quality_passes_its_options(monkeypatch) -> None:
    from evo_subens import cli
    from evo_subens.bench import quality as quality_module

    seen = {}
    monkeypatch.setattr(quality_module, "quality", lambda **kw: seen.update(kw))
    assert cli.main(["bench", "quality", "--seeds", "3,4", "--configs", "cfgs", "--executor", "local",
                     "--output-dir", "out", "--data-root", "fm"]) == 0
    assert seen == {"seeds": [3, 4], "config_dir": "cfgs", "data_root": "fm", "output_dir": "out",
                    "executor": "local"}


@pytest.mark.parametrize("folder", sorted(p.name for p in (REPO / "configs" / "study" / "loop").iterdir()))
def test_loop_bench_arms_spend_the_loops_budget(folder: str) -> None:
    """Each loop-bench folder: the loop and its arms on one dataset, model and parent, every arm spending
    the loop's training epochs."""
    configs = {p.stem: load_config(p) for p in sorted((REPO / "configs" / "study" / "loop" / folder).glob("*.yaml"))}
    loop = configs["loop"]
    assert loop.search.scoring == "tuned"
    assert {"gen0-topk", "random", "copies", "single", "mc_dropout"} <= set(configs)
    for name, cfg in configs.items():
        if name.startswith("loop-"):  # the loop from another parent (e.g. trained with dropout): same data
            assert cfg.data == loop.data and cfg.model.name == loop.model.name, name
        else:
            assert (cfg.data, cfg.model, cfg.parent) == (loop.data, loop.model, loop.parent), name
        spent = subnetwork_budget_epochs(cfg) if cfg.method == "subnetworks" else baseline_budget(cfg)
        assert spent == subnetwork_budget_epochs(loop), name
