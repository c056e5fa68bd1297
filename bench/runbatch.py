"""`offline-queue run` against vLLM's own `run-batch` on the same file, whole process and
steady state, and bare `vllm.LLM.chat` on the same prompts.

    .venv/bin/python bench/runbatch.py [--requests 512] [--pairs 3] [--no-warm-up]

One chat file (max 32 tokens, temperature 0, prompts as bench/overhead.py makes them). Each
tool runs as its own process, as a user runs it, with the engine settings `offline-queue run`
gives vLLM on this machine passed to run-batch as flags (from `VLLMSettings().llm_kwargs`, so
they cannot drift apart). Each of our runs gets a fresh SQLite store (no result cache, no
batch to resume); all share one PREFECT_HOME, as a user's machine does after its first run.
A warm-up run of each on 8 requests first (not counted), then `--pairs` alternated pairs
(the order flips each pair). Wall time, CPU (the process and the children it waited for)
and the largest process's peak RSS come from wait4.

Steady state is read from the logs, timestamped as each line arrives: from vLLM's "init
engine … took" line (the engine is ready; both tools log it) to the last result — ours: the
last `chunk of N` line (the flow logs each chunk its loop served, within a quarter second);
run-batch: its `Running batch: 100%` line.

Bare: `LLM.chat` on the same prompts in a process of its own (the flow's in-process engine
and environment, after an 8-prompt warm-up), generation only.

RESULT runbatch_ratio <ours wall / run-batch wall> (median of the pairs' ratios; target ≤ 1.0),
RESULT runbatch_steady_ratio <ours steady / run-batch steady>, RESULT runbatch_steady_vs_bare
and RESULT ours_steady_vs_bare (each steady state ÷ bare). Plot: bench/plots/runbatch.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ORIGINAL_ENV = dict(os.environ)  # the children's, before any import here sets engine defaults

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent

from bench.lines import requests  # noqa: E402
from bench.plotting import PLOTS, pyplot  # noqa: E402

MAX_TOKENS = 32
READY = "init engine (profile, create kv cache, warmup model) took"
OURS_CHUNK = "chunk of "
OURS_FLOW = "Beginning flow run"
RB_DONE = "Running batch: 100%"
RB_READING = "Reading batch from"


@dataclass
class Run:
    tool: str
    wall: float
    cpu: float
    peak_rss_mb: float
    lines: list[tuple[float, str]] = field(repr=False)

    def first(self, needle: str) -> float | None:
        return next((t for t, line in self.lines if needle in line), None)

    def last(self, needle: str) -> float | None:
        return next((t for t, line in reversed(self.lines) if needle in line), None)

    @property
    def ready(self) -> float:
        t = self.first(READY)
        assert t is not None, f"{self.tool}: no engine-ready line in its log"
        return t

    @property
    def done(self) -> float:
        t = self.last(OURS_CHUNK if self.tool.startswith("ours") else RB_DONE)
        assert t is not None, f"{self.tool}: no last-result line in its log"
        return t

    @property
    def steady(self) -> float:
        return self.done - self.ready


def child_env() -> dict[str, str]:
    env = dict(ORIGINAL_ENV)
    path = env.get("PYTHONPATH")
    env.update(
        PYTHONPATH=f"{REPO}{os.pathsep}{path}" if path else str(REPO),  # this checkout's code
        PYTHONUNBUFFERED="1",
        VLLM_LOGGING_LEVEL="INFO",
        PREFECT_LOGGING_LEVEL="INFO",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
    )
    return env


def timed(tool: str, cmd: list[str], env: dict[str, str], log: Path) -> Run:
    """Run `cmd` to its end; every output line with the seconds since the start."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1
    )
    assert proc.stdout is not None
    lines = [(time.perf_counter() - started, line) for line in proc.stdout]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.write_text("".join(f"{t:9.3f} {line}" for t, line in lines))
    if proc.returncode != 0:
        sys.exit(f"{tool} exited {proc.returncode}; log: {log}")
    cpu = usage.ru_utime + usage.ru_stime
    return Run(tool, wall, cpu, usage.ru_maxrss / 1024, lines)


def engine_flags() -> list[str]:
    """`offline-queue run`'s vLLM settings on this machine, as run-batch flags."""
    from offline_queue.engines.env import vllm_on_cpu
    from offline_queue.engines.vllm_local import VLLMSettings

    flags: list[str] = []
    for key, value in VLLMSettings().llm_kwargs(vllm_on_cpu()).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, str(value)]
    return flags


def run_ours(infile: Path, work: Path, i: int, env: dict[str, str], tool: str = "ours") -> Run:
    cmd = [
        str(BIN / "offline-queue"),
        "run",
        str(infile),
        "--db",
        f"sqlite:///{work / f'{tool}-{i}.db'}",
        "--output",
        str(work / f"{tool}-{i}.output.jsonl"),
        "--errors",
        str(work / f"{tool}-{i}.errors.jsonl"),
        "--json",
    ]
    run = timed(tool, cmd, env, work / f"{tool}-{i}.log")
    last = next(line for _, line in reversed(run.lines) if line.startswith('{"id"'))
    batch = json.loads(last)  # --json: the batch object is the last line of stdout
    n = sum(1 for _ in infile.open())
    assert batch["request_counts"]["completed"] == n, batch["request_counts"]
    return run


def run_batch(infile: Path, work: Path, i: int, env: dict[str, str], model: Path) -> Run:
    out = work / f"rb-{i}.output.jsonl"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "run_batch_child.py"),
        "-i",
        str(infile),
        "-o",
        str(out),
        "--model",
        str(model),
        "--served-model-name",
        "smollm2",
        *engine_flags(),
    ]
    run = timed("run-batch", cmd, env, work / f"rb-{i}.log")
    answers = [json.loads(line) for line in out.open()]
    assert len(answers) == sum(1 for _ in infile.open())
    assert all(a.get("error") is None for a in answers), answers[0]
    return run


def bare_child(infile: Path) -> None:
    """In a process of its own: the flow's engine, a warm-up, then `LLM.chat` on the file."""
    # vllm_local first: it sets the flow's engine environment (OpenMP threads, in-process
    # engine core) before vLLM, and torch with it, is imported.
    from offline_queue.engines.vllm_local import VLLMSettings, local_engine  # isort: skip
    from vllm import SamplingParams

    engine = local_engine(VLLMSettings())
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    warm = [x["body"]["messages"] for x in requests(8, "warm", start=10**6)]
    engine.llm.chat(warm, params, use_tqdm=False)
    messages = [json.loads(line)["body"]["messages"] for line in infile.open()]
    started = time.perf_counter()
    outs = engine.llm.chat(messages, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"BARE {seconds:.3f} {tokens}", flush=True)


def describe(run: Run) -> str:
    done = run.done
    phases = f"start → engine ready {run.ready:6.1f} s, steady {run.steady:6.1f} s, "
    phases += f"last result → exit {run.wall - done:5.1f} s"
    return (
        f"{run.tool:9} wall {run.wall:6.1f} s  cpu {run.cpu:6.1f} s  "
        f"peak {run.peak_rss_mb:5.0f} MB  ({phases})"
    )


def ours_detail(run: Run) -> str:
    """Where our time goes, from the log: the flow's start, each chunk's end."""
    flow = run.first(OURS_FLOW)
    chunks = [t for t, line in run.lines if OURS_CHUNK in line]
    ends = ", ".join(f"{t:.1f}" for t in chunks)
    return f"    ours: flow begins {flow or float('nan'):.1f} s; chunks end at {ends} s"


def plot(ours: list[Run], rb: list[Run], bare: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 2.8))
    rows = []
    for label, runs in (("offline-queue run", ours), ("vLLM run-batch", rb)):
        run = min(runs, key=lambda r: abs(r.wall - statistics.median(x.wall for x in runs)))
        rows.append((label, run.ready, run.steady, run.wall - run.done))
    rows.append(("bare LLM.chat (generation only)", 0.0, bare, 0.0))
    for y, (_, start, steady, tail) in enumerate(rows):
        ax.barh(y, start, color="#bbb", label="start-up" if y == 0 else None)
        ax.barh(y, steady, left=start, color="#1f77b4", label="steady state" if y == 0 else None)
        ax.barh(y, tail, left=start + steady, color="#ff7f0e", label="tail" if y == 0 else None)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (the median run of each tool)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(PLOTS / "runbatch.png", dpi=120)


def ratios(label: str, runs: list[Run], rb: list[Run], suffix: str) -> None:
    """Each pair's ratio to its run-batch run, wall and steady, and their medians as RESULT
    lines (named with `suffix`)."""
    walls = [o.wall / r.wall for o, r in zip(runs, rb, strict=True)]
    steadies = [o.steady / r.steady for o, r in zip(runs, rb, strict=True)]
    print(
        f"{label}: wall {', '.join(f'{x:.3f}' for x in walls)}; "
        f"steady {', '.join(f'{x:.3f}' for x in steadies)}"
    )
    print(f"RESULT runbatch_ratio{suffix} {statistics.median(walls):.3f}")
    print(f"RESULT runbatch_steady_ratio{suffix} {statistics.median(steadies):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--no-warm-up", action="store_true")
    parser.add_argument(
        "--ours-also",
        type=Path,
        help="another checkout of this repository: each pair also runs `offline-queue run` "
        "with its code (a before/after of a change, against the same run-batch runs)",
    )
    parser.add_argument("--bare-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_child:
        bare_child(args.bare_child)
        return

    from offline_queue.model import resolve_model

    model = resolve_model(None)
    env = child_env()
    with tempfile.TemporaryDirectory(prefix="oq-runbatch-") as tmp:
        work = Path(tmp)
        env["PREFECT_HOME"] = str(work / "prefect")
        infile = work / "in.jsonl"
        infile.write_text("".join(json.dumps(x) + "\n" for x in requests(args.requests, "rb")))
        print(
            f"({args.requests} requests, max_tokens {MAX_TOKENS}; run-batch flags: "
            f"{' '.join(engine_flags())}; {os.cpu_count()} cores)"
        )
        if not args.no_warm_up:  # page cache, PREFECT_HOME's database: a small file is enough
            warm = work / "warm.jsonl"
            warm.write_text("".join(json.dumps(x) + "\n" for x in requests(8, "warm")))
            for run in (run_ours(warm, work, 0, env), run_batch(warm, work, 0, env, model)):
                print("warm-up", describe(run))
        ours: list[Run] = []
        rb: list[Run] = []
        also: list[Run] = []
        also_env = dict(env)
        if args.ours_also:
            also_env["PYTHONPATH"] = env["PYTHONPATH"].replace(str(REPO), str(args.ours_also), 1)
        for i in range(1, args.pairs + 1):
            order = ("ours", "rb", "also") if i % 2 else ("also", "rb", "ours")
            for tool in order:
                if tool == "also":
                    if args.ours_also:
                        also.append(run_ours(infile, work, i, also_env, "ours-B"))
                        print(f"pair {i}", describe(also[-1]))
                        print(ours_detail(also[-1]))
                elif tool == "ours":
                    ours.append(run_ours(infile, work, i, env))
                    print(f"pair {i}", describe(ours[-1]))
                    print(ours_detail(ours[-1]))
                else:
                    rb.append(run_batch(infile, work, i, env, model))
                    print(f"pair {i}", describe(rb[-1]))
            print(
                f"pair {i} ratio ours / run-batch: wall {ours[-1].wall / rb[-1].wall:.3f}, "
                f"steady {ours[-1].steady / rb[-1].steady:.3f}"
            )

        bare_env = dict(env, VLLM_LOGGING_LEVEL="WARNING")
        bare_cmd = [sys.executable, __file__, "--bare-child", str(infile)]
        bare_run = timed("bare", bare_cmd, bare_env, work / "bare.log")
        bare_line = next(line for _, line in bare_run.lines if line.startswith("BARE "))
        bare_s, bare_tokens = float(bare_line.split()[1]), int(bare_line.split()[2])
        print(f"bare LLM.chat: {bare_s:.1f} s, {bare_tokens} output tokens (generation only)")

        print(f"(load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())})")
        ratios("ratios of the pairs", ours, rb, "")
        print(
            f"RESULT runbatch_steady_vs_bare {statistics.median(r.steady for r in rb) / bare_s:.3f}"
        )
        ours_steady = statistics.median(o.steady for o in ours)
        print(f"RESULT ours_steady_vs_bare {ours_steady / bare_s:.3f}")
        if also:
            ratios(f"ours-B ({args.ours_also})", also, rb, "_b")
        plot(ours, rb, bare_s)


if __name__ == "__main__":
    main()
