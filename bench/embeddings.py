"""Embeddings through the batch flow against bare `vllm.LLM.embed`, on the bundled embedding model.

    .venv/bin/python bench/embeddings.py [--inputs 10000] [--chunk-size 1024]

The same texts, one per line, embedded by bare `LLM.embed` (the vectors left in memory) and by
the batch flow (the code `offline-queue run` runs: validate and queue, claim, tokenize, embed,
store every vector as an OpenAI embeddings body, write the output file), in this one process
with the one engine. Prints both times, embeddings per second, and
`RESULT embed_overhead_ratio <flow seconds / bare seconds>` (target ≤ 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The flow runs here and is served by a loop of this process, as `offline-queue run` does.
os.environ["OFFLINE_QUEUE_SERVE_HERE"] = "1"

import bench.quiet  # noqa: E402, F401  (before Prefect and vLLM)

_WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "tree",
    "river",
    "city",
    "night",
    "quickly",
    "slowly",
    "blue",
]


def text(i: int) -> str:
    """A sentence of 6-30 words, different for every i."""
    words = [_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(6 + i % 25)]
    return f"Sentence {i}: " + " ".join(words) + "."


def write_file(path: Path, start: int, n: int) -> Path:
    with path.open("w") as f:
        for i in range(start, start + n):
            body = {"model": "all-minilm-l6-v2", "input": text(i)}
            line = {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": body}
            f.write(json.dumps(line) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--chunk-size", type=int, default=1024)
    args = parser.parse_args()
    n = args.inputs

    from offline_queue.engines.vllm_local import VLLMSettings, local_engine
    from offline_queue.flows.batch import batch_inference
    from offline_queue.model import BUNDLED_EMBEDDING_NAME

    engine = local_engine(VLLMSettings(model=BUNDLED_EMBEDDING_NAME))
    with tempfile.TemporaryDirectory(prefix="oq-bench-") as tmp:
        work = Path(tmp)
        db = f"sqlite:///{work / 'bench.db'}"
        # Warm-up: engine, Prefect (its temporary server starts on the first flow run), store.
        batch_inference(input=str(write_file(work / "warm.jsonl", 10 * n, 64)), db=db)
        engine.llm.embed([text(i) for i in range(20 * n, 20 * n + 64)], use_tqdm=False)

        texts = [text(i) for i in range(n)]
        started = time.perf_counter()
        outs = engine.llm.embed(texts, use_tqdm=False)
        bare = time.perf_counter() - started
        assert len(outs) == n

        # Other texts of the same shapes: the result cache must not answer the flow's lines.
        path = write_file(work / "bench.jsonl", n, n)
        started = time.perf_counter()
        result = batch_inference(input=str(path), db=db, chunk_size=args.chunk_size)
        flow = time.perf_counter() - started
        assert result["request_counts"]["completed"] == n, result["request_counts"]
        assert result["run"]["inferred"] == n, result["run"]

    print(
        f"({n} inputs, chunk_size {args.chunk_size}, {platform.machine()} {os.cpu_count()} cores)"
    )
    for label, seconds in (("bare vllm.LLM.embed", bare), ("offline-queue flow", flow)):
        print(f"{label:20}: {seconds:7.2f} s  {n / seconds:7.1f} embeddings/s")
    print(f"RESULT embed_overhead_ratio {flow / bare:.3f}")


if __name__ == "__main__":
    main()
