"""The CLI as people run it, in real subprocesses: refusals, --json, status, kill -9 and resume,
and two processes racing on one batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from instruments.processes import BIN, wait_for
from offline_queue.store.db import session
from offline_queue.store.tables import Result
from tests.conftest import REPO, cli_env, run_cli

pytestmark = pytest.mark.usefixtures("model_dir")


def batch_file(path: Path, n: int, max_tokens: int = 16) -> Path:
    with path.open("w") as f:
        for i in range(n):
            url = "/v1/chat/completions" if i % 2 else "/v1/completions"
            body: dict = {
                "model": "smollm2",
                "max_tokens": max_tokens,
                "temperature": 0.7,
                "seed": i,
            }
            if i % 2:
                body["messages"] = [{"role": "user", "content": f"Tell me fact number {i}."}]
            else:
                body["prompt"] = f"Fact number {i}:"
            f.write(
                json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
                + "\n"
            )
    return path


def committed(db: str) -> int:
    with session(db) as s:
        return int(s.scalar(select(func.count()).select_from(Result)) or 0)


def custom_ids(*paths: str) -> Counter:
    ids: Counter = Counter()
    for p in paths:
        for raw in Path(p).read_text().splitlines():
            ids[json.loads(raw)["custom_id"]] += 1
    return ids


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"name,age\nbob,3\n", "not JSONL")],
)
def test_refused_files_exit_non_zero_with_the_reason(
    tmp_path: Path, content: bytes, message: str, prefect_api: str
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    proc = run_cli(
        "run", str(path), "--db", f"sqlite:///{tmp_path / 's.db'}", env=cli_env(prefect_api)
    )
    assert proc.returncode == 2
    assert message in proc.stderr


def test_status_of_unknown_batch(tmp_path: Path, prefect_api: str) -> None:
    proc = run_cli(
        "status", "batch_nope", "--db", f"sqlite:///{tmp_path / 's.db'}", env=cli_env(prefect_api)
    )
    assert proc.returncode == 1 and "no batch batch_nope" in proc.stderr


def test_run_json_and_status_agree(tmp_path: Path, prefect_api: str) -> None:
    path = batch_file(tmp_path / "in.jsonl", 6, max_tokens=4)
    db = f"sqlite:///{tmp_path / 's.db'}"
    env = cli_env(prefect_api, OFFLINE_QUEUE_DB=db)  # --db from the environment
    proc = run_cli("run", str(path), "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = json.loads(proc.stdout.strip().splitlines()[-1])
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
    assert batch["run"] == {"inferred": 6, "reused": 0}
    assert Path(batch["output_file"]).exists() and Path(batch["error_file"]).exists()

    status = run_cli("status", batch["id"], "--json", env=env)
    assert status.returncode == 0
    seen = json.loads(status.stdout.strip().splitlines()[-1])
    assert seen["status"] == "completed" and seen["request_counts"] == batch["request_counts"]
    assert seen["usage"] == batch["usage"]


def test_kill_9_then_resume_redoes_at_most_what_the_loop_held(
    tmp_path: Path, pg_url: str, prefect_api: str
) -> None:
    """Killed once 3 chunks are committed: the resume infers again only what the killed
    process's loop held (its leases ran out; at most MAX_CHUNKS chunks in hand)."""
    from offline_queue.loop import MAX_CHUNKS

    total, chunk = 96, 8  # more than the loop holds at once (8 chunks)
    path = batch_file(tmp_path / "in.jsonl", total, max_tokens=16)
    args = [
        "run",
        str(path),
        "--db",
        pg_url,
        "--chunk-size",
        str(chunk),
        "--lease-seconds",
        "6",
        "--json",
    ]
    proc = subprocess.Popen(
        [str(BIN / "offline-queue"), *args],
        env=cli_env(prefect_api),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        wait_for(lambda: committed(pg_url) >= 3 * chunk, timeout=300)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = committed(pg_url)
    assert before < total, "the run finished before it could be killed"

    again = run_cli(*args, env=cli_env(prefect_api))
    assert again.returncode == 0, again.stderr[-3000:]
    batch = json.loads(again.stdout.strip().splitlines()[-1])
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": total, "completed": total, "failed": 0}
    assert batch["run"]["inferred"] <= total - before + MAX_CHUNKS * chunk
    assert batch["run"]["inferred"] + batch["run"]["reused"] >= total
    ids = custom_ids(batch["output_file"], batch["error_file"])
    assert len(ids) == total and set(ids.values()) == {1}
    assert committed(pg_url) == total


def test_two_processes_on_one_batch_share_it_without_duplicates(
    tmp_path: Path, pg_url: str, prefect_api: str
) -> None:
    total = 64
    path = batch_file(tmp_path / "in.jsonl", total, max_tokens=12)
    args = [
        str(BIN / "offline-queue"),
        "run",
        str(path),
        "--db",
        pg_url,
        "--chunk-size",
        "4",
        "--json",
    ]
    procs = [
        subprocess.Popen(
            args,
            env=cli_env(prefect_api),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    told = "\n".join(f"--- stdout\n{o[0][-2000:]}\n--- stderr\n{o[1][-4000:]}" for o in outs)
    assert [p.returncode for p in procs] == [0, 0], told  # a str: pytest cuts a list's repr
    batches = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert batches[0]["id"] == batches[1]["id"]
    assert all(b["request_counts"]["completed"] == total for b in batches)
    # Between them they inferred each request once: their claims never overlapped.
    assert sum(b["run"]["inferred"] for b in batches) == total
    assert committed(pg_url) == total
    ids = custom_ids(batches[0]["output_file"], batches[0]["error_file"])
    assert len(ids) == total and set(ids.values()) == {1}
