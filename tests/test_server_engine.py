"""The pipeline against a real `vllm serve` on loopback: same shape as in process, faults
through a proxy, the server killed and restarted mid-batch, and fair sharing between batches."""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from sqlalchemy import select

from instruments.faultproxy import FaultProxy
from instruments.loopback import free_port
from instruments.processes import BIN, wait_for
from offline_queue.store.db import session
from offline_queue.store.tables import Result
from tests.conftest import REPO, cli_env
from tests.test_pipeline import line, mixed_batch, read, run, write

pytestmark = pytest.mark.usefixtures("prefect_api")


def exactly_once(result: dict[str, Any]) -> Counter:
    ids = Counter(o["custom_id"] for o in read(result["output_file"]) + read(result["error_file"]))
    assert set(ids.values()) == {1}, ids.most_common(3)
    return ids


@pytest.mark.usefixtures("engine")
def test_server_outputs_match_the_in_process_shape(vllm_server: str, tmp_path: Path) -> None:
    path = mixed_batch(tmp_path)
    local = run(path, f"sqlite:///{tmp_path / 'local.db'}", chunk_size=4)
    served = run(path, f"sqlite:///{tmp_path / 'served.db'}", engine=vllm_server, chunk_size=4)
    assert served["status"] == local["status"] == "completed"
    assert served["request_counts"] == local["request_counts"]
    assert served["model_version"] == local["model_version"]  # same weights, same version

    local_out = {o["custom_id"]: o for o in read(local["output_file"])}
    served_out = {o["custom_id"]: o for o in read(served["output_file"])}
    assert local_out.keys() == served_out.keys()
    for cid, o in served_out.items():
        body = o["response"]["body"]
        model = ChatCompletion if body["object"] == "chat.completion" else Completion
        model.model_validate(body)
        mine = local_out[cid]["response"]["body"]
        assert set(mine) <= set(body), cid
        assert set(mine["choices"][0]) <= set(body["choices"][0]), cid
        assert len(mine["choices"]) == len(body["choices"])
    # Greedy requests give the same text either way.
    for cid in ("chat-1", "cmpl-1", "choice"):
        texts = [
            out[cid]["response"]["body"]["choices"][0].get("text")
            or out[cid]["response"]["body"]["choices"][0]["message"]["content"]
            for out in (local_out, served_out)
        ]
        assert texts[0] == texts[1], cid

    errors = {e["custom_id"]: e for e in read(served["error_file"])}
    assert errors["too-long"]["error"]["code"] == "context_length_exceeded"
    assert errors["too-long"]["response"]["status_code"] == 400
    assert "maximum context length" in errors["too-long"]["error"]["message"]  # the server's words


def test_faults_through_a_proxy_are_retried_and_terminal_ones_named(
    vllm_server: str, tmp_path: Path
) -> None:
    from blocks.engines import OpenAIServer

    faults = ["500", "pass", "429", "pass", "stall", "pass", "reset", "pass", "pass"]

    def plan(n: int) -> str:
        return "404" if n == 1 else faults[n % len(faults)]

    items = [line(f"r{i}", max_tokens=6, temperature=0.5, seed=i) for i in range(20)]
    items.append(line("too-long", messages=[{"role": "user", "content": "hello " * 3000}]))
    path = write(tmp_path / "faults.jsonl", items)
    with FaultProxy(vllm_server.removesuffix("/v1"), plan, stall_seconds=30) as proxy:
        block = OpenAIServer(base_url=proxy.url, timeout=3, max_attempts=6, max_in_flight=8)
        block.save("faulty-proxy", overwrite=True)
        result = run(
            path,
            f"sqlite:///{tmp_path / 's.db'}",
            engine="openai-server/faulty-proxy",
            chunk_size=7,
        )
    assert result["status"] == "completed"
    assert all(proxy.seen[f] >= 1 for f in ("500", "429", "stall", "reset", "404", "pass"))
    ids = exactly_once(result)
    assert len(ids) == 21
    errors = {e["custom_id"]: e for e in read(result["error_file"])}
    assert len(errors) == 2, errors
    four_oh_four = next(e for e in errors.values() if e["response"]["status_code"] == 404)
    assert "injected 404" in four_oh_four["error"]["message"]
    assert errors["too-long"]["error"]["code"] == "context_length_exceeded"
    assert result["request_counts"] == {"total": 21, "completed": 19, "failed": 2}


def test_server_killed_and_restarted_mid_batch(model_dir: Path, tmp_path: Path) -> None:
    from offline_queue.engines.vllm_server import ServerProcess, server_args

    port = free_port()
    args = server_args(model_dir, "127.0.0.1", port, "smollm2")
    db = f"sqlite:///{tmp_path / 's.db'}"
    path = write(
        tmp_path / "in.jsonl", [line(f"k{i}", max_tokens=12, ignore_eos=True) for i in range(48)]
    )
    log = (tmp_path / "serve.log").open("wb")
    server = ServerProcess(args, "127.0.0.1", port, log=log).start()
    outcome: dict[str, Any] = {}
    try:
        server.wait_ready()
        worker = threading.Thread(
            target=lambda: outcome.update(
                run(path, db, engine=f"http://127.0.0.1:{port}/v1", chunk_size=8)
            )
        )
        worker.start()
        wait_for(lambda: _results(db) >= 8, timeout=120)
        server.kill()
        killed_at = _results(db)
        time.sleep(2)
        server = ServerProcess(args, "127.0.0.1", port, log=log).start()
        server.wait_ready()
        worker.join(timeout=300)
    finally:
        server.stop()
    assert killed_at < 48
    assert outcome["status"] == "completed"
    assert outcome["request_counts"] == {"total": 48, "completed": 48, "failed": 0}
    assert len(exactly_once(outcome)) == 48


def _results(db: str) -> int:
    try:
        with session(db) as s:
            return len(s.scalars(select(Result.line_no)).all())
    except Exception:
        return 0


def _start(
    path: Path, db: str, url: str, tier: str, weight: int, chunk: int, env: dict
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            str(BIN / "offline-queue"),
            "run",
            str(path),
            "--db",
            db,
            "--engine",
            url,
            "--tier",
            tier,
            "--weight",
            str(weight),
            "--chunk-size",
            str(chunk),
            "--json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _batch_id(db: str, path: Path) -> str | None:
    from offline_queue.store.tables import Batch

    try:
        with session(db) as s:
            return s.scalar(select(Batch.id).where(Batch.input_path == str(path.resolve())))
    except Exception:
        return None


def _spans(db: str, path: Path) -> list[tuple[float, float]]:
    """(sent, answered) of each request of the batch read from `path`, by sending time."""
    bid = _batch_id(db, path)
    with session(db) as s:
        rows = s.execute(
            select(Result.finished_at, Result.latency_ms).where(Result.batch_id == bid)
        ).all()
    return sorted((end - ms / 1000, end) for end, ms in rows)


def _finished(db: str, batch_id: str) -> list[float]:
    from offline_queue.store.tables import Batch

    with session(db) as s:
        bid = s.scalar(select(Batch.id).where(Batch.input_path == batch_id))
        times = s.scalars(select(Result.finished_at).where(Result.batch_id == bid)).all()
    assert None not in times, "every stored result has its finish time"
    return sorted(t for t in times if t is not None)


def test_weights_share_one_server_in_proportion(
    vllm_server: str, pg_url: str, prefect_api: str, tmp_path: Path
) -> None:
    # The weight-3 batch runs out first (150 lines at three times the other's rate: the weight-1
    # batch has done about 50 by then) and the window ends there. What the weight-1 batch has
    # left runs alone, unmeasured: it has 90 lines (40 to spare for a head start), not 150.
    n = {1: 90, 3: 150}
    files = {
        w: write(
            tmp_path / f"w{w}.jsonl",
            [
                line(f"w{w}-{i}", max_tokens=16, ignore_eos=True, temperature=0.8)
                for i in range(n[w])
            ],
        )
        for w in (1, 3)
    }
    env = cli_env(prefect_api)
    procs = {w: _start(files[w], pg_url, vllm_server, "bulk", w, 256, env) for w in (1, 3)}
    for w, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, (w, err[-2000:])
    spans = {w: _spans(pg_url, files[w]) for w in (1, 3)}
    # The window in which both run at their full shares: from when the last request the earlier
    # batch sent before its share was re-read (the later one's start + 2 beats) was answered,
    # to the last request sent by the first batch to run out of work. A fixed latency after the
    # start is not enough: the earlier batch's solo requests queue behind the newcomer's.
    joined = max(d[0][0] for d in spans.values()) + 2.0
    t0 = max(b for d in spans.values() for a, b in d if a < joined)
    t1 = min(d[-1][0] for d in spans.values())
    assert t1 - t0 > 5, "the two batches hardly ran at the same time"
    # Each request counts for the part of it done inside the window (no edge bias).
    rate = {
        w: sum(max(0.0, min(b, t1) - max(a, t0)) / (b - a) for a, b in d) / (t1 - t0)
        for w, d in spans.items()
    }
    ratio = rate[3] / rate[1]
    medians = {w: sorted(b - a for a, b in d)[len(d) // 2] for w, d in spans.items()}
    print(
        f"completed/s while both ran ({t1 - t0:.0f} s): w1 {rate[1]:.2f}, w3 {rate[3]:.2f}, "
        f"ratio {ratio:.2f}; median latency w1 {medians[1]:.1f} s, w3 {medians[3]:.1f} s"
    )
    assert 3 * 0.8 <= ratio <= 3 * 1.2


def _mean_in_flight(spans: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Requests of `spans` in flight on average over [t0, t1]."""
    return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in spans) / (t1 - t0)


def _most_in_flight(spans: list[tuple[float, float]]) -> int:
    """The most requests of `spans` in flight at one moment."""
    level = most = 0
    for _, step in sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans]):
        level += step
        most = max(most, level)
    return most


def test_critical_batch_preempts_a_running_bulk_batch(
    vllm_server: str, pg_url: str, prefect_api: str, tmp_path: Path
) -> None:
    """Two processes on one `vllm serve`: the bulk one, its batch one chunk, keeps 32 requests
    in flight (a new one sent as each is answered) until a critical batch arrives, then (its
    share re-read within a beat) sends no new request while one of its own is still out: the
    critical batch's requests fill the server. The server batches whatever it is sent, so the
    answer times alone would not tell a shared engine from one where every process keeps its
    32 in flight: what is asserted is who is in flight."""
    bulk = write(
        tmp_path / "bulk.jsonl",
        [line(f"b{i}", max_tokens=16, ignore_eos=True, temperature=0.8) for i in range(130)],
    )
    critical = write(
        tmp_path / "critical.jsonl",
        [line(f"c{i}", max_tokens=16, ignore_eos=True, temperature=0.8) for i in range(24)],
    )
    env = cli_env(prefect_api)
    bulk_proc = _start(bulk, pg_url, vllm_server, "bulk", 1, 256, env)
    wait_for(lambda: _batch_id(pg_url, bulk) is not None, timeout=120, interval=0.05)
    crit_proc = _start(critical, pg_url, vllm_server, "critical", 1, 8, env)
    for p in (crit_proc, bulk_proc):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]

    # Who is in flight while both have work: from a share beat (1 s) and a margin after the
    # critical batch's first request was sent, to its last answer or the bulk batch's last
    # request sent. The bulk requests counted are those sent in that span (the ones already out
    # when the critical batch came finish as they are): at its floor of one slot the bulk batch
    # sends them one at a time; with a share of its own it keeps 32 out.
    crit_spans, bulk_spans = _spans(pg_url, critical), _spans(pg_url, bulk)
    t0 = crit_spans[0][0] + 2.5
    t1 = min(max(b for _, b in crit_spans), bulk_spans[-1][0])
    assert t1 - t0 > 2, "the two batches hardly ran at the same time"
    bulk_since = [(a, min(b, t1)) for a, b in bulk_spans if t0 <= a < t1]
    bulk_in_flight = _mean_in_flight(bulk_since, t0, t1)
    crit_in_flight = _mean_in_flight(crit_spans, t0, t1)
    print(
        f"over {t1 - t0:.1f} s of the critical batch: {crit_in_flight:.1f} of its requests in "
        f"flight on average; of the bulk ones sent since, {bulk_in_flight:.1f} on average and "
        f"{_most_in_flight(bulk_since)} at most; the bulk batch's last request sent "
        f"{bulk_spans[-1][0] - max(b for _, b in crit_spans):+.1f} s after the critical's last"
    )
    assert _most_in_flight(bulk_since) <= 2
    assert bulk_in_flight <= 0.5 * crit_in_flight


def test_the_adaptive_window_halves_under_429s_and_grows_back(vllm_server: str) -> None:
    """Behind a proxy answering 429 to every other request for a stretch: the in-flight window
    grows from its start, halves under the refusals, and grows again once they stop."""
    import orjson

    from offline_queue.engines.base import EngineRequest
    from offline_queue.engines.openai_http import HttpEngine, ServerSettings

    def plan(n: int) -> str:
        return "429" if 50 <= n < 80 and n % 2 else "pass"

    body = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2}
    requests = [
        EngineRequest(i, "/v1/chat/completions", orjson.dumps({**body, "seed": i}).decode())
        for i in range(130)
    ]
    with FaultProxy(vllm_server.removesuffix("/v1"), plan) as proxy:
        engine = HttpEngine(ServerSettings(base_url=proxy.url, max_in_flight=16, max_attempts=8))
        replies = engine.infer(requests)
    assert all(r.ok for r in replies), [r.error_message for r in replies if not r.ok][:3]
    assert proxy.seen["429"] >= 10
    assert engine.window is not None  # adaptive is the default
    history = engine.window.history
    print([(size, why) for _, size, why in history])
    sizes = [size for _, size, _ in history]
    first_cut = next(i for i, (_, _, why) in enumerate(history) if why == "overloaded")
    peak = max(sizes[: first_cut + 1])
    low = min(sizes[first_cut:])
    assert peak > 4, "the window never grew from its start"
    assert low <= peak // 2, "the window did not back off under 429s"
    assert max(sizes[sizes.index(low, first_cut) :]) > low, "the window did not grow back"
