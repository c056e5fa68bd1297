"""Starting and stopping the instruments' processes: where the venv's programs are, how a
driver unwinds on SIGTERM, how to wait for a condition a process will make true, and a server
started, awaited and stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

BIN = Path(sys.executable).parent
T = TypeVar("T")


def exit_on_sigterm() -> None:
    """SIGTERM (a `kill`, a CI timeout) unwinds like Ctrl-C: the services' `finally` blocks
    run, so no PostgreSQL, Prefect or vLLM server is left behind."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


def children(pid: int) -> list[int]:
    """The direct children of `pid`, from /proc (no psutil needed for one level)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def stop(*procs: subprocess.Popen[Any], grace: float = 30, group: bool = False) -> None:
    """SIGTERM to every one at once, then each waited for `grace` seconds, and SIGKILLed if it
    has not ended: a server that ignores the first signal does not outlive its test. `group`:
    each was started in a session of its own, and the signals go to its whole process group
    (what it started goes with it)."""

    def signal_(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    for proc in procs:
        signal_(proc, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            signal_(proc, signal.SIGKILL)
            proc.wait(10)


@contextlib.contextmanager
def serving(
    cmd: list[str],
    ready: Callable[[], bool],
    log_path: Path,
    *,
    timeout: float,
    interval: float = 0.2,
    grace: float = 30,
    **popen: Any,
) -> Iterator[subprocess.Popen[bytes]]:
    """A server process, its output in `log_path`, yielded once `ready()` (its health URL
    answers); if it dies first, the tail of its log is the error. Stopped on the way out
    (`stop`, with `grace`; the whole process group when started with `start_new_session`); its
    `returncode` then says how it ended."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **popen)
        try:
            wait_for(lambda: proc.poll() is not None or ready(), timeout, interval)
            if proc.poll() is not None:
                raise RuntimeError(log_path.read_text()[-2000:])
            yield proc
        finally:
            stop(proc, grace=grace, group=popen.get("start_new_session", False))
