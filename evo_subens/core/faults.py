"""Crash points for crash-safety tests: ``EVO_SUBENS_CRASH_AT=<point>[:<n>]`` SIGKILLs the process
the n-th time (default 1st) it reaches ``<point>``. Unset, a crash point costs one dict lookup.

Points: ``search.mid_generation`` (half of a generation's candidates evaluated in-process),
``search.after_generation`` (a generation logged and checkpointed), ``checkpoint.write`` (temp file
written, not yet renamed), ``finetune.after_member`` (one member tuned and saved).
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``EVO_SUBENS_CRASH_AT`` names this point and visit."""
    target = os.environ.get("EVO_SUBENS_CRASH_AT")
    if not target:
        return
    point, _, nth = target.partition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
