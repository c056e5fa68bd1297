"""Prefix order against bare vLLM: a file whose requests share a few long system prompts,
shuffled, through bare `vllm.LLM.chat` as given, bare on the file pre-sorted by prefix, and
through the batch flow (whose claims hand out requests in prefix-key order).

    .venv/bin/python bench/prefix.py [--requests 512] [--prefixes 16] [--prefix-tokens 400]

One process, one engine (the flow's own in-process engine: `local_engine(VLLMSettings())`,
vLLM's automatic prefix caching on, as it is by default), a warm-up flow run first so neither
side pays start-up. Every measured run has prefixes and questions of its own (and vLLM's
prefix cache is reset before each), so no run carries work to the next one; the prefixes are
grown to the same token count in every run, so the runs do the same work.

Prints the three times and
`RESULT prefix_vs_bare_file_order <bare on the file as given / ours>` (target ≥ 1.3) and
`RESULT prefix_vs_bare_sorted <bare on the sorted file / ours>` (target ≥ 0.97);
First `RESULT prefix_cache_effect`: 32 requests over 32 distinct prompts ÷ over one shared
prompt (does the prefix cache pay at all on this build?). `--bare-only` skips the flow.
Plot: bench/plots/prefix.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The flow runs here and is served by a loop of this process, as `offline-queue run` does.
os.environ["OFFLINE_QUEUE_SERVE_HERE"] = "1"

import bench.quiet  # noqa: E402, F401  (before Prefect and vLLM)
from bench.lines import requests  # noqa: E402
from bench.plotting import PLOTS, pyplot  # noqa: E402

MAX_TOKENS = 8
WORDS = [
    head + tail
    for head in ("ka", "lo", "mi", "ru", "te", "zo", "ne", "pa")
    for tail in ("ran", "vel", "tis", "mor", "dun", "sel", "gar", "lin")
]
"""Pseudo-words for the system prompts: 64 of them, drawn with a seed per prompt."""


def system_prompt(tokenizer: Any, tag: str, index: int, tokens: int) -> str:
    """A distinct system prompt of about `tokens` tokens: seeded words, grown until the
    tokenizer counts that many."""
    rng = random.Random(f"{tag}-{index}")
    words = [f"You are assistant {tag}-{index}. Rules and background follow."]
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(16))
    return " ".join(words)


def prefix_items(
    tokenizer: Any, tag: str, n: int, prefixes: int, tokens: int, seed: int
) -> list[dict]:
    """`n` chat requests over `prefixes` system prompts (request i has prompt i % prefixes),
    short distinct questions, in a seeded shuffled order."""
    systems = [system_prompt(tokenizer, tag, p, tokens) for p in range(prefixes)]
    items = []
    for i in range(n):
        a, b = divmod(i * 7919 % 10007, 100)
        items.append(
            {
                "custom_id": f"{tag}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "smollm2",
                    "messages": [
                        {"role": "system", "content": systems[i % prefixes]},
                        {"role": "user", "content": f"Question {i}: what is {a} plus {b}?"},
                    ],
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                },
            }
        )
    random.Random(seed).shuffle(items)
    return items


def by_prefix(items: list[dict]) -> list[dict]:
    """The file pre-sorted by system prompt (stable: file order within a prefix)."""
    return sorted(items, key=lambda x: x["body"]["messages"][0]["content"])


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def bare(engine: Any, items: list[dict]) -> tuple[float, int]:
    """Seconds and output tokens of one `LLM.chat` call on the items, in their order."""
    from vllm import SamplingParams

    engine.llm.reset_prefix_cache()
    messages = [x["body"]["messages"] for x in items]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    started = time.perf_counter()
    outs = engine.llm.chat(messages, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs)


def ours(engine: Any, items: list[dict], work: Path, db: str, chunk_size: int) -> tuple[float, int]:
    """Seconds and output tokens of the batch flow on the file as given."""
    from offline_queue.flows.batch import batch_inference

    engine.llm.reset_prefix_cache()
    path = write_jsonl(work / f"{items[0]['custom_id']}.jsonl", items)
    started = time.perf_counter()
    result = batch_inference(input=str(path), db=db, chunk_size=chunk_size)
    seconds = time.perf_counter() - started
    n = len(items)
    assert result["request_counts"]["completed"] == n, result["request_counts"]
    assert result["run"]["inferred"] == n, result["run"]
    return seconds, int(result["usage"]["output_tokens"])


def plot(rows: list[tuple[str, float]], title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    labels = [label for label, _ in rows]
    ax.barh(labels, [s for _, s in rows], color=["#999", "#555", "#1f77b4"][: len(rows)])
    for y, (_, s) in enumerate(rows):
        ax.text(s, y, f" {s:.1f} s", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(PLOTS / "prefix.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--prefixes", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=400)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--bare-only", action="store_true", help="skip the flow")
    args = parser.parse_args()

    from offline_queue.engines.vllm_local import VLLMSettings, local_engine
    from offline_queue.flows.batch import batch_inference

    engine = local_engine(VLLMSettings())
    n, p, t = args.requests, args.prefixes, args.prefix_tokens

    def items(tag: str) -> list[dict]:
        return prefix_items(engine.tokenizer, tag, n, p, t, args.seed)

    config = engine.llm.llm_engine.vllm_config.cache_config
    print(
        f"({n} requests, {p} prefixes of ~{t} tokens, max_tokens {MAX_TOKENS}, "
        f"chunk_size {args.chunk_size}; prefix caching {config.enable_prefix_caching}, "
        f"block {config.block_size} tokens, {config.num_gpu_blocks} KV blocks; "
        f"{platform.machine()} {os.cpu_count()} cores)"
    )
    with tempfile.TemporaryDirectory(prefix="oq-bench-") as tmp:
        work = Path(tmp)
        db = f"sqlite:///{work / 'bench.db'}"
        # Warm-up: engine, Prefect's temporary server (started on the first flow run), store.
        warm = requests(8, "warm", start=0)
        batch_inference(input=str(write_jsonl(work / "warm.jsonl", warm)), db=db)

        # Does the prefix cache pay here at all? The same number of requests over one shared
        # prompt, then over as many distinct prompts.
        shared_s, _ = bare(engine, prefix_items(engine.tokenizer, "check-1", 32, 1, t, 0))
        distinct_s, _ = bare(engine, prefix_items(engine.tokenizer, "check-n", 32, 32, t, 0))
        print(
            f"cache check, 32 requests: one shared prompt {shared_s:.2f} s, "
            f"32 distinct prompts {distinct_s:.2f} s"
        )
        print(f"RESULT prefix_cache_effect {distinct_s / shared_s:.3f}")

        shuffled_s, shuffled_tok = bare(engine, items("bare-file"))
        print(f"bare LLM.chat, file order : {shuffled_s:7.2f} s  {shuffled_tok} output tokens")
        sorted_s, sorted_tok = bare(engine, by_prefix(items("bare-sorted")))
        print(f"bare LLM.chat, sorted     : {sorted_s:7.2f} s  {sorted_tok} output tokens")
        print(f"RESULT prefix_bare_sorted_vs_file_order {shuffled_s / sorted_s:.3f}")
        rows = [("bare, file order", shuffled_s), ("bare, sorted by prefix", sorted_s)]
        if not args.bare_only:
            ours_s, ours_tok = ours(engine, items("ours"), work, db, args.chunk_size)
            print(f"offline-queue flow, file  : {ours_s:7.2f} s  {ours_tok} output tokens")
            print(f"RESULT prefix_vs_bare_file_order {shuffled_s / ours_s:.3f}")
            print(f"RESULT prefix_vs_bare_sorted {sorted_s / ours_s:.3f}")
            rows.append(("offline-queue flow, file order", ours_s))
        print(f"(load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())})")
        plot(rows, f"{n} chat requests, {p} shared prefixes of ~{t} tokens, shuffled")


if __name__ == "__main__":
    main()
