"""OpenAI body → vLLM sampling arguments, as `vllm serve` maps them. Plain data, no vLLM import,
so the mapping is testable on its own and shared by every engine that runs vLLM in process."""

from __future__ import annotations

from typing import Any

from offline_queue.engines import tools
from offline_queue.formats import ChatCompletionBody, GenerateBody

_PASS_THROUGH = (
    "n",
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "allowed_token_ids",
    "bad_words",
    "logit_bias",
)


def structured_outputs(body: GenerateBody) -> dict[str, Any] | None:
    """The one structured-output constraint of a body, in vLLM's StructuredOutputsParams terms
    (a tool call's schema first: the answer must be the call)."""
    if isinstance(body, ChatCompletionBody) and (schema := tools.constraint(body)) is not None:
        return {"json": schema}
    if body.structured_outputs is not None:
        so = body.structured_outputs
        return {
            k: v
            for k, v in {
                "json": so.json_,
                "regex": so.regex,
                "choice": so.choice,
                "grammar": so.grammar,
                "json_object": so.json_object,
            }.items()
            if v
        }
    legacy = {
        "json": body.guided_json,
        "regex": body.guided_regex,
        "choice": body.guided_choice,
        "grammar": body.guided_grammar,
    }
    for key, value in legacy.items():
        if value:
            return {key: value}
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        return {"json": fmt.json_schema.schema_}
    if fmt is not None and fmt.type == "json_object":
        return {"json_object": True}
    return None


def logprobs_count(body: GenerateBody) -> int | None:
    """How many logprobs per token vLLM must return (None: none at all)."""
    if isinstance(body, ChatCompletionBody):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def sampling_kwargs(body: GenerateBody, max_tokens: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_tokens": max_tokens}
    for name in _PASS_THROUGH:
        value = getattr(body, name)
        if value is not None:
            kwargs[name] = value
    if body.stop is not None:
        kwargs["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    count = logprobs_count(body)
    if count is not None:
        kwargs["logprobs"] = count
    return kwargs
