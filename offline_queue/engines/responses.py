"""OpenAI response bodies from what an in-process engine made: chat.completion, text_completion
and response from generated choices, the embeddings list from vectors."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from offline_queue.formats import CHAT_URL, ResponsesBody


@dataclass(slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(slots=True)
class Choice:
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """OpenAI tool calls made of `text` (engines/tools.py); then the message has no content."""


def _chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(tok, lp) for tok, lp in t.top]}
            for t in tokens
        ],
        "refusal": None,
    }


def _completion_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    offsets, position = [], 0
    for t in tokens:
        offsets.append(position)
        position += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


def _message(choice: Choice) -> dict[str, Any]:
    if choice.tool_calls:
        return {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": choice.tool_calls,
        }
    return {"role": "assistant", "content": choice.text, "refusal": None}


def response_body(
    url: str, model: str, choices: list[Choice], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    created = int(time.time())
    if url == CHAT_URL:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": _message(c),
                    "logprobs": _chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ],
            "usage": usage,
        }
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "text": c.text,
                "logprobs": _completion_logprobs(c.logprobs) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage,
    }


def responses_object(
    body: ResponsesBody, model: str, choice: Choice, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """OpenAI's `response` object for a responses line run through the chat path: one message
    of output text; `incomplete` when it stopped at max_output_tokens, as OpenAI reports it."""
    cut = choice.finish_reason == "length"
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    return {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": time.time(),
        "model": model,
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "error": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "output": [
            {
                "type": "message",
                "id": f"msg_{uuid.uuid4().hex}",
                "role": "assistant",
                "status": "incomplete" if cut else "completed",
                "content": [{"type": "output_text", "text": choice.text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "text": {"format": fmt.model_dump(mode="json", by_alias=True, exclude_none=True)}
        if fmt is not None
        else {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def embeddings_body(
    model: str, vectors: Sequence[Sequence[float]], encoding_format: str, prompt_tokens: int
) -> dict[str, Any]:
    """OpenAI's embeddings list. base64 is the vector's float32 bytes, little-endian — what the
    openai SDK decodes (`np.frombuffer(..., dtype="float32")`)."""

    def encoded(vector: Sequence[float]) -> list[float] | str:
        if encoding_format == "base64":
            return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        return [float(x) for x in vector]

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encoded(v)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
