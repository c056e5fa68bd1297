"""Wire formats: one pydantic model per JSONL line, the body type chosen by `url`.

Bodies accept what OpenAI documents plus vLLM's documented extra sampling parameters (as
`vllm serve` does) and forbid everything else, so a typo such as `max_token` is a per-line
error instead of a silently ignored field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, model_validator

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
RESPONSES_URL = "/v1/responses"
SUPPORTED_URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL, RESPONSES_URL)
GENERATE_URLS = (CHAT_URL, COMPLETIONS_URL, RESPONSES_URL)
"""Endpoints a generating (chat) model serves; an embedding model serves EMBEDDINGS_URL."""

# Larger than any context window we serve, small enough that a typo (1e12) is caught at once.
MAX_TOKENS_LIMIT = 1 << 20

CustomId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=512)]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extra: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [
            k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k)
        ]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


class JsonSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


Format = TypeVar("Format", "ResponseFormat", "ResponseTextFormat")


def _schema_given(fmt: Format, schema: object, what: str) -> Format:
    """Structured output as both endpoints ask for it: `json_schema` only with its schema."""
    if fmt.type == "json_schema" and schema is None:
        raise ValueError(f"type json_schema needs {what}")
    return fmt


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_needed(self) -> ResponseFormat:
        return _schema_given(self, self.json_schema, "a json_schema object")


class SamplingFields(_Strict):
    """Fields both endpoints share: OpenAI's sampling knobs and vLLM's extras."""

    model: NonEmptyStr
    max_tokens: Annotated[int, Field(gt=0, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    stream: Literal[False] | None = None
    # vLLM extra sampling parameters, as `vllm serve` accepts them.
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    response_format: ResponseFormat | None = None

    def is_deterministic(self) -> bool:
        """Whether the same body on the same model version gives the same answer (cacheable)."""
        return self.temperature == 0 or self.seed is not None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: NonEmptyStr
    arguments: str
    """JSON text, as OpenAI sends it."""


class ToolCall(_Strict):
    id: NonEmptyStr
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Strict):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments; none: any object."""
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: NonEmptyStr


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant's earlier calls (a conversation that goes on after a tool's answer)."""

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionBody(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(gt=0, le=MAX_TOKENS_LIMIT)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    tools: Annotated[list[ChatTool], Field(min_length=1, max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionBody:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionBody:
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
            t.function.name for t in self.tools or ()
        }:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(SamplingFields):
    prompt: (
        str
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=1)]
    )
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: Literal[False] | None = None

    def prompt_value(self) -> str | list[int]:
        """The one prompt of this line: a one-element list of strings is that string."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return str(self.prompt[0])
        return self.prompt  # type: ignore[return-value]

    def token_limit(self) -> int | None:
        return self.max_tokens


class EmbeddingBody(_Strict):
    """OpenAI's embeddings request: `input` is one text, several, one token-id list or several."""

    model: NonEmptyStr
    input: (
        NonEmptyStr
        | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=2048)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(gt=0)] | None = None
    user: str | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        """The texts (or token-id lists) to embed, one embedding each, in order."""
        value: Any = self.input  # one of four shapes, told apart by their first item
        if isinstance(value, str):
            return [value]
        if isinstance(value[0], int):
            return [list(value)]
        return list(value)

    def is_deterministic(self) -> bool:
        return True  # no sampling: the same text on the same weights is the same vector

    def token_limit(self) -> int | None:
        return None


class InputText(_Strict):
    type: Literal["input_text", "output_text"]
    text: str


class ResponseInputMessage(_Strict):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[InputText], Field(min_length=1)]

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class ResponseTextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _schema_when_needed(self) -> ResponseTextFormat:
        return _schema_given(self, self.schema_, "a schema")


class ResponseText(_Strict):
    format: ResponseTextFormat | None = None


class ResponsesBody(_Strict):
    """OpenAI's Responses request, as far as a batch can use it: no stored conversation state
    (`previous_response_id`), no built-in tools. In process it runs through the chat path."""

    model: NonEmptyStr
    input: NonEmptyStr | Annotated[list[ResponseInputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(gt=0, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    text: ResponseText | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = None
    service_tier: str | None = None
    stream: Literal[False] | None = None

    def as_chat(self) -> ChatCompletionBody:
        """The same request as a chat completion (what `vllm serve` does with it too)."""
        messages = (
            [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        )
        if isinstance(self.input, str):
            messages.append(ChatMessage(role="user", content=self.input))
        else:
            messages += [ChatMessage(role=m.role, content=m.text()) for m in self.input]
        fmt = self.text.format if self.text is not None else None
        response_format = None
        if fmt is not None and fmt.type == "json_schema":
            response_format = ResponseFormat(
                type="json_schema",
                json_schema=JsonSchemaFormat(name=fmt.name or "response", schema=fmt.schema_ or {}),
            )
        elif fmt is not None and fmt.type == "json_object":
            response_format = ResponseFormat(type="json_object")
        return ChatCompletionBody(
            model=self.model,
            messages=messages,
            max_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            response_format=response_format,
        )

    def is_deterministic(self) -> bool:
        return self.temperature == 0

    def token_limit(self) -> int | None:
        return self.max_output_tokens


class _Line(_Strict):
    custom_id: CustomId
    method: Literal["POST"]


class ChatLine(_Line):
    url: Literal["/v1/chat/completions"]
    body: ChatCompletionBody


class CompletionLine(_Line):
    url: Literal["/v1/completions"]
    body: CompletionBody


class EmbeddingLine(_Line):
    url: Literal["/v1/embeddings"]
    body: EmbeddingBody


class ResponsesLine(_Line):
    url: Literal["/v1/responses"]
    body: ResponsesBody


AnyLine = ChatLine | CompletionLine | EmbeddingLine | ResponsesLine
RequestLine = Annotated[AnyLine, Field(discriminator="url")]
REQUEST_LINE = TypeAdapter(RequestLine)
Body = ChatCompletionBody | CompletionBody | EmbeddingBody | ResponsesBody
GenerateBody = ChatCompletionBody | CompletionBody
"""What a generating engine samples from (a responses body runs as its chat body)."""
BODY_TYPES: dict[str, type[Body]] = {
    CHAT_URL: ChatCompletionBody,
    COMPLETIONS_URL: CompletionBody,
    EMBEDDINGS_URL: EmbeddingBody,
    RESPONSES_URL: ResponsesBody,
}


def parse_body(url: str, body_json: str | bytes) -> Body:
    """A stored body back into its model (it was validated when it was queued)."""
    return BODY_TYPES[url].model_validate_json(body_json)
