"""The one way a worker keeps alive a row that others read as a sign of life: a claim's lease
(leases.LeaseKeeper), a batch's owner (leases.OwnerHeartbeat), a serving loop's row (loop.py).
It beats at start, then from a daemon thread, and leaves at the end; past the first beat no
failure is raised, and a row never left goes stale by itself.
(docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

import logging
import threading
from typing import Self

log = logging.getLogger(__name__)


class Heartbeat:
    what = "heartbeat"
    """The thread's name, and the word in its log lines."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.what, daemon=True)

    def beat(self) -> object:
        """One beat. False ends the beating: there is nothing left to keep alive."""
        raise NotImplementedError

    def leave(self) -> None:
        """Take the row away at the end, for those who would otherwise wait for it to go stale."""

    def start(self) -> Self:
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.leave()
        except Exception as exc:  # the row goes stale by itself
            log.warning("%s could not leave: %s", self.what, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.beat() is False:
                    return
            except Exception as exc:  # the store may be restarting: try again next beat
                log.warning("%s failed: %s", self.what, exc)
