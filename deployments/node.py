"""What one node runs besides its Prefect worker: a serving loop per GPU — per tensor-parallel
group for vLLM in process, one for a served engine (the server spreads its own GPUs) — each
a process of its own, so each can be given its devices before CUDA starts in it."""

from __future__ import annotations

import os
import sys

from blocks.engines import VLLM, load_engine_block


def loop_commands(
    engine: str | None, model: str | None, gpus: int, *, db: str | None, chunk_size: int
) -> list[tuple[list[str], dict[str, str]]]:
    """(command, environment) of each loop `offline-queue worker start` keeps running."""
    block = load_engine_block(engine, model)
    base = [sys.executable, "-m", "entrypoints.cli", "worker", "loop"]
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
