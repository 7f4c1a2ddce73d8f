"""Resident memory of the driver and of Ray actors, for the benchmarks' memory columns."""

from __future__ import annotations

import resource
import threading

import ray


def rss_mb() -> float:
    """This process's private resident memory now (Linux ``/proc``; elsewhere its lifetime peak).

    Shared pages are left out: they are Ray's object store, which keeps pages the driver once wrote (a
    bounded arena of Ray's, not the driver's), and would carry one method's transfers into the next's.
    """
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return (int(fields["RssAnon"].split()[0]) + int(fields["RssFile"].split()[0])) / 1024
    except (OSError, KeyError):
        return peak_rss_mb()


def peak_rss_mb(_instance: object = None) -> float:
    """Peak resident memory of the calling process; run on an actor through ``__ray_call__``."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class DriverPeak:
    """Samples the driver's resident memory in a background thread while the ``with`` block runs."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, rss_mb())
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "DriverPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


def actors_peak_mb(actors: list) -> float:
    """The largest peak resident memory among ``actors`` (any Ray actor handles)."""
    return max(ray.get([a.__ray_call__.remote(peak_rss_mb) for a in actors]))
