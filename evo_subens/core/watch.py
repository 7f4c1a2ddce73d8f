"""A background check of the cluster that runs beside the search, in a daemon thread of the driver."""

from __future__ import annotations

import threading


class Watch:
    """Runs :meth:`watch` in a daemon thread from :meth:`start` until :meth:`stop`; ``watch`` waits with
    ``self.stopped.wait(seconds)``, which returns True once the watch is stopped."""

    def __init__(self, name: str):
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self.watch, name=name, daemon=True)

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def watch(self) -> None:
        raise NotImplementedError
