"""Wire formats: one pydantic model per JSONL line, the body type chosen by `url`.

Bodies accept what OpenAI documents plus vLLM's documented extra sampling parameters (as
`vllm serve` does) and forbid everything else, so a typo such as `max_token` is a per-line
error instead of a silently ignored field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, model_validator

from offline_queue.states import BatchStatus

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
SUPPORTED_URLS = (CHAT_URL, COMPLETIONS_URL)

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


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_needed(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


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


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

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

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionBody:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
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


class _Line(_Strict):
    custom_id: CustomId
    method: Literal["POST"]


class ChatLine(_Line):
    url: Literal["/v1/chat/completions"]
    body: ChatCompletionBody


class CompletionLine(_Line):
    url: Literal["/v1/completions"]
    body: CompletionBody


RequestLine = Annotated[ChatLine | CompletionLine, Field(discriminator="url")]
REQUEST_LINE = TypeAdapter(RequestLine)
Body = ChatCompletionBody | CompletionBody
BODY_TYPES: dict[str, type[ChatCompletionBody] | type[CompletionBody]] = {
    CHAT_URL: ChatCompletionBody,
    COMPLETIONS_URL: CompletionBody,
}


def parse_body(url: str, body_json: str | bytes) -> Body:
    """A stored body back into its model (it was validated when it was queued)."""
    return BODY_TYPES[url].model_validate_json(body_json)


# ---- output side -------------------------------------------------------------------------


class LineError(BaseModel):
    code: str
    message: str
    line: int | None = None


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[LineError] = Field(default_factory=list)


class RunStats(BaseModel):
    """What one invocation did: sent to the engine, or took from earlier work (resume, cache)."""

    inferred: int = 0
    reused: int = 0


class Shards(BaseModel):
    """A batch's live shards: serving (holding a GPU) and waiting for one — our extra field on
    the batch object (OpenAI has none), present while any shard is live."""

    running: int
    waiting: int


class FinishEstimate(BaseModel):
    """When an unfinished batch is expected to finish (offline_queue/eta.py) — our extra field
    on the batch object, on a single batch's read while an estimate exists."""

    finish_at: int
    """Epoch seconds."""
    late: bool
    """The estimate passes the batch's `expires_at`: what is not done by then is dropped."""
    requests_per_second: float
    requests_ahead: int
    """Requests counted before the batch's own: more urgent tiers (and, for a batch not yet
    served, earlier batches of its tier)."""


class BatchObject(BaseModel):
    """OpenAI's batch object, plus where the files are on disk and what this run did."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str | None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str | None = "24h"
    """None for a batch run from the CLI: it has no window and never expires."""
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    usage: Usage = Field(default_factory=Usage)
    model_version: str | None = None
    input_file: str | None = None
    output_file: str | None = None
    error_file: str | None = None
    run: RunStats | None = None
    shards: Shards | None = None
    engine_seconds: float = 0.0
    """GPU time the batch used so far, in engine-seconds (offline_queue/usage.py) — our extra
    field: what a team that owns its GPUs bills a tenant by."""
    estimate: FinishEstimate | None = None
