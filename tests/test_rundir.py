"""The run directory: creation, refusal to overwrite, unique default names, atomic writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from evo_subens.core.config import load_config
from evo_subens.errors import RunDirError
from evo_subens.core.rundir import atomic_write, create_run_dir, write_text


def test_create_writes_resolved_config(make_config) -> None:
    """create_run_dir makes output_dir/name with a config.yaml that reloads to the same config."""
    cfg = make_config({"name": "first"})
    run_dir = create_run_dir(cfg)
    assert run_dir == Path(cfg.output_dir) / "first"
    assert load_config(run_dir / "config.yaml") == cfg


def test_existing_run_directory_is_refused(make_config) -> None:
    """A non-empty run directory is never reused; an empty one (e.g. made by hand) is."""
    cfg = make_config({"name": "taken"})
    run_dir = create_run_dir(cfg)
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(RunDirError, match="already exists") as info:
        create_run_dir(cfg)
    assert str(run_dir) in str(info.value)
    assert (run_dir / "metrics.json").read_text() == "{}"

    empty = Path(cfg.output_dir) / "empty"
    empty.mkdir()
    assert create_run_dir(make_config({"name": "empty"})) == empty


def test_default_names_are_unique(make_config) -> None:
    """name=null: runs of one config and seed started in the same second (a sweep launched in a loop)
    each get their own directory instead of failing or sharing one."""
    cfg = make_config({"name": None})
    first = create_run_dir(cfg, "sweep")
    second = create_run_dir(cfg, "sweep")
    assert first != second
    assert first.name.startswith("sweep-s0-") and second.name.startswith("sweep-s0-")


def test_atomic_write_keeps_old_file_on_error(tmp_path: Path) -> None:
    """A write that fails half-way leaves the previous file intact and no temporary files behind."""
    path = tmp_path / "metrics.json"
    write_text(path, "old")

    def broken(handle) -> None:
        handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_respects_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Run files get the permissions open() would give them, so a team can read a run on shared storage
    (the temp file they are written through is owner-only)."""
    previous = os.umask(umask)
    try:
        write_text(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == mode
