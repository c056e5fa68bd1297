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
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The flow runs here and is served by a loop of this process, as `offline-queue run` does.
os.environ["OFFLINE_QUEUE_SERVE_HERE"] = "1"

import bench.quiet  # noqa: E402, F401  (before Prefect and vLLM)
from bench.lines import requests, run_ingest_child, write_lines  # noqa: E402


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def overhead(n: int, chunk_size: int, work: Path) -> float:
    from vllm import SamplingParams

    from offline_queue.engines.vllm_local import VLLMSettings, local_engine
    from offline_queue.flows.batch import batch_inference

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


def ingest_rss(lines: int, work: Path) -> float:
    path = write_lines(work / f"ingest-{lines}.jsonl", lines)  # streamed: the parent stays small
    run = run_ingest_child(path, f"sqlite:///{work / f'ingest-{lines}.db'}")
    assert run.accepted == run.total == lines
    seconds = run.inspect_seconds + run.seconds
    size_mb = path.stat().st_size / 2**20
    print(
        f"ingest {lines} lines ({size_mb:.0f} MB) into SQLite: {seconds:.1f} s, "
        f"{lines / seconds:,.0f} lines/s, peak RSS {run.peak_rss_mb:.0f} MB"
    )
    return run.peak_rss_mb


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
