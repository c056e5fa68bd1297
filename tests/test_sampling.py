"""The OpenAI request body → vLLM sampling mapping (engines/sampling.py): which fields pass,
which stay out, the engine's token limit, structured-output constraints, and that vLLM's own
SamplingParams accept what the mapping builds."""

from __future__ import annotations

from typing import Any

import pytest

from offline_queue.engines.sampling import sampling_kwargs, structured_outputs
from offline_queue.formats import ChatCompletionBody, CompletionBody


def chat(**fields: Any) -> ChatCompletionBody:
    return ChatCompletionBody.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def completion(**fields: Any) -> CompletionBody:
    return CompletionBody.model_validate({"model": "m", "prompt": "hi", **fields})


def test_max_tokens_is_the_engines_limit_not_the_bodys() -> None:
    # The engine computes the limit (the body's, cut to what the context leaves) and passes it in.
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


@pytest.mark.vllm  # imports vLLM (no engine)
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
