"""Config loading, dotted overrides, validation errors that name the field, and `evo-subens config`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from evo_subens import cli
from evo_subens.core.config import RunConfig, config_from_dict, config_to_dict, field_docs, load_config
from evo_subens.errors import ConfigError, ConfigFileError
from evo_subens.families import FAMILIES

DEFAULT_YAML = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def _leaves(data: dict, prefix: str = "") -> dict:
    """Flatten a nested mapping into {dotted key: value}; empty mappings are leaves."""
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


def _get(cfg: RunConfig, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# --- loading and overrides --------------------------------------------------------------------------


def test_default_yaml_loads_every_value() -> None:
    """Every value written in configs/default.yaml ends up in the loaded RunConfig."""
    written = _leaves(yaml.safe_load(DEFAULT_YAML.read_text()))
    cfg = load_config(DEFAULT_YAML)
    assert written, "default.yaml is empty"
    for key, value in written.items():
        assert _get(cfg, key) == value, key


def test_no_config_file_gives_the_defaults() -> None:
    """load_config(None) is the dataclass defaults, with the scoring the default task resolves to and the
    driver's threads resolved to the CPUs this process may use."""
    defaults = RunConfig()
    defaults.search.scoring = "tuned"  # null: the classification task's
    defaults.workers.driver_threads = len(os.sched_getaffinity(0))
    assert load_config(None) == defaults


def test_dotted_overrides_apply(tmp_path: Path) -> None:
    """key=value overrides are parsed as YAML and win over the file's values."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"workers": {"num_actors": 4}, "search": {"population": 8}}))
    cfg = load_config(path, ["search.population=64", "children.layers=[a,b]", "workers.num_actors=null",
                             "children.sigma=0.25", "name=my-run"])
    assert cfg.search.population == 64
    assert cfg.children.layers == ["a", "b"]
    assert cfg.workers.num_actors is None
    assert cfg.children.sigma == 0.25
    assert cfg.name == "my-run"


def test_later_override_wins() -> None:
    """The last override of a key is the one that counts."""
    assert load_config(None, ["search.population=5", "search.population=7"]).search.population == 7


def test_int_accepted_for_float_field() -> None:
    """YAML '1' for a float field is a float 1.0, not a type error."""
    cfg = load_config(None, ["children.sigma=1"])
    assert cfg.children.sigma == 1.0 and isinstance(cfg.children.sigma, float)


def test_scientific_notation_override() -> None:
    """Float overrides accept scientific notation such as parent.lr=1e-3 (the usual way to write rates)."""
    assert load_config(None, ["parent.lr=1e-3"]).parent.lr == pytest.approx(1e-3)


def test_scientific_notation_in_yaml_file(tmp_path: Path) -> None:
    """A YAML config with `lr: 5e-2` loads (PyYAML alone reads '5e-2' as a string)."""
    path = tmp_path / "c.yaml"
    path.write_text("parent:\n  lr: 5e-2\n  weight_decay: 1e-4\n")
    cfg = load_config(path)
    assert cfg.parent.lr == pytest.approx(0.05) and cfg.parent.weight_decay == pytest.approx(1e-4)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    """The resolved config (what a run writes as config.yaml) loads back into an equal RunConfig."""
    cfg = load_config(DEFAULT_YAML, ["search.population=12", "children.layers=['features.*']"])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    assert load_config(path) == cfg


# --- rejections -------------------------------------------------------------------------------------

VALID = {"search": {"population": 8, "generations": 2, "elites": 2}, "ensemble": {"size": 4}}


def _merge(extra: dict) -> dict:
    out = {k: dict(v) for k, v in VALID.items()}
    for key, value in extra.items():
        if isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        else:
            out[key] = value
    return out


BAD = [
    pytest.param({"bogus": 1}, "bogus", id="unknown-top-level"),
    pytest.param({"search": {"popsize": 3}}, "search.popsize", id="unknown-nested"),
    pytest.param({"search": {"population": "ten"}}, "search.population", id="string-for-int"),
    pytest.param({"search": {"population": True}}, "search.population", id="bool-for-int"),
    pytest.param({"search": {"population": [8]}}, "search.population", id="list-for-int"),
    pytest.param({"workers": {"num_actors": "two"}}, "workers.num_actors", id="string-for-optional-int"),
    pytest.param({"children": {"density": 0}}, "children.density", id="density-0"),
    pytest.param({"children": {"density": 1.5}}, "children.density", id="density-1.5"),
    pytest.param({"children": {"sigma": -0.1}}, "children.sigma", id="negative-sigma"),
    pytest.param({"search": {"population": 0}}, "search.population", id="population-0"),
    pytest.param({"ensemble": {"size": 17}}, "ensemble.size", id="ensemble-larger-than-search"),
    pytest.param({"search": {"elites": 9, "scoring": "raw"}}, "search.elites", id="elites-above-population"),
    pytest.param({"children": {"subspace": "foo"}}, "children.subspace", id="bad-choice"),
    pytest.param({"model": {"architecture": "mypackage.MyNet"}}, "model.architecture", id="architecture-no-colon"),
    pytest.param({"search": 3}, "search", id="section-not-a-mapping"),
]


@pytest.mark.parametrize("extra,field", BAD)
def test_bad_values_name_the_field(extra: dict, field: str) -> None:
    """Each bad value raises ConfigError whose .field is the dotted name, and the message names it."""
    config_from_dict(_merge({}))  # the base itself is valid
    with pytest.raises(ConfigError) as info:
        config_from_dict(_merge(extra))
    assert info.value.field == field
    assert field in str(info.value)


def test_ensemble_size_equal_to_candidates_is_allowed() -> None:
    """ensemble.size may be exactly population * generations."""
    assert config_from_dict(_merge({"ensemble": {"size": 16}})).ensemble.size == 16


@pytest.mark.parametrize("override,field", [
    ("search.population=ten", "search.population"),
    ("search.population=true", "search.population"),
    ("search.population=[1]", "search.population"),
    ("children.subspace=foo", "children.subspace"),
    ("search.nonsense=1", "search.nonsense"),
])
def test_bad_overrides_name_the_field(override: str, field: str) -> None:
    """Overrides go through the same validation as the file."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.field == field and field in str(info.value)


def test_override_without_equals_is_rejected() -> None:
    """'search.population' without '=value' is an error, not silently ignored."""
    with pytest.raises(ConfigError, match="key=value|section.field=value"):
        load_config(None, ["search.population"])


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    """A missing config file is a ConfigFileError naming the path."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigFileError, match="nope.yaml does not exist"):
        load_config(missing)


# --- the CLI on bad configs -------------------------------------------------------------------------


def test_cli_bad_config_exits_2_without_traceback(tmp_path: Path, cli_command: list[str]) -> None:
    """`evo-subens run <bad config>`: exit 2, one line naming the field, no traceback, no run directory."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"search": {"population": 0}, "workers": {"executor": "local"}}))
    proc = subprocess.run([*cli_command, "run", str(path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "search.population" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override,field", [
    ("children.layers=[nomatch.*]", "children.layers"),
    ("model.kwargs={hidden: -1}", "model.kwargs"),
    ("data.validation_size=5000", "data.validation_size"),
])
def test_cli_errors_found_while_building_leave_no_run_directory(
        tmp_path: Path, tiny_yaml_text: str, capsys: pytest.CaptureFixture, override: str, field: str) -> None:
    """Config errors only detectable with the model/data (layer patterns, model kwargs, split sizes)
    also exit 2 and must not leave a half-made run directory that blocks re-running under that name."""
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_yaml_text)
    runs = tmp_path / "runs"
    code = cli.main(["run", str(path), override, f"output_dir={runs}", "name=broken"])
    assert code == 2
    err = capsys.readouterr().err
    assert field in err
    assert not (runs / "broken").exists(), f"a failed run left {sorted(p.name for p in (runs / 'broken').iterdir())}"


# --- field docs -------------------------------------------------------------------------------------


def test_every_field_has_a_doc() -> None:
    """field_docs covers every leaf field of the resolved config of every family, each with a non-empty doc;
    a family's fields say which family they belong to."""
    docs = field_docs()
    names = {name for name, _, _ in docs}
    leaves = set()
    for family in FAMILIES:
        family_leaves = set(_leaves(config_to_dict(load_config(None, [f"children.family={family}"]))))
        tagged = {name for name, doc, _ in docs if doc.startswith(f"[{family}] ")}
        assert {name for name in family_leaves if name.startswith("children.")} - {"children.family"} == tagged
        leaves |= family_leaves
    assert names == leaves
    empty = [name for name, doc, _ in docs if not doc.strip()]
    assert not empty, f"fields without a doc: {empty}"


def test_config_fields_command_lists_every_field(capsys: pytest.CaptureFixture) -> None:
    """`evo-subens config --fields` prints one line per field (per family for the children's) with its doc
    and default."""
    assert cli.main(["config", "--fields"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, doc, default in field_docs():
        matching = [line for line in lines if line.split()[0] == name and doc in line]
        assert len(matching) == 1, (name, doc)
        assert repr(default) in matching[0]


def test_config_command_prints_resolved_config(capsys: pytest.CaptureFixture) -> None:
    """`evo-subens config FILE key=value` prints the validated config with the override applied."""
    assert cli.main(["config", str(DEFAULT_YAML), "search.population=12"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["search"]["population"] == 12
    assert printed == config_to_dict(load_config(DEFAULT_YAML, ["search.population=12"]))


@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("**/*.yaml")
                                        if p.parent.name != "ray"),
                         ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_configs_are_valid(path: Path) -> None:
    """Every config under configs/ loads and passes validation (no drift from the schema)."""
    cfg = load_config(path)
    assert cfg.search.population >= cfg.search.elites
