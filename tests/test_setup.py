"""The Makefile's set-up of system packages (Fashion-MNIST, the Qt 5 runtime of EnvPool's ProcGen): apt-get
as root for what is missing, one line per package otherwise (a fake apt-get stands in for the real one)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make(tmp_path: Path, *variables: str, apt_exit: int = 0) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "apt.log"
    fake = tmp_path / "apt-get"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexit {apt_exit}\n')
    fake.chmod(0o755)
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "system-packages", f"APT_GET={fake}",
                           *variables], capture_output=True, text=True, timeout=60)
    return proc, log.read_text().splitlines() if log.exists() else []


def _missing(tmp_path: Path, *packages: str) -> list[str]:
    """Variables making the named system packages look absent and the others present."""
    absent = tmp_path / "none"
    return [f"FASHION_MNIST_DIR={absent if 'dataset-fashion-mnist' in packages else tmp_path}",
            f"QT5_GUI_LIB={absent if 'libqt5gui5' in packages else tmp_path}"]


def test_root_installs_the_dataset_with_apt_get(tmp_path: Path) -> None:
    proc, calls = _make(tmp_path, *_missing(tmp_path, "dataset-fashion-mnist"), "AS_ROOT=yes")
    assert proc.returncode == 0, proc.stderr
    assert calls == ["update -qq", "install -y -qq dataset-fashion-mnist"]


def test_root_installs_what_is_missing_in_one_go(tmp_path: Path) -> None:
    proc, calls = _make(tmp_path, *_missing(tmp_path, "libqt5gui5"), "AS_ROOT=yes")
    assert proc.returncode == 0 and calls == ["update -qq", "install -y -qq libqt5gui5"]
    proc, calls = _make(tmp_path, *_missing(tmp_path, "dataset-fashion-mnist", "libqt5gui5"), "AS_ROOT=yes")
    assert calls[-1] == "install -y -qq dataset-fashion-mnist libqt5gui5"


def test_failed_install_is_one_line_and_not_fatal(tmp_path: Path) -> None:
    proc, calls = _make(tmp_path, *_missing(tmp_path, "dataset-fashion-mnist"), "AS_ROOT=yes", apt_exit=100)
    assert proc.returncode == 0 and calls == ["update -qq"]
    assert proc.stdout.strip().splitlines()[-1].startswith("note: apt-get could not install dataset-fashion-mnist")


def test_without_root_one_line_says_what_to_install(tmp_path: Path) -> None:
    proc, calls = _make(tmp_path, *_missing(tmp_path, "dataset-fashion-mnist", "libqt5gui5"), "AS_ROOT=")
    assert proc.returncode == 0 and calls == []
    assert proc.stdout.strip().splitlines() == [
        "note: Fashion-MNIST configs and tests need the system package dataset-fashion-mnist: "
        "sudo apt-get install dataset-fashion-mnist",
        "note: ProcGen environments (procgen:<game>) and their tests need the system package libqt5gui5: "
        "sudo apt-get install libqt5gui5"]


def test_nothing_happens_when_installed(tmp_path: Path) -> None:
    proc, calls = _make(tmp_path, *_missing(tmp_path), "AS_ROOT=yes")
    assert proc.returncode == 0 and calls == [] and proc.stdout == ""


def test_ci_only_runs_the_readme_command() -> None:
    commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert commands == ["make test"]
