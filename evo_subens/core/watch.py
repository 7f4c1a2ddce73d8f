"""A background check of the cluster that runs beside the search, in a daemon thread of the driver."""

from __future__ import annotations

import threading


class Watch:
    """Runs :meth:`watch` in a daemon thread from :meth:`start` until :meth:`stop`; ``watch`` waits with
    ``self.stopped.wait(seconds)``, which returns True once the watch is stopped, and keeps each call it
    makes to Ray shorter than :attr:`STOP_WAIT_S`."""

    STOP_WAIT_S = 10.0  # how long stop() waits for the thread to see it

    def __init__(self, name: str):
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self.watch, name=name, daemon=True)

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the watch and wait for its thread to end: the caller may then shut Ray down or close the
        actors without a call of the watch's in flight."""
        self.stopped.set()
        if self._thread.is_alive():
            self._thread.join(self.STOP_WAIT_S)

    def watch(self) -> None:
        raise NotImplementedError
