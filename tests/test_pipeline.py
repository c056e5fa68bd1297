"""The whole flow in this process: a real Prefect server, the real vLLM engine on CPU, and both
stores. Outputs are checked with the official `openai` package's models."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

pytestmark = pytest.mark.usefixtures("prefect_api", "engine")


def line(custom_id: str, url: str = "/v1/chat/completions", **body: Any) -> dict[str, Any]:
    if url == "/v1/chat/completions":
        body.setdefault("messages", [{"role": "user", "content": f"Say hello to {custom_id}."}])
    else:
        body.setdefault("prompt", f"Once upon a time, {custom_id}")
    body.setdefault("max_tokens", 8)
    body.setdefault("temperature", 0)
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": "smollm2", **body},
    }


def write(path: Path, items: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


def read(path: str | None) -> list[dict[str, Any]]:
    assert path is not None
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def run(path: Path, db: str, **kwargs: Any) -> dict[str, Any]:
    from offline_queue.flows.batch import batch_inference

    return batch_inference(input=str(path), db=db, **kwargs)


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
}


def mixed_batch(tmp_path: Path) -> Path:
    return write(
        tmp_path / "mixed.jsonl",
        [
            line("chat-1"),
            line(
                "chat-2",
                messages=[
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ],
            ),
            line("cmpl-1", "/v1/completions"),
            line("cmpl-tokens", "/v1/completions", prompt=[504, 3575, 282]),
            line(
                "json",
                messages=[{"role": "user", "content": "A city and its country as JSON."}],
                max_tokens=40,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "c", "schema": SCHEMA},
                },
            ),
            line("choice", structured_outputs={"choice": ["yes", "no"]}),
            line("chat-logprobs", logprobs=True, top_logprobs=3, max_tokens=4),
            line("cmpl-logprobs", "/v1/completions", logprobs=2, max_tokens=4),
            line("n-3", n=3, temperature=0.9, seed=11, max_tokens=6),
            line("stop", "/v1/completions", prompt="1, 2, 3, 4,", stop=[" 6"], max_tokens=20),
            line("too-long", messages=[{"role": "user", "content": "hello " * 3000}]),
            line("bad-max", max_tokens=-3),
            "not json at all",
            line("chat-1"),  # duplicate custom_id
            line("unknown-field", frequency_penalty=0.1, best_of=2),
        ],
    )


def test_mixed_batch_end_to_end(db_url: str, tmp_path: Path) -> None:
    path = mixed_batch(tmp_path)
    result = run(path, db_url, chunk_size=4)

    assert result["status"] == "completed"
    counts = result["request_counts"]
    assert counts == {"total": 15, "completed": 10, "failed": 5}
    assert result["run"] == {"inferred": 11, "reused": 0}
    assert result["usage"]["output_tokens"] > 0 and result["usage"]["input_tokens"] > 0

    outputs, errors = read(result["output_file"]), read(result["error_file"])
    assert len(outputs) == 10 and len(errors) == 5
    ids = Counter(o["custom_id"] for o in outputs + errors)
    assert ids["chat-1"] == 2  # the original answered, the duplicate rejected
    assert all(n == 1 for cid, n in ids.items() if cid not in ("chat-1", None))

    by_id = {o["custom_id"]: o for o in outputs}
    for o in outputs:
        assert o["error"] is None and o["response"]["status_code"] == 200
        body = o["response"]["body"]
        model = ChatCompletion if body["object"] == "chat.completion" else Completion
        model.model_validate(body)
        assert body["usage"]["completion_tokens"] >= 1

    chat = ChatCompletion.model_validate(by_id["json"]["response"]["body"])
    parsed = json.loads(chat.choices[0].message.content or "")
    assert set(parsed) >= {"city", "country"}
    choice = ChatCompletion.model_validate(by_id["choice"]["response"]["body"])
    assert choice.choices[0].message.content in ("yes", "no")
    lp = (
        ChatCompletion.model_validate(by_id["chat-logprobs"]["response"]["body"])
        .choices[0]
        .logprobs
    )
    assert lp is not None and lp.content and all(len(t.top_logprobs) == 3 for t in lp.content)
    cl = Completion.model_validate(by_id["cmpl-logprobs"]["response"]["body"]).choices[0].logprobs
    assert cl is not None and cl.tokens and len(cl.token_logprobs or []) == len(cl.tokens)
    assert len(by_id["n-3"]["response"]["body"]["choices"]) == 3
    stop = Completion.model_validate(by_id["stop"]["response"]["body"]).choices[0]
    assert " 6" not in stop.text

    errs = {e["error"]["line"]: e for e in errors}
    assert errs[11]["custom_id"] == "too-long"
    assert errs[11]["error"]["code"] == "context_length_exceeded"
    assert errs[11]["response"]["status_code"] == 400
    assert "line 11: body.messages" in errs[11]["error"]["message"]
    assert "line 12: body.max_tokens" in errs[12]["error"]["message"]
    assert errs[12]["response"] is None
    assert "line 13: not JSON" in errs[13]["error"]["message"]
    assert "duplicate 'chat-1'" in errs[14]["error"]["message"]
    assert "body.best_of: unknown field" in errs[15]["error"]["message"]

    # What the Prefect UI shows for the batch: progress at 100 %, a summary, the file locations.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    prefix = result["id"].replace("_", "-")
    keys = [f"{prefix}-{what}" for what in ("progress", "summary", "files")]
    with get_client(sync_client=True) as client:
        newest_first = client.read_artifacts(  # keys repeat per run: this run's are the newest
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)),
            sort=ArtifactSort.CREATED_DESC,
            limit=50,
        )
    artifacts: dict[str, Any] = {}
    for a in newest_first:
        artifacts.setdefault(str(a.key), a)
    assert artifacts[f"{prefix}-progress"].data == 100.0
    summary = str(artifacts[f"{prefix}-summary"].data)
    assert "latency p50 / p95 ms" in summary and "vllm in process" in summary
    assert result["output_file"] in str(artifacts[f"{prefix}-files"].data)


def test_rerun_reuses_everything_and_cache_serves_other_batches(
    db_url: str, tmp_path: Path
) -> None:
    first = write(
        tmp_path / "a.jsonl", [line(f"a{i}") for i in range(6)] + [line("s", temperature=1)]
    )
    r1 = run(first, db_url, chunk_size=3)
    assert r1["run"] == {"inferred": 7, "reused": 0}

    r2 = run(first, db_url, chunk_size=3)  # the same file: the same batch, nothing redone
    assert r2["id"] == r1["id"] and r2["status"] == "completed"
    assert r2["run"] == {"inferred": 0, "reused": 7}
    assert sorted(o["custom_id"] for o in read(r2["output_file"])) == sorted(
        o["custom_id"] for o in read(r1["output_file"])
    )

    # Another batch with the same deterministic requests under other ids: served from cache;
    # the sampled one (temperature 1, no seed) is inferred again.
    second = write(
        tmp_path / "b.jsonl",
        [{**line(f"a{i}"), "custom_id": f"b{i}"} for i in range(6)]
        + [{**line("s", temperature=1), "custom_id": "bs"}],
    )
    r3 = run(second, db_url, chunk_size=3)
    assert r3["id"] != r1["id"]
    assert r3["run"] == {"inferred": 1, "reused": 6}
    texts = {
        o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"]
        for o in read(r1["output_file"]) + read(r3["output_file"])
    }
    assert all(texts[f"a{i}"] == texts[f"b{i}"] for i in range(6))
    # A cached answer is a new response with the same content: its own id, not the first one's.
    first_ids = {o["custom_id"]: o["response"]["body"]["id"] for o in read(r1["output_file"])}
    cached_ids = {o["custom_id"]: o["response"]["body"]["id"] for o in read(r3["output_file"])}
    for i in range(6):
        assert cached_ids[f"b{i}"].startswith("chatcmpl-")
        assert cached_ids[f"b{i}"] != first_ids[f"a{i}"]
    assert len({*first_ids.values(), *cached_ids.values()}) == len(first_ids) + len(cached_ids)


def test_file_with_only_bad_lines_fails_with_errors_listed(db_url: str, tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonl", [line("x", max_tokens=0), {"custom_id": "y"}, "[]"])
    result = run(path, db_url)
    assert result["status"] == "failed"
    assert result["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert [e["line"] for e in result["errors"]["data"]] == [1, 2, 3]
    assert len(read(result["error_file"])) == 3 and read(result["output_file"]) == []


def test_explicit_batch_id_with_other_content_is_refused(sqlite_url: str, tmp_path: Path) -> None:
    from offline_queue.store.batches import BatchConflict

    a = write(tmp_path / "a.jsonl", [line("a", max_tokens=2)])
    b = write(tmp_path / "b.jsonl", [line("b", max_tokens=2)])
    assert run(a, sqlite_url, batch_id="nightly-1")["status"] == "completed"
    with pytest.raises(BatchConflict):
        run(b, sqlite_url, batch_id="nightly-1")


def test_the_next_chunk_runs_beside_the_tail_of_the_one_before(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The in-process engine takes the next chunk while the one in it drains
    (engines/vllm_steps.py): some answer of each chunk after the first is finished before the
    chunk ahead of it is committed (not every one: a chunk that ran wholly beside the one
    before it can be done before the feed claims the next). Served one chunk at a time
    (`LocalVLLM.overlaps = False`), none is: a chunk is claimed only after the one before is
    settled. Every custom_id is answered once either way."""
    from sqlalchemy import select

    from offline_queue.store.db import session
    from offline_queue.store.tables import Result

    lines = [line(f"r{i}", max_tokens=2 + (i % 4) * 10) for i in range(96)]
    out = run(write(tmp_path / "overlap.jsonl", lines), sqlite_url, chunk_size=24)
    assert out["status"] == "completed"
    assert sorted(o["custom_id"] for o in read(out["output_file"])) == sorted(
        x["custom_id"] for x in lines
    )
    with session(sqlite_url) as s:
        rows = s.execute(
            select(Result.created_at, Result.finished_at).where(Result.batch_id == out["id"])
        ).all()
    chunks: dict[float, list[float]] = {}
    for committed, finished in rows:
        chunks.setdefault(committed, []).append(finished)
    commits = sorted(chunks)
    assert len(commits) == 4
    early = [min(chunks[later]) < earlier for earlier, later in itertools.pairwise(commits)]
    assert any(early), f"chunks answered before the one ahead was committed: {early}"
