"""Single requests at the door: background responses accepted by one API process, and a Redis
stream taken into the queue.

    .venv/bin/python bench/singles.py [--responses 4000] [--clients 32] [--entries 100000]

1. `RESULT background_accepted_per_s`: `offline-queue api serve` (one process, PostgreSQL store,
   `--deployment` so nothing is served here: acceptance alone) and 32 concurrent clients
   (httpx, keep-alive) creating background responses; then the store holds exactly one
   queued request per accepted response (`RESULT background_lost`, `RESULT
   background_duplicated`). Target ≥ 1,000/s. Beside it, `RESULT health_get_per_s`: the same
   clients on `GET /health` (no key, no store), the HTTP stack's own ceiling here.
2. `RESULT stream_entries_per_s`: 100,000 entries XADDed to Debian's redis-server, then one
   `offline-queue streams consume --no-serve` takes them all into the store (first entry
   queued → every entry acknowledged); its peak RSS (VmHWM) against one that took 10,000
   (`RESULT stream_rss_ratio`, memory flat); then two consumers of the group on 100,000
   (`RESULT stream_entries_per_s_2`). Target ≥ 20,000/s.
3. `RESULT flex_overhead_s`, `RESULT background_overhead_s`: on an idle loop (the API's own,
   vLLM in process), one request at a time: a flex chat call's answer, and a background
   response polled every 20 ms, each less the engine's own time for it (its result's latency);
   the worst of `--latency` (5). Target ≤ 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from instruments.loopback import free_port, healthy  # noqa: E402
from instruments.postgres import create_database, postgres  # noqa: E402
from instruments.processes import BIN, stop, wait_for  # noqa: E402
from instruments.redis_server import redis_server  # noqa: E402


def body(i: int) -> dict[str, object]:
    return {"model": "smollm2", "input": f"Question {i}: say hi.", "max_output_tokens": 8,
            "background": True, "service_tier": "flex"}  # fmt: skip


async def hammer(
    url: str, key: str, total: int, clients: int, path: str = "/responses"
) -> tuple[float, list[str]]:
    """`total` creates (or GETs of `path`, when it is another) from `clients` at once."""
    import httpx

    ids: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    headers = {"Authorization": f"Bearer {key}"}

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
            while not queue.empty():
                i = queue.get_nowait()
                if path != "/responses":
                    answer = await http.get(path)
                    assert answer.status_code == 200, answer.text
                    continue
                answer = await http.post("/responses", json=body(i))
                assert answer.status_code == 200, answer.text
                ids.append(answer.json()["id"])

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - began, ids


def background(pg_url: str, work: Path, total: int, clients: int) -> None:
    from sqlalchemy import func, select

    from offline_queue.api.auth import create_key
    from offline_queue.store.db import session
    from offline_queue.store.tables import Batch, Request

    store = create_database(pg_url, "oq_singles")
    key = create_key(store, "acme", tiers=("critical", "standard", "bulk"), max_waiting=10**7)
    port = free_port()
    api = subprocess.Popen(
        [str(BIN / "offline-queue"), "api", "serve", "--port", str(port), "--db", store,
         "--deployment", "route-batch/none", "--data-dir", str(work / "api"),
         "--metrics-port", "0"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}/health"), timeout=120)
        url = f"http://127.0.0.1:{port}/v1"
        asyncio.run(hammer(url, key, 200, clients))  # warm-up
        seconds, ids = asyncio.run(hammer(url, key, total, clients))
        # The same clients on the API's cheapest route (no key, no store): the HTTP stack's
        # own ceiling on this machine, clients included.
        health, _ = asyncio.run(hammer(url.removesuffix("/v1"), key, total, clients, "/health"))
    finally:
        stop(api)
    with session(store) as s:
        rows = {
            str(cid): int(n)
            for cid, n in s.execute(
                select(Request.custom_id, func.count())
                .join(Batch, Batch.id == Request.batch_id)
                .where(Batch.source == "response")
                .group_by(Request.custom_id)
            )
        }
    lost = sum(1 for i in ids if i not in rows)
    dup = sum(1 for n in rows.values() if n > 1)
    print(f"{total} background responses from {clients} clients: {seconds:.1f} s")
    print(f"RESULT background_accepted_per_s {total / seconds:.0f}")
    print(f"RESULT health_get_per_s {total / health:.0f}")
    print(f"RESULT background_lost {lost}")
    print(f"RESULT background_duplicated {dup}")


def take(
    r: object, pg_url: str, redis_url: str, n: int, name: str, consumers: int = 1
) -> tuple[float, float]:
    """XADD `n` entries, then `consumers` members of the group take them: (seconds, the
    first one's peak RSS in MB)."""
    from offline_queue.store import streams as stream_store

    store = create_database(pg_url, f"oq_stream_{name}")
    stream = f"bench-{name}"
    line = {"custom_id": "", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 8}}  # fmt: skip
    pipe = r.pipeline(transaction=False)  # type: ignore[attr-defined]
    for i in range(n):
        line["custom_id"] = f"e{i}"
        pipe.xadd(stream, {"line": json.dumps(line)})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    command = [str(BIN / "offline-queue"), "streams", "consume", "--no-serve",
               "--redis", redis_url, "--stream", stream, "--db", store,
               "--max-pending", str(n * 2), "--read-count", "1000"]  # fmt: skip
    members = [
        subprocess.Popen(
            [*command, "--consumer", f"c{i}"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(consumers)
    ]
    consumer = members[0]
    try:
        wait_for(lambda: stream_store.waiting(store, stream) > 0, timeout=300, interval=0.05)
        began = time.perf_counter()
        # The end without a count over the queue (its own cost, at 1 s steps): every entry
        # read and acknowledged, which a consumer does only once its rows are committed.
        wait_for(lambda: _all_acked(r, stream), timeout=900, interval=0.02)
        seconds = time.perf_counter() - began
        queued = stream_store.waiting(store, stream)
        assert queued == n, f"{queued} of {n} entries in the store once all were acknowledged"
        status = Path(f"/proc/{consumer.pid}/status").read_text()
        peak_kb = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1])
    finally:
        for member in members:
            stop(member)
    return seconds, peak_kb / 1024


def _all_acked(r: Any, stream: str) -> bool:
    group = r.xinfo_groups(stream)[0]
    return bool(group["lag"] == 0 and group["pending"] == 0)


def stream_ingest(pg_url: str, redis_url: str, entries: int) -> None:
    import redis

    r = redis.Redis.from_url(redis_url)
    small = take(r, pg_url, redis_url, entries // 10, "small")
    large = take(r, pg_url, redis_url, entries, "large")
    for n, (seconds, peak) in ((entries // 10, small), (entries, large)):
        print(f"{n} entries taken in {seconds:.1f} s; consumer peak RSS {peak:.0f} MB")
    print(f"RESULT stream_entries_per_s {entries / large[0]:.0f}")
    print(f"RESULT stream_rss_ratio {large[1] / small[1]:.2f}")
    two = take(r, pg_url, redis_url, entries, "two", consumers=2)
    print(f"{entries} entries taken by two consumers of the group in {two[0]:.1f} s")
    print(f"RESULT stream_entries_per_s_2 {entries / two[0]:.0f}")


def latency(pg_url: str, work: Path, n: int) -> None:
    """An idle loop (the API's own, vLLM in process): each flex call and background response,
    one at a time, against the engine's own time for it (the result's latency)."""
    import httpx
    from sqlalchemy import select

    from offline_queue.api.auth import create_key
    from offline_queue.store.db import session
    from offline_queue.store.tables import Result

    store = create_database(pg_url, "oq_latency")
    key = create_key(store, "acme", tiers=("critical", "standard", "bulk"))
    port = free_port()
    api = subprocess.Popen(
        [str(BIN / "offline-queue"), "api", "serve", "--port", str(port), "--db", store,
         "--data-dir", str(work / "api-latency"), "--metrics-port", "0"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    over: dict[str, list[float]] = {"flex": [], "background": []}
    try:
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}/health"), timeout=120)
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}/v1",
            headers={"Authorization": f"Bearer {key}"},
            timeout=600,
        )
        chat = {"model": "smollm2", "max_tokens": 8, "temperature": 0, "service_tier": "flex"}
        http.post(
            "/chat/completions", json={**chat, "messages": [{"role": "user", "content": "warm"}]}
        )
        for i in range(n):
            began = time.perf_counter()
            answer = http.post(
                "/chat/completions",
                json={**chat, "messages": [{"role": "user", "content": f"Count to {i}."}]},
            )
            took = time.perf_counter() - began
            assert answer.status_code == 200, answer.text
            over["flex"].append(took - _engine_seconds(store, select, session, Result))
            began = time.perf_counter()
            created = http.post(
                "/responses",
                json={
                    "model": "smollm2",
                    "input": f"Name {i} colours.",
                    "max_output_tokens": 8,
                    "background": True,
                },
            )
            rid = created.json()["id"]
            while http.get(f"/responses/{rid}").json()["status"] not in ("completed", "incomplete"):
                time.sleep(0.02)
            took = time.perf_counter() - began
            over["background"].append(took - _engine_seconds(store, select, session, Result))
    finally:
        stop(api)
    for kind, values in over.items():
        worst = max(values)
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"{kind}: answered {shown} s after the engine's own time")
        print(f"RESULT {kind}_overhead_s {worst:.2f}")


def _engine_seconds(store: str, select: Any, session: Any, result: Any) -> float:
    """The engine's time for the latest answered request (its result's latency)."""
    with session(store) as s:
        ms = s.scalar(select(result.latency_ms).order_by(result.finished_at.desc()).limit(1))
    return float(ms or 0) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--latency", type=int, default=5, help="one-at-a-time requests")
    parser.add_argument("--parts", default="background,latency,stream")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as d, postgres() as pg:
        if "background" in parts:
            background(pg.url, Path(d), args.responses, args.clients)
        if "latency" in parts:
            latency(pg.url, Path(d), args.latency)
        if "stream" in parts:
            with redis_server() as redis_url:
                stream_ingest(pg.url, redis_url, args.entries)


if __name__ == "__main__":
    main()
