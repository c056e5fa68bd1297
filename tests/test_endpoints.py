"""Every endpoint a batch may use, through the whole flow: embeddings on the bundled embedding
model, responses and tool calls on the bundled chat model — in process (the catalog routes the
file by the model its lines name) and on `vllm serve`. Outputs validate with the `openai` SDK's
own models; what the engine cannot do is an error of its own line, naming the field."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from tests.test_pipeline import read, run, write

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.vllm]  # batches run end to end

EMBED = "all-minilm-l6-v2"
CHAT = "smollm2"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def req(custom_id: str, url: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def emb(custom_id: str, model: str = EMBED, **body: Any) -> dict[str, Any]:
    return req(custom_id, "/v1/embeddings", model=model, **body)


def weather(cid: str, choice: Any = None, max_tokens: int = 60, **sampling: Any) -> dict[str, Any]:
    """A chat line that asks for the weather and offers get_weather (`choice`: its tool_choice,
    none given when None)."""
    chosen = {} if choice is None else {"tool_choice": choice}
    return req(
        cid,
        "/v1/chat/completions",
        model=CHAT,
        messages=ASK,
        tools=[WEATHER],
        max_tokens=max_tokens,
        **chosen,
        **sampling,
    )


def say_hello(**extra: Any) -> dict[str, Any]:
    """The responses line `resp`: a greeting cut at 12 tokens."""
    return req(
        "resp",
        "/v1/responses",
        model=CHAT,
        input="Say hello.",
        max_output_tokens=12,
        temperature=0,
        **extra,
    )


def tool_calls() -> list[dict[str, Any]]:
    """Chat lines that must come back as a call of get_weather: a named and a required choice."""
    return [
        weather(cid, choice, temperature=0)
        for cid, choice in (
            ("named", {"type": "function", "function": {"name": "get_weather"}}),
            ("required", "required"),
        )
    ]


def check_tool_calls(out: dict[str, dict[str, Any]]) -> None:
    for cid in ("named", "required"):
        choice = ChatCompletion.model_validate(out[cid]["response"]["body"]).choices[0]
        # OpenAI's (and vllm serve's): a call the model was told to make ends as `stop`
        assert choice.finish_reason == ("stop" if cid == "named" else "tool_calls"), choice
        calls = choice.message.tool_calls or []
        assert [c.function.name for c in calls] == ["get_weather"]  # type: ignore[union-attr]
        assert set(json.loads(calls[0].function.arguments)) == {"city"}  # type: ignore[union-attr]


def by_id(path: str | None) -> dict[str, dict[str, Any]]:
    return {o["custom_id"]: o for o in read(path)}


def vectors(answer: dict[str, Any]) -> list[list[float]]:
    """The answer's vectors, base64 decoded as the SDK does; the whole answer must validate."""
    for item in answer["data"]:
        if isinstance(item["embedding"], str):
            raw = base64.b64decode(item["embedding"])
            item["embedding"] = np.frombuffer(raw, dtype="float32").tolist()
    parsed = CreateEmbeddingResponse.model_validate(answer)
    return [d.embedding for d in parsed.data]


def embeddings_file(tmp_path: Path, name: str, model: str = EMBED) -> Path:
    return write(
        tmp_path / name,
        [
            emb("one", model, input="The cat sat on the mat."),
            emb("many", model, input=["The cat sat on the mat.", "A dog barked."]),
            emb("ids", model, input=[101, 7592, 2088, 102]),
            emb("b64", model, input="The cat sat on the mat.", encoding_format="base64"),
            emb("dims", model, input="short", dimensions=8),
            emb("too-long", model, input="word " * 400),
        ],
    )


def check_embeddings(result: dict[str, Any], errors_must_name: dict[str, str]) -> list[float]:
    out, errors = by_id(result["output_file"]), by_id(result["error_file"])
    assert set(out) == {"one", "many", "ids", "b64"}, errors
    one = vectors(out["one"]["response"]["body"])
    many = vectors(out["many"]["response"]["body"])
    b64 = vectors(out["b64"]["response"]["body"])
    assert len(one) == 1 and len(one[0]) == 384 and len(many) == 2
    assert abs(sum(x * x for x in one[0]) - 1) < 1e-3  # sentence-transformers normalizes
    assert np.allclose(one[0], many[0], atol=1e-4) and np.allclose(one[0], b64[0], atol=1e-6)
    assert not np.allclose(many[0], many[1], atol=1e-2)
    usage = out["many"]["response"]["body"]["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0
    for cid, words in errors_must_name.items():
        message = errors[cid]["error"]["message"]
        assert all(w in message for w in words.split("|")), message
    return one[0]


def test_an_embeddings_batch_runs_on_the_bundled_embedding_model_and_is_cached(
    tmp_path: Path, sqlite_url: str
) -> None:
    path = embeddings_file(tmp_path, "emb.jsonl")
    with path.open("a") as f:  # another model in the same file: its own error
        f.write(
            '{"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", '
            '"body": {"model": "smollm2", "messages": [{"role": "user", "content": "x"}]}}\n'
        )
    result = run(path, sqlite_url)
    assert result["status"] == "completed" and result["request_counts"]["failed"] == 3
    assert result["model_version"].startswith("all-MiniLM-L6-v2@")
    first = check_embeddings(
        result,
        {
            "dims": "line 5|body.dimensions|Matryoshka",
            "too-long": "line 6|body.input|tokens",
            "chat": "line 7|model|'smollm2' is another model than the batch's (all-minilm-l6-v2)",
        },
    )
    # The same inputs again, under another name of the model: deterministic, so from the cache
    again = run(embeddings_file(tmp_path, "again.jsonl", "all-MiniLM-L6-v2"), sqlite_url)
    assert again["run"] == {"inferred": 2, "reused": 4}, again["run"]  # errors are not cached
    cached = vectors(by_id(again["output_file"])["one"]["response"]["body"])
    assert cached[0] == first


def test_responses_and_tool_calls_run_through_the_chat_path(
    tmp_path: Path, sqlite_url: str
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    path = write(
        tmp_path / "chat.jsonl",
        [
            say_hello(instructions="Be brief."),
            req(
                "resp-messages",
                "/v1/responses",
                model=CHAT,
                temperature=0,
                input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                max_output_tokens=200,
            ),
            req(
                "resp-json",
                "/v1/responses",
                model=CHAT,
                input="A city as JSON.",
                temperature=0,
                max_output_tokens=40,
                text={"format": {"type": "json_schema", "name": "c", "schema": schema}},
            ),
            *tool_calls(),
            weather("none", "none", max_tokens=8, temperature=0),
            weather("auto", max_tokens=8),
            req("embed-here", "/v1/embeddings", model=CHAT, input="x"),
        ],
    )
    result = run(path, sqlite_url)
    out, errors = by_id(result["output_file"]), by_id(result["error_file"])
    assert set(out) == {"resp", "resp-messages", "resp-json", "named", "required", "none"}, errors
    short = Response.model_validate(out["resp"]["response"]["body"])
    assert short.status == "incomplete" and short.incomplete_details is not None
    assert short.output_text and short.usage is not None and short.usage.output_tokens == 12
    assert short.instructions == "Be brief."
    assert Response.model_validate(out["resp-messages"]["response"]["body"]).status == "completed"
    as_json = Response.model_validate(out["resp-json"]["response"]["body"]).output_text
    assert set(json.loads(as_json)) == {"city"}
    check_tool_calls(out)
    assert (
        ChatCompletion.model_validate(out["named"]["response"]["body"]).choices[0].message.content
        is None
    )
    plain = ChatCompletion.model_validate(out["none"]["response"]["body"]).choices[0]
    assert plain.message.tool_calls is None and plain.message.content
    auto = errors["auto"]["error"]["message"]
    assert "line 7" in auto and "body.tool_choice" in auto and "required" in auto
    wrong = errors["embed-here"]["error"]["message"]
    assert "line 8" in wrong and "url" in wrong and "/v1/embeddings" in wrong


def test_embeddings_and_responses_on_vllm_serve(
    tmp_path: Path, sqlite_url: str, vllm_server: str, embedding_server: str
) -> None:
    result = run(embeddings_file(tmp_path, "emb.jsonl"), sqlite_url, engine=embedding_server)
    assert result["status"] == "completed"
    check_embeddings(result, {"dims": "dimensions", "too-long": "tokens"})
    path = write(
        tmp_path / "chat.jsonl",
        [
            say_hello(),
            *tool_calls(),
            weather("auto", max_tokens=8, temperature=0),
        ],
    )
    served = run(path, f"sqlite:///{tmp_path / 'chat.db'}", engine=vllm_server)
    out, errors = by_id(served["output_file"]), by_id(served["error_file"])
    assert set(out) == {"resp", "named", "required", "auto"}, errors
    answer = Response.model_validate(out["resp"]["response"]["body"])
    assert answer.output_text and answer.usage is not None and answer.usage.output_tokens == 12
    assert served["usage"]["output_tokens"] >= 12  # counted from the responses' own usage
    check_tool_calls(out)
    ChatCompletion.model_validate(out["auto"]["response"]["body"])  # the model may not call


def run_batch_input(tmp_path: Path) -> Path:
    """Like vLLM's own run-batch test input: chat lines, one naming a model nobody serves, one
    with a bad url, one with `"stream": "True"`, joined without a final newline."""
    lines = [
        req(
            "request-1",
            "/v1/chat/completions",
            model="SmolLM2-135M-Instruct",
            max_tokens=8,
            messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello world!"},
            ],
        ),
        req("request-2", "/v1/chat/completions", model="NonExistModel", max_tokens=8, messages=ASK),
        req("request-3", "/bad_url", model=CHAT, max_tokens=8, messages=ASK),
        req(
            "request-4",
            "/v1/chat/completions",
            model=CHAT,
            stream="True",
            max_tokens=8,
            messages=ASK,
        ),
        req("request-5", "/v1/chat/completions", model=CHAT, max_tokens=8, messages=ASK),
    ]
    path = tmp_path / "run_batch.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    return path


RUN_BATCH_ERRORS = {
    "request-2": "line 2|model|'NonExistModel' is not served|smollm2, all-minilm-l6-v2",
    "request-3": "line 3|url|'/bad_url'",
    "request-4": "line 4|body.stream",
}


def check_run_batch(outputs: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None:
    assert sorted(o["custom_id"] for o in outputs) == ["request-1", "request-5"]
    for o in outputs:
        ChatCompletion.model_validate(o["response"]["body"])
    named = {e["custom_id"]: e["error"]["message"] for e in errors}
    assert set(named) == set(RUN_BATCH_ERRORS), named
    for cid, words in RUN_BATCH_ERRORS.items():
        assert all(w in named[cid] for w in words.split("|")), named[cid]


def test_a_run_batch_style_file_through_the_cli(tmp_path: Path, prefect_api: str) -> None:
    from tests.conftest import cli_env, run_cli

    path = run_batch_input(tmp_path)
    done = run_cli(
        "run",
        str(path),
        "--db",
        f"sqlite:///{tmp_path / 'q.db'}",
        "--json",
        env=cli_env(prefect_api),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])  # after vLLM's own logs
    check_run_batch(read(result["output_file"]), read(result["error_file"]))
    models = run_cli("models", "--json", env=cli_env(prefect_api))
    assert {m["id"] for m in json.loads(models.stdout)} >= {CHAT, EMBED}


def test_a_run_batch_style_file_through_the_sdk_routed_by_a_saved_catalog_entry(
    tmp_path: Path, pg_url: str, vllm_server: str
) -> None:
    """The API given no engine: the catalog routes the batch. A saved served-model block names
    `vllm serve` for the chat model, so its lines run there, not in the API's process."""
    from offline_queue.api.settings import ApiSettings
    from offline_queue.blocks.catalog import ServedModelBlock
    from tests.api_helpers import lines_of, serve_api, upload, wait_terminal

    served = ServedModelBlock(
        name=CHAT, aliases=["SmolLM2-135M-Instruct"], engine=vllm_server, group="cpu-local"
    )
    served.save("smollm2-on-serve", overwrite=True)
    try:
        settings = ApiSettings(db=pg_url, data_dir=tmp_path / "api", chunk_size=16)
        with serve_api(settings) as api:
            client = api.client("acme")
            listed = {m.id for m in client.models.list()}
            assert {CHAT, "SmolLM2-135M-Instruct", EMBED} <= listed
            f = upload(client, run_batch_input(tmp_path))
            batch = client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            done = wait_terminal(client, batch.id)
            assert done.status == "completed", done
            outputs = lines_of(client, done.output_file_id)
            check_run_batch(outputs, lines_of(client, done.error_file_id))
            assert all(o["response"]["body"]["model"] == CHAT for o in outputs)  # the server's
    finally:
        ServedModelBlock.delete("smollm2-on-serve")


def test_a_catalog_entry_with_a_release_policy_sends_the_batch_to_its_track(
    tmp_path: Path, sqlite_url: str, vllm_server: str
) -> None:
    """The entry names a release policy at stage full: the batch goes to the candidate's
    engine (the served model, not the in-process one), stamped candidate with its version."""
    from offline_queue.blocks.catalog import ServedModelBlock
    from offline_queue.blocks.release import ReleasePolicy
    from offline_queue.store.batches import get_batch

    ReleasePolicy(
        stable_version="smollm2@in-process",
        candidate_version="smollm2@serve",
        candidate_engine=vllm_server,
        stage="full",
    ).save("chat-family", overwrite=True)
    ServedModelBlock(name=CHAT, release="chat-family").save("smollm2-released", overwrite=True)
    try:
        lines = [
            req(
                f"r{i}",
                "/v1/chat/completions",
                model=CHAT,
                messages=ASK,
                max_tokens=4,
                temperature=0,
            )
            for i in range(3)
        ]
        result = run(write(tmp_path / "released.jsonl", lines), sqlite_url)
    finally:
        ServedModelBlock.delete("smollm2-released")
        ReleasePolicy.delete("chat-family")
    assert result["request_counts"]["completed"] == 3
    assert {o["response"]["body"]["model"] for o in read(result["output_file"])} == {CHAT}
    batch = get_batch(sqlite_url, result["id"])
    assert batch is not None
    assert (batch.release_track, batch.release_version) == ("candidate", "smollm2@serve")
