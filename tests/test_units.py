"""The pure functions, one at a time: backoff, the OpenAI → vLLM sampling mapping,
Retry-After, the shape of an output file line, the adaptive window and a server's share key.

One room over 400 lines on purpose: each test here needs no store, engine or server, and that
is what the file is (the fast first pass); split by topic, each file would be a few tests."""

from __future__ import annotations

import email.utils
import random
import time
from typing import Any

import httpx
import orjson
import pytest

from offline_queue.batches import file_line
from offline_queue.engines.openai_http import _retry_after
from offline_queue.engines.sampling import sampling_kwargs, structured_outputs
from offline_queue.formats import ChatCompletionBody, CompletionBody
from offline_queue.retry import RetryPolicy
from offline_queue.store.results import ResultLine
from offline_queue.window import Window

# ---- RetryPolicy -------------------------------------------------------------------------


def samples(policy: RetryPolicy, attempts: int, n: int = 400) -> list[float]:
    return [policy.delay(attempts) for _ in range(n)]


def test_each_retry_waits_about_twice_as_long() -> None:
    random.seed(1)
    policy = RetryPolicy(base_seconds=1.0, cap_seconds=1000.0)
    for attempts in range(1, 8):
        raw = 2.0 ** (attempts - 1)
        got = samples(policy, attempts)
        assert all(0.5 * raw <= d <= 1.5 * raw for d in got), attempts
        assert 0.9 * raw < sum(got) / len(got) < 1.1 * raw  # centred on the doubling
    # Two doublings apart, the ranges no longer overlap: waits really grow.
    assert max(samples(policy, 3)) < min(samples(policy, 5))
    assert min(samples(policy, 0)) >= 0.5 and max(samples(policy, 0)) <= 1.5  # as attempt 1


def test_no_wait_is_longer_than_the_cap() -> None:
    random.seed(2)
    policy = RetryPolicy(base_seconds=1.0, cap_seconds=10.0)
    for attempts in (4, 5, 6, 30):  # raw 8 s (its jitter reaches past the cap), then the cap
        assert max(samples(policy, attempts)) <= 10.0
    at_cap = samples(policy, 30)
    assert min(at_cap) >= 5.0
    # Still spread out at the cap, not piled up on it: a shared outage must not end in a herd.
    assert len({round(d, 3) for d in at_cap}) > 300
    assert sum(1 for d in at_cap if d == 10.0) < 5


def test_jitter_spreads_over_the_whole_window() -> None:
    random.seed(3)
    got = samples(RetryPolicy(base_seconds=2.0, cap_seconds=60.0), 2, n=2000)  # raw 4 s
    assert min(got) < 2.1 and max(got) > 5.9
    assert 0.4 < sum(1 for d in got if d < 4.0) / len(got) < 0.6


# ---- sampling_kwargs ---------------------------------------------------------------------


def chat(**fields: Any) -> ChatCompletionBody:
    return ChatCompletionBody.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def completion(**fields: Any) -> CompletionBody:
    return CompletionBody.model_validate({"model": "m", "prompt": "hi", **fields})


def test_max_tokens_is_the_engines_limit_not_the_bodys() -> None:
    # The engine computes the limit (the body's, cut to the context room) and passes it in.
    assert sampling_kwargs(chat(max_tokens=100), 7) == {"max_tokens": 7, "n": 1}
    assert sampling_kwargs(completion(), 5) == {"max_tokens": 5, "n": 1}


def test_openai_sampling_fields_pass_through() -> None:
    sampling: dict[str, Any] = {"temperature": 0.3, "top_p": 0.9, "seed": 42, "n": 3}
    sampling |= {"presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {50256: -100}}
    assert sampling_kwargs(chat(**sampling), 16) == {"max_tokens": 16, **sampling}


def test_temperature_zero_is_kept_not_dropped_as_falsy() -> None:
    assert sampling_kwargs(chat(temperature=0), 4)["temperature"] == 0
    assert sampling_kwargs(chat(seed=0), 4)["seed"] == 0


def test_vllm_extras_pass_through() -> None:
    body = completion(
        top_k=20,
        min_p=0.05,
        repetition_penalty=1.1,
        stop_token_ids=[2],
        include_stop_str_in_output=True,
        ignore_eos=True,
        min_tokens=3,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        allowed_token_ids=[1, 2, 3],
        bad_words=["darn"],
    )
    got = sampling_kwargs(body, 8)
    assert got == {
        "max_tokens": 8,
        "n": 1,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "stop_token_ids": [2],
        "include_stop_str_in_output": True,
        "ignore_eos": True,
        "min_tokens": 3,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "allowed_token_ids": [1, 2, 3],
        "bad_words": ["darn"],
    }


def test_stop_is_always_a_list() -> None:
    assert sampling_kwargs(chat(stop="\n"), 4)["stop"] == ["\n"]
    assert sampling_kwargs(chat(stop=["a", "b"]), 4)["stop"] == ["a", "b"]
    assert "stop" not in sampling_kwargs(chat(), 4)


def test_logprobs_chat_is_a_flag_with_a_count_completions_a_count() -> None:
    assert "logprobs" not in sampling_kwargs(chat(), 4)
    assert "logprobs" not in sampling_kwargs(chat(logprobs=False), 4)
    assert sampling_kwargs(chat(logprobs=True), 4)["logprobs"] == 0  # the chosen token only
    assert sampling_kwargs(chat(logprobs=True, top_logprobs=5), 4)["logprobs"] == 5
    assert sampling_kwargs(completion(logprobs=3), 4)["logprobs"] == 3
    assert sampling_kwargs(completion(logprobs=0), 4)["logprobs"] == 0
    assert "logprobs" not in sampling_kwargs(completion(), 4)


def test_fields_vllm_does_not_sample_with_stay_out() -> None:
    body = chat(user="u", metadata={"k": "v"}, store=False, service_tier="auto", model="x")
    assert sampling_kwargs(body, 4) == {"max_tokens": 4, "n": 1}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"structured_outputs": {"regex": "[0-9]+"}}, {"regex": "[0-9]+"}),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, {"choice": ["yes", "no"]}),
        ({"structured_outputs": {"json": {"type": "object"}}}, {"json": {"type": "object"}}),
        ({"guided_choice": ["a", "b"]}, {"choice": ["a", "b"]}),
        ({"guided_regex": "x+"}, {"regex": "x+"}),
        ({"guided_grammar": "root ::= 'a'"}, {"grammar": "root ::= 'a'"}),
        ({"guided_json": {"type": "string"}}, {"json": {"type": "string"}}),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
            {"json": {"type": "x"}},
        ),
        ({"response_format": {"type": "json_object"}}, {"json_object": True}),
        ({"response_format": {"type": "text"}}, None),
        ({}, None),
        # vLLM's own field wins over the legacy and OpenAI ones.
        (
            {"structured_outputs": {"regex": "a"}, "guided_regex": "b"},
            {"regex": "a"},
        ),
    ],
)
def test_structured_output_constraints(fields: dict[str, Any], expected: Any) -> None:
    assert structured_outputs(chat(**fields)) == expected


def test_the_mapping_builds_vllm_sampling_params() -> None:
    """What the mapping returns, vLLM accepts as it is (names and types)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    body = chat(
        temperature=0.7,
        top_p=0.8,
        seed=1,
        n=2,
        stop="END",
        logprobs=True,
        top_logprobs=2,
        top_k=5,
        min_tokens=1,
        response_format={"type": "json_object"},
    )
    kwargs = sampling_kwargs(body, 12)
    so = structured_outputs(body)
    assert so is not None
    params = SamplingParams(**kwargs, structured_outputs=StructuredOutputsParams(**so))
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (12, 0.7, 0.8, 1)
    assert (params.n, params.stop, params.logprobs, params.top_k) == (2, ["END"], 2, 5)
    assert params.structured_outputs is not None and params.structured_outputs.json_object


# ---- Retry-After -------------------------------------------------------------------------


def answer(retry_after: str | None) -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return httpx.Response(429, headers=headers)


def test_retry_after_in_seconds() -> None:
    assert _retry_after(answer("7")) == 7.0
    assert _retry_after(answer(" 0 ")) == 0.0
    assert _retry_after(answer("1.5")) == 1.5
    assert _retry_after(answer("-3")) == 0.0  # never a negative sleep


def test_retry_after_as_an_http_date() -> None:
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    got = _retry_after(answer(soon))
    assert got is not None and 27 <= got <= 31
    assert _retry_after(answer("Wed, 21 Oct 2015 07:28:00 GMT")) == 0.0  # in the past
    unknown_zone = email.utils.formatdate(time.time() + 60).replace("+0000", "-0000")
    got = _retry_after(answer(unknown_zone))
    assert got is not None and 57 <= got <= 61  # read as UTC, not as local time


def test_retry_after_missing_or_garbage_means_our_own_backoff() -> None:
    assert _retry_after(answer(None)) is None
    assert _retry_after(answer("")) is None
    assert _retry_after(answer("soon")) is None
    assert _retry_after(answer("inf")) is None
    assert _retry_after(answer("nan")) is None


# ---- output and error file lines ---------------------------------------------------------


def row(**fields: Any) -> ResultLine:
    base: dict[str, Any] = {
        "line_no": 3,
        "custom_id": "req-3",
        "response_id": "batch_req_abc123",
        "ok": True,
        "status_code": 200,
        "body": '{"id": "chatcmpl-1", "choices": []}',
        "error_code": None,
        "error_message": None,
    }
    return ResultLine(**{**base, **fields})


def test_an_output_line_is_openais_shape_around_the_stored_body() -> None:
    raw = file_line(row())
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert orjson.loads(raw) == {
        "id": "batch_req_abc123",
        "custom_id": "req-3",
        "response": {
            "status_code": 200,
            "request_id": "req_abc123",
            "body": {"id": "chatcmpl-1", "choices": []},
        },
        "error": None,
    }
    assert b'{"id": "chatcmpl-1", "choices": []}' in raw  # the stored bytes, not re-serialised


def test_an_engine_error_line_keeps_the_servers_answer() -> None:
    raw = file_line(
        row(
            ok=False,
            status_code=400,
            body='{"error": {"message": "too long"}}',
            error_code="context_length_exceeded",
            error_message="line 3: too long",
        )
    )
    assert orjson.loads(raw) == {
        "id": "batch_req_abc123",
        "custom_id": "req-3",
        "response": {
            "status_code": 400,
            "request_id": "req_abc123",
            "body": {"error": {"message": "too long"}},
        },
        "error": {"code": "context_length_exceeded", "message": "line 3: too long", "line": 3},
    }


def test_an_error_line_without_an_answer_has_a_null_response() -> None:
    raw = file_line(
        row(
            ok=False,
            custom_id=None,  # a line so broken it has no custom_id
            status_code=None,
            body=None,
            error_code="invalid_json",
            error_message="line 3: not JSON",
        )
    )
    assert orjson.loads(raw) == {
        "id": "batch_req_abc123",
        "custom_id": None,
        "response": None,
        "error": {"code": "invalid_json", "message": "line 3: not JSON", "line": 3},
    }


def test_a_line_escapes_what_it_did_not_build() -> None:
    tricky = 'a"b\\c\né'
    line = orjson.loads(file_line(row(custom_id=tricky, ok=False, error_message=tricky)))
    assert line["custom_id"] == tricky and line["error"]["message"] == tricky
    assert orjson.loads(file_line(row(body=None)))["response"]["body"] is None


def _window_after(refuse_every: int, replies: int = 3000, cap: int = 64) -> tuple[int, Window]:
    """A window fed replies as a server with a knee at 48 in flight would send them (the more in
    flight, the sooner the next one, up to the knee), one in `refuse_every` a refusal (0:
    none); its size at the end."""
    window = Window(cap=cap)
    for i in range(1, replies + 1):
        time.sleep(0.01 / min(window.limit, 48))
        if refuse_every and i % refuse_every == 0:
            window.overloaded()
        else:
            window.answered()
    return window.limit, window


def test_the_window_grows_past_the_knee_when_nothing_is_refused() -> None:
    assert _window_after(0)[0] >= 48


def test_a_steady_tenth_refused_settles_the_window_near_two_over_the_share() -> None:
    size, window = _window_after(10)
    assert 14 <= size <= 30, window.history[-10:]  # 2 / 0.1 = 20; halving went to ~2.5


def test_half_refused_halves_the_window_down_to_one() -> None:
    size, window = _window_after(2, replies=400)
    assert size <= 2 and any(why == "overloaded" for _, _, why in window.history)


def test_a_server_on_loopback_is_this_node_s_own_in_the_engine_time() -> None:
    """Every node of a group serves at 127.0.0.1:8000: each node's engine is an engine of its
    own in the engine-time rows and metrics (one key for all would add N engines up as one)."""
    import socket

    from offline_queue.engines.openai_http import engine_key

    here = socket.gethostname()
    assert engine_key("http://127.0.0.1:8000/v1/", "m") == f"{here}:http://127.0.0.1:8000/v1#m"
    assert engine_key("http://localhost:8000/v1", "m").startswith(f"{here}:")
    assert engine_key("http://gpu-1:8000/v1", "m") == "http://gpu-1:8000/v1#m"


def test_a_node_runs_a_loop_per_gpu_each_with_its_own_devices() -> None:
    """vLLM in process: one loop per GPU (per tensor-parallel group), CUDA_VISIBLE_DEVICES set
    for each; a served engine: one loop (the server spreads its own GPUs)."""
    from offline_queue.pools.node import loop_commands

    per_gpu = loop_commands(None, None, 4, db=None, chunk_size=8)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in per_gpu] == ["0", "1", "2", "3"]
    assert all(cmd[-4:] == ["worker", "loop", "--chunk-size", "8"] for cmd, _ in per_gpu)
    served = loop_commands("http://127.0.0.1:8000/v1", None, 4, db="sqlite:///x", chunk_size=8)
    assert len(served) == 1 and served[0][0][-2:] == ["--db", "sqlite:///x"]
    assert served[0][0][-4:-2] == ["--engine", "http://127.0.0.1:8000/v1"]
