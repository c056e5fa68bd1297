"""Tool calls for an engine that runs vLLM in process: a named or required tool choice becomes a
structured-output constraint, and the constrained text becomes OpenAI's `tool_calls`. `auto`
needs a tool-call parser for the model's syntax, which the in-process engine does not run: such
a line is an error of its own, never a chat answer with the tools dropped.
(docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from offline_queue.formats import ChatCompletionBody, ChatTool, NamedToolChoice

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or _ANY_OBJECT


def unsupported(body: ChatCompletionBody) -> str | None:
    """Why the in-process engine cannot answer this body's tool choice, or None."""
    if body.tools and body.tool_choice in (None, "auto"):
        return (
            "body.tool_choice: 'auto' (the default with tools) needs a tool-call parser, which the "
            "in-process engine does not run; give tool_choice 'required', "
            '{"type": "function", "function": {"name": ...}} or \'none\', or serve the model '
            "with `vllm serve --enable-auto-tool-choice --tool-call-parser ...`"
        )
    return None


def calls_tools(body: ChatCompletionBody) -> bool:
    return bool(body.tools) and body.tool_choice not in (None, "none", "auto")


def constraint(body: ChatCompletionBody) -> dict[str, Any] | None:
    """The JSON schema the answer must follow for the body's tool choice (None: no tool call)."""
    if not calls_tools(body):
        return None
    assert body.tools is not None
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in body.tools if t.function.name == choice.function.name)
        return _parameters(tool)
    one_call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t.function.name]},
                    "parameters": _parameters(t),
                },
                "required": ["name", "parameters"],
            }
            for t in body.tools
        ]
    }
    calls: dict[str, Any] = {"type": "array", "minItems": 1, "items": one_call}
    if body.parallel_tool_calls is False:
        calls["maxItems"] = 1
    return calls


def tool_calls(body: ChatCompletionBody, text: str) -> list[dict[str, Any]] | None:
    """OpenAI `tool_calls` from text generated under `constraint(body)` (None: not a tool call,
    or text that is not the JSON asked for — a generation cut by max_tokens — left as content)."""
    if not calls_tools(body):
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        calls = [(choice.function.name, value)]
    elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
        calls = [(str(v.get("name")), v.get("parameters")) for v in value]
    else:
        return None
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": orjson.dumps(arguments).decode()},
        }
        for name, arguments in calls
    ]


def finish_reason(body: ChatCompletionBody, calls: list[dict[str, Any]] | None, reason: str) -> str:
    """OpenAI's: `tool_calls` when the model chose to call (tool_choice required); a call it was
    told to make (a named function) ends as `stop`, as OpenAI and `vllm serve` report it."""
    if calls and not isinstance(body.tool_choice, NamedToolChoice):
        return "tool_calls"
    return reason


def template_tools(body: ChatCompletionBody) -> list[dict[str, Any]] | None:
    """The tools as the chat template takes them (so the model reads what it may call)."""
    if not body.tools or body.tool_choice == "none":
        return None
    return [t.model_dump(mode="json", exclude_none=True) for t in body.tools]
