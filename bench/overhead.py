"""Pipeline overhead against bare vLLM, and ingest memory for a million-line file.

    .venv/bin/python bench/overhead.py [--requests 512] [--lines 1000000]

1. The same chat requests (max 32 tokens, temperature 0) through bare `vllm.LLM.chat` and
   through the batch flow (the code `offline-queue run` runs), in this one process with the
   one engine. Prints both times and `RESULT overhead_ratio <pipeline / bare>`.
2. Peak RSS of validate + queue (into a SQLite store) for a generated file of `--lines`
   lines, in a fresh subprocess: `RESULT ingest_peak_rss_mb <MB>`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

TOPICS = ["the sea", "a city", "bread", "rain", "a bridge", "music", "a cat", "winter"]


def requests(n: int, tag: str, start: int = 0) -> list[dict]:
    """Chat requests numbered from `start`: distinct numbers make distinct prompts, so neither
    the result cache nor vLLM's prefix cache carries work from one measured run to the other."""
    return [
        {
            "custom_id": f"{tag}-{start + i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smol",
                "messages": [
                    {
                        "role": "user",
                        "content": f"Write one sentence about {TOPICS[i % 8]}, #{start + i}.",
                    }
                ],
                "max_tokens": 32,
                "temperature": 0,
            },
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def overhead(n: int, chunk_size: int, work: Path) -> float:
    from vllm import SamplingParams

    from flows.batch import batch_inference
    from offline_queue.engines.vllm_local import VLLMSettings, local_engine

    engine = local_engine(VLLMSettings())
    db = f"sqlite:///{work / 'bench.db'}"
    # Warm-up: engine, Prefect (its temporary server starts on the first flow run), store.
    warm = requests(8, "warm", start=10 * n)
    batch_inference(input=str(write_jsonl(work / "warm.jsonl", warm)), db=db)

    messages = [item["body"]["messages"] for item in requests(n, "bare", start=0)]
    params = SamplingParams(temperature=0, max_tokens=32)
    started = time.perf_counter()
    outs = engine.llm.chat(messages, params, use_tqdm=False)
    bare = time.perf_counter() - started
    bare_tokens = sum(len(o.outputs[0].token_ids) for o in outs)

    path = write_jsonl(work / "bench.jsonl", requests(n, "bench", start=n))
    started = time.perf_counter()
    result = batch_inference(input=str(path), db=db, chunk_size=chunk_size)
    piped = time.perf_counter() - started
    assert result["request_counts"]["completed"] == n, result["request_counts"]
    assert result["run"]["inferred"] == n, result["run"]
    piped_tokens = result["usage"]["output_tokens"]

    print(f"(chunk_size {chunk_size}, {n} requests, {platform.machine()} {os.cpu_count()} cores)")
    return compare(
        "overhead_ratio",
        ("bare vllm.LLM.chat", bare, bare_tokens),
        ("offline-queue flow", piped, piped_tokens),
    )


def compare(name: str, baseline: tuple[str, float, int], ours: tuple[str, float, int]) -> float:
    """Print both runs and `RESULT name ratio`: seconds per output token, ours / baseline
    (per token, because greedy outputs of different prompts differ slightly in length)."""
    for label, seconds, tokens in (baseline, ours):
        print(f"{label} : {seconds:7.2f} s  {tokens} output tokens  {tokens / seconds:6.1f} tok/s")
    ratio = (ours[1] / ours[2]) / (baseline[1] / baseline[2])
    print(f"RESULT {name} {ratio:.3f}")
    return ratio


INGEST_CHILD = """
import sys, time
from pathlib import Path
from offline_queue.store import queue
from offline_queue.validate import Limits, inspect_file, validate_file
path, db = Path(sys.argv[1]), sys.argv[2]
t = time.perf_counter()
info = inspect_file(path, Limits())
batch, _ = queue.register_batch(db, batch_id="batch_ingest", content_hash=info.content_hash,
    input_path=str(path), output_path="o", error_path="e")
report = queue.ingest(db, batch.id, validate_file(path, Limits()))
accepted, total = queue.finish_ingest(db, batch.id)
# VmHWM: this process's own peak (ru_maxrss can carry the parent's peak across exec).
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(accepted, total, time.perf_counter() - t, peak_kb)
"""


def ingest_rss(lines: int, work: Path) -> float:
    path = work / f"ingest-{lines}.jsonl"
    with path.open("w") as f:
        for start in range(0, lines, 10_000):  # streamed: the parent stays small too
            for item in requests(min(10_000, lines - start), "line", start):
                f.write(json.dumps(item) + "\n")
    db = f"sqlite:///{work / f'ingest-{lines}.db'}"
    out = subprocess.run(
        [sys.executable, "-c", INGEST_CHILD, str(path), db],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.split()
    accepted, total, seconds, rss_kb = int(out[0]), int(out[1]), float(out[2]), int(out[3])
    assert accepted == total == lines
    size_mb = path.stat().st_size / 2**20
    print(
        f"ingest {lines} lines ({size_mb:.0f} MB) into SQLite: {seconds:.1f} s, "
        f"{lines / seconds:,.0f} lines/s, peak RSS {rss_kb / 1024:.0f} MB"
    )
    return rss_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="oq-bench-") as tmp:
        work = Path(tmp)
        if args.lines:
            rss = ingest_rss(args.lines, work)
            print(f"RESULT ingest_peak_rss_mb {rss:.0f}")
        if not args.skip_overhead:
            overhead(args.requests, args.chunk_size, work)


if __name__ == "__main__":
    main()
