"""A subprocess's output read line by line within a deadline.

Iterating ``proc.stdout`` waits for a line or for end of file with no bound: a run that hangs, or a
process it started that still holds the pipe after the run itself is gone, would hold the test (and the
whole suite) forever. :class:`Lines` reads the stream in a daemon thread and every wait it offers is
bounded, failing with the output seen so far.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import IO

_END = None  # put on the queue at end of file


class Lines:
    """The lines of ``stream`` (a text pipe of a ``subprocess.Popen``), read as they arrive; ``beside``: the
    same process's other stream, whose output failure messages show too."""

    def _read(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._queue.put(line)
        except (OSError, ValueError):  # the test closed the pipe
            pass
        self._queue.put(_END)

    def __init__(self, stream: IO[str], beside: Lines | None = None):
        self.seen: list[str] = []  # every line handed out so far, in order
        self.beside = beside  # the process's other stream: its output goes into failure messages too
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._ended = False
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _failure(self, what: str) -> AssertionError:
        text = f"{what}; the output so far:\n" + "".join(self.seen)[-3000:]
        if self.beside is not None:
            time.sleep(0.5)  # what the other stream's thread has yet to hand over
            while True:
                try:
                    line = self.beside._queue.get_nowait()
                except queue.Empty:
                    break
                if line is not _END:
                    self.beside.seen.append(line)
            text += "\nand on the other stream:\n" + "".join(self.beside.seen)[-3000:]
        return AssertionError(text)

    def _next(self, deadline: float, waiting_for: str) -> str | None:
        try:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise self._failure(f"{waiting_for}: nothing within the deadline") from None
        if line is _END:
            self._ended = True
        else:
            self.seen.append(line)
        return line

    def next_line(self, timeout: float = 300) -> str | None:
        """The next line, or None at the end of the stream."""
        if self._ended:
            return None
        return self._next(time.monotonic() + timeout, "waiting for the next line")

    def until(self, prefix: str, timeout: float = 300) -> list[str]:
        """Every line read so far, up to and including the first that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        while not self._ended:
            line = self._next(deadline, f"waiting for a line starting with {prefix!r}")
            if line is not None and line.startswith(prefix):
                return list(self.seen)
        raise self._failure(f"no line starting with {prefix!r}")

    def rest(self, timeout: float = 300) -> str:
        """Everything read, up to the end of the stream (the process and every holder of its pipe gone)."""
        deadline = time.monotonic() + timeout
        while not self._ended:
            self._next(deadline, "waiting for the end of the output")
        return "".join(self.seen)
