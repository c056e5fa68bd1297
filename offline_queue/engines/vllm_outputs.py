"""vLLM's request output as our reply: choices with their finish reason (tool calls found in
the text, as `vllm serve` finds them), logprobs decoded with the tokens vLLM chose, and the
OpenAI body the line's endpoint returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from offline_queue.engines import tools
from offline_queue.engines.base import EngineRequest, Reply
from offline_queue.engines.responses import Choice, TokenLogprob, response_body, responses_object
from offline_queue.engines.sampling import logprobs_count
from offline_queue.formats import ChatCompletionBody, GenerateBody, ResponsesBody


@dataclass(frozen=True)
class Naming:
    """What names a reply's model and decodes its tokens: the engine's served name and
    tokenizer."""

    model_name: str
    tokenizer: Any


def reply(
    request: EngineRequest,
    sampled: GenerateBody,
    ids: list[int],
    output: Any,
    times: tuple[float, float],
    naming: Naming,
) -> Reply:
    """`sampled`: the body the line ran as (a responses line's chat body); `times`: when the
    chunk went into the engine and the step that ended this request (epoch seconds)."""
    started, finished_at = times
    want_logprobs = logprobs_count(sampled)
    choices = []
    completion_tokens = 0
    for completion in output.outputs:
        completion_tokens += len(completion.token_ids)
        reason = completion.finish_reason or "stop"
        calls = None
        if isinstance(sampled, ChatCompletionBody):
            calls = tools.tool_calls(sampled, completion.text)
            reason = tools.finish_reason(sampled, calls, reason)
        choices.append(
            Choice(
                text=completion.text,
                finish_reason=reason,
                logprobs=_logprobs(completion, want_logprobs, naming.tokenizer)
                if want_logprobs is not None
                else None,
                tool_calls=calls,
            )
        )
    if isinstance(request.body, ResponsesBody):
        body = responses_object(
            request.body, naming.model_name, choices[0], len(ids), completion_tokens
        )
    else:
        body = response_body(request.url, naming.model_name, choices, len(ids), completion_tokens)
    return Reply(
        ok=True,
        body=orjson.dumps(body).decode(),
        prompt_tokens=len(ids),
        completion_tokens=completion_tokens,
        latency_ms=(finished_at - started) * 1000,
        finished_at=finished_at,
    )


def _logprobs(completion: Any, top: int, tokenizer: Any) -> list[TokenLogprob]:
    tokens = []
    for token_id, candidates in zip(completion.token_ids, completion.logprobs or [], strict=False):
        chosen = candidates.get(token_id)
        ranked = sorted(candidates.items(), key=lambda kv: kv[1].rank)[:top]
        tokens.append(
            TokenLogprob(
                token=_decoded(token_id, chosen, tokenizer),
                logprob=chosen.logprob if chosen is not None else float("-inf"),
                top=[(_decoded(tid, lp, tokenizer), lp.logprob) for tid, lp in ranked],
            )
        )
    return tokens


def _decoded(token_id: int, logprob: Any, tokenizer: Any) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return str(logprob.decoded_token)
    return str(tokenizer.decode([token_id]))
