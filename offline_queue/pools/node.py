"""What one node runs: a serving loop per GPU — per tensor-parallel group for vLLM in process,
one for a served engine (the server spreads its own GPUs) — each a process of its own, so each
can be given its devices before CUDA starts in it; and the Prefect worker for the batches' runs.
`Node` keeps them running and stops them together."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from offline_queue.blocks.engines import VLLM, load_engine_block

Command = tuple[list[str], dict[str, str]]
_PR_SET_PDEATHSIG = 1


def loop_commands(
    engine: str | None, model: str | None, gpus: int, *, db: str | None, chunk_size: int
) -> list[Command]:
    """(command, environment) of each loop `offline-queue worker start` keeps running."""
    block = load_engine_block(engine, model)
    base = [sys.executable, "-m", "offline_queue.cli", "worker", "loop"]
    base += ["--chunk-size", str(chunk_size)]
    if engine:
        base += ["--engine", engine]
    if model:
        base += ["--model", model]
    if db:
        base += ["--db", db]
    if not isinstance(block, VLLM):
        return [(base, dict(os.environ))]
    tp = max(block.tensor_parallel_size, 1)
    commands = []
    for first in range(0, max(gpus // tp, 1) * tp, tp):
        devices = ",".join(str(d) for d in range(first, first + tp))
        commands.append((base, {**os.environ, "CUDA_VISIBLE_DEVICES": devices}))
    return commands


def _die_with_parent() -> None:
    """In the child: SIGTERM when `worker start` goes, however it goes (kill -9 included), so a
    loop drains and the Prefect worker stops instead of serving on as orphans."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Node:
    """The loops and the Prefect worker of one node, supervised: a loop that exits non-zero is
    started again (its leases run out; it loads its engine again), one that exits 0 was drained
    and stays down; `stop` sends SIGTERM to all at once (loops drain) and waits for them."""

    def __init__(self, loops: Sequence[Command], worker: list[str], say: Callable[[str], None]):
        self.loops, self.say = list(loops), say
        self.children = {i: self._start(*cmd) for i, cmd in enumerate(self.loops)}
        self.worker = self._start(worker, dict(os.environ))

    @staticmethod
    def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)

    def supervise(self, stopping: Callable[[], bool]) -> None:
        """Until `stopping()` or the Prefect worker ends."""
        while not stopping() and self.worker.poll() is None:
            for i, child in list(self.children.items()):
                code = child.poll()
                if code == 0:
                    self.say(f"serving loop {i} drained")
                    del self.children[i]
                elif code is not None:
                    self.say(f"serving loop {i} exited {code}: starting it again")
                    self.children[i] = self._start(*self.loops[i])
            time.sleep(1.0)

    def stop(self, grace: float = 120.0) -> None:
        procs = [*self.children.values(), self.worker]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
