"""Progress output: one line per step; on a terminal, also a bar with an ETA under those lines.

Runs report through a ``progress(line)`` callable. The default, :func:`say`, prints each line at once
(flushed, so a piped run shows every step as it happens). While a :class:`Steps` bar is open on a
terminal, :func:`say` prints above it (tqdm keeps the bar on the last line), so a stage's own lines and
any others interleave cleanly. Any other callable (a test's ``lines.append``) gets the same lines and
never a bar.

The run's clock starts when the command line starts (imports, Ray start-up and data loading included),
so the closing ``(Ns)`` is the wall time the user waited; from Python it starts when ``run`` is called.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

Progress = Callable[[str], None]

_bars: list = []  # the open tqdm bars, innermost last
_clock: dict[str, float | None] = {"cli": None, "run": None}


def say(line: str) -> None:
    """Print a progress line now: above the open bar on a terminal, else as a plain flushed line."""
    if _bars:
        _bars[-1].write(line, file=sys.stdout)
    else:
        print(line, flush=True)


def _on_terminal(progress: Progress) -> bool:
    return progress is say and sys.stdout.isatty()


class Steps:
    """``total`` steps of one stage. :meth:`step` reports a step done (with its line); on a terminal a bar
    shows the steps done and the time left."""

    def __init__(self, progress: Progress, total: int, label: str, unit: str = "step"):
        self.progress = progress
        self.bar = None
        if total > 0 and _on_terminal(progress):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit=f" {unit}", leave=False, file=sys.stdout,
                            dynamic_ncols=True, bar_format="{desc} {n_fmt}/{total_fmt}{unit} |{bar}| "
                                                           "{elapsed}<{remaining} left")
            _bars.append(self.bar)

    def step(self, line: str | None = None) -> None:
        """One step done; ``line`` (if any) is printed for it."""
        if line is not None:
            self.progress(line)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """Remove the bar (the lines stay)."""
        if self.bar is not None:
            self.bar.close()
            _bars.remove(self.bar)
            self.bar = None

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generation_name(index: int, planned: int | None = None) -> str:
    """``generation 2 (3 of 4)``: the 0-based index the population log, metrics and plots use (the parent's
    reference row is generation -1), then how far through the planned generations that is."""
    return f"generation {index}" + (f" ({index + 1} of {planned})" if planned else "")


def after_generations(done: int, planned: int | None = None) -> str:
    """``after generation 1 (2 of 4)`` once ``done`` generations ran; ``before generation 0`` when none did."""
    return "before generation 0" if done <= 0 else f"after {generation_name(done - 1, planned)}"


def generation_span(first: int, last: int) -> str:
    """``generation 3`` or ``generations 2-3``: a range of population-log indices."""
    return f"generation {first}" if first == last else f"generations {first}-{last}"


def process_age() -> float:
    """Seconds since this process started (its imports included); 0 where ``/proc`` cannot tell."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def start_cli_clock(with_process: bool = True) -> None:
    """The command line started: the next run's clock starts now, or with the process (Python's start
    and the imports before the command line's code ran) when ``with_process`` (the ``evo-subens``
    program, not a call of its ``main`` from other code)."""
    _clock["cli"] = time.perf_counter() - (process_age() if with_process else 0.0)


def start_run_clock() -> None:
    """A run, resume or grow starts: from the command line's start when it ran one, else from now."""
    _clock["run"] = _clock["cli"] if _clock["cli"] is not None else time.perf_counter()
    _clock["cli"] = None  # a later run in the same process times itself


def run_seconds() -> float:
    """Wall seconds since the current run's clock started."""
    started = _clock["run"]
    return time.perf_counter() - (started if started is not None else time.perf_counter())
