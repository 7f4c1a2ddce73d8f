"""Shared fixtures: one Ray instance per test session and tiny run configs.

Tiny means seconds per run on 2 CPU cores: the 8x8 digits capped at 1,000 pool samples, an MLP with
one 32-unit hidden layer, 2 parent epochs, 8 candidates x 2 generations and a 3-member ensemble.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from evo_subens.core.config import RunConfig, config_from_dict

REPO = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "seed": 0,
    "data": {"name": "digits", "num_samples": 1000, "validation_size": 0.2},
    "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
    "parent": {"epochs": 2, "batch_size": 64, "lr": 0.1},
    "children": {"density": 0.2, "sigma": 0.5, "sigma_mode": "relative"},
    # Every generation runs and every selected candidate joins, so tests can count rows and members; the
    # tests of early stopping, fine-tuning and acceptance turn them on.
    "search": {"population": 8, "generations": 2, "elites": 3, "fitness": "accuracy", "patience": 0, "scoring": "raw"},
    "workers": {"executor": "local"},
    "finetune": {"epochs": 0},
    "ensemble": {"size": 3, "acceptance": False},
}


# Run-time facts, not functions of the config: when, where and how fast each candidate ran.
RUNTIME_COLUMNS = ["eval_seconds", "finished_at", "worker", "node", "host"]
# The same facts in metrics.json (each generation's wall time and end).
RUNTIME_KEYS = ("seconds", "finished_at")


def untimed(value: Any) -> Any:
    """``value`` (e.g. a run's metrics) with every wall-clock entry (:data:`RUNTIME_KEYS`) dropped, recursively."""
    if isinstance(value, dict):
        return {key: untimed(item) for key, item in value.items() if key not in RUNTIME_KEYS}
    if isinstance(value, list):
        return [untimed(item) for item in value]
    return value


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated recursively by ``extra`` (a new dict; neither input is modified)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_dict(output_dir: Path | str, extra: dict | None = None) -> dict:
    """The tiny config as a nested mapping writing runs under ``output_dir``, updated by ``extra``."""
    return deep_merge(dict(TINY, output_dir=str(output_dir)), extra or {})


def build_tiny_config(output_dir: Path | str, extra: dict | None = None) -> RunConfig:
    """A validated tiny :class:`RunConfig` (through the package's own ``config_from_dict``)."""
    return config_from_dict(tiny_dict(output_dir, extra))


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., RunConfig]:
    """Factory ``tiny_config(output_dir, extra=None)``; usable from module-scoped fixtures."""
    return build_tiny_config


@pytest.fixture()
def make_config(tmp_path: Path) -> Callable[..., RunConfig]:
    """Factory ``make_config(extra=None)`` of tiny configs whose runs go under this test's tmp_path."""

    def make(extra: dict | None = None) -> RunConfig:
        return build_tiny_config(tmp_path / "runs", extra)

    return make


@pytest.fixture(scope="session")
def tiny_yaml_text() -> str:
    """The tiny config as YAML text (without output_dir), for CLI tests."""
    import yaml

    return yaml.safe_dump(TINY, sort_keys=False)


@pytest.fixture(scope="session")
def cli_command() -> list[str]:
    """How to invoke ``evo-subens``: the venv's console script, else ``python -m evo_subens.cli``."""
    script = Path(sys.executable).parent / "evo-subens"
    return [str(script)] if script.exists() else [sys.executable, "-m", "evo_subens.cli"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that asks for the session's Ray is a `ray` test even where its mark was forgotten, so that
    `make test-fast` (-m "not ray ...") never starts Ray.

    Under pytest-xdist (`make test`: -n 2 --dist loadscope, each process runs whole modules, so a
    module's shared runs are made once) the modules holding more slow tests go first, so that the
    longest do not start last."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)
    if getattr(config, "workerinput", None) is None:  # not an xdist worker: the order as written
        return
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    slow = {name: sum(item.get_closest_marker("slow") is not None for item in tests) for name, tests in modules.items()}
    items[:] = [item for name in sorted(modules, key=lambda name: -slow[name]) for item in modules[name]]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) for the whole session (under pytest-xdist: for each process that
    runs a test needing it); ``ensure_ray`` then reuses it."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
        started = True
    yield ray
    if started:
        ray.shutdown()
