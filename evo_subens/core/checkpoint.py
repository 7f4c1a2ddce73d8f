"""Run checkpoints: everything needed to go on, written atomically, the last few kept.

A checkpoint is a ``torch.save`` of plain data (dicts, lists, numbers, strings, tensors) and loads with
``torch.load(..., weights_only=True)``: resuming never unpickles arbitrary objects. It holds the stage
reached, the config, the search state (candidate records, elites, the search RNG), the members and how
many are fine-tuned, and every global RNG state (Python, NumPy, torch CPU and CUDA).

Files are ``checkpoints/ckpt-<seq>.pt``, ``seq`` increasing; resuming takes the newest one that loads
and falls back to older ones (saying so) when the newest is truncated or corrupted.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import RunDirError
from .faults import crash_point
from .progress import after_generations
from .rundir import atomic_write
from .state import STAGES

FORMAT = 1
KEEP = 3
REQUIRED_KEYS = {"format", "seq", "stage", "config", "parent_id", "search", "members", "tuned", "rng"}


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as plain data."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}
    return {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.array(np_state["state"]["key"], dtype=np.uint32),
                         "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path) -> Path:
    """``run_dir/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def _checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files, newest first."""
    return sorted(checkpoint_dir(run_dir).glob("ckpt-*.pt"), reverse=True)


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as the next checkpoint (atomically) and drop all but the newest :data:`KEEP`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(exist_ok=True)
    existing = _checkpoints(run_dir)
    seq = int(existing[0].stem.split("-")[1]) + 1 if existing else 1
    payload = dict(state, format=FORMAT, seq=seq, rng=rng_state())
    path = folder / f"ckpt-{seq:06d}.pt"

    def write(handle) -> None:
        torch.save(payload, handle)
        crash_point("checkpoint.write")  # the temp file is written, the rename has not happened yet

    atomic_write(path, write)
    for old in _checkpoints(run_dir)[KEEP:]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """One checkpoint, validated; :class:`RunDirError` naming the file when it cannot be used."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, refused type: all mean "unusable"
        raise RunDirError(f"checkpoint {path} is unreadable ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not REQUIRED_KEYS <= set(state):
        raise RunDirError(f"checkpoint {path} is not an evo_subens checkpoint (missing keys)")
    if state["format"] != FORMAT or state["stage"] not in STAGES:
        raise RunDirError(f"checkpoint {path} has an unknown format {state['format']!r} or stage "
                          f"{state['stage']!r}")
    return state


def load_latest_checkpoint(run_dir: Path, report: Callable[[str], None]) -> dict[str, Any] | None:
    """The newest usable checkpoint of ``run_dir`` (None if it has none); unusable newer ones are reported."""
    for path in _checkpoints(run_dir):
        try:
            state = load_checkpoint(path)
        except RunDirError as exc:
            report(f"[resume] {exc}; falling back to the previous checkpoint")
            continue
        done = state["search"]["generation"] if state["search"] else 0
        planned = state["config"]["search"]["generations"]
        report(f"[resume] from {path.name}: stage {state['stage']}, {after_generations(done, planned)}")
        return state
    if _checkpoints(run_dir):
        raise RunDirError(f"no usable checkpoint in {checkpoint_dir(run_dir)}")
    return None


def describe_stop(run_dir: Path) -> str:
    """Where a stopped run is, from its newest usable checkpoint: e.g. ``after generation 1 (2 of 4)``
    (generations named by their population-log index, as in the progress lines)."""
    try:
        state = load_latest_checkpoint(Path(run_dir), lambda line: None)
    except RunDirError:
        state = None
    if state is None:
        return "before its first checkpoint (resume starts it again)"
    stage = state["stage"]
    if stage == "parent":
        return "after training the parent"
    if stage == "search":
        return after_generations(state["search"]["generation"], state["config"]["search"]["generations"])
    if stage == "members":
        return "after selecting the members"
    if stage == "finetune":
        return f"after fine-tuning {state['tuned']} of {len(state['members'])} members"
    return "finished"
