"""The one way a worker keeps a row alive that others read as a sign of life: a claim's lease
(leases.LeaseKeeper), a batch's owner (leases.OwnerHeartbeat), a serving loop's row
(loop.py).

Each beats once when it starts (before anything runs on it; a failure there is the caller's),
then every `interval` seconds from a daemon thread until stopped, and leaves once at the end.
From then on no failure is raised: a beat that fails is logged and tried again at the next one
(the store may be restarting), and a row that is never left goes stale and stops counting by
itself — which is also what happens to the rows of a worker killed with -9.
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
