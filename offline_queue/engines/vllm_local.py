"""vLLM in this process: the highest-throughput engine, loaded once per process and settings.

Prompts are rendered and tokenized here (chat template, then token ids) so that a prompt too
long for the context is a per-request error with the line named, not a fault of the whole
chunk, and `max_tokens` is clamped to what the context leaves, as `vllm serve` does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from offline_queue.engines import tools
from offline_queue.engines.base import EngineRequest, Overlap, PerProcess, Reply
from offline_queue.engines.env import apply_engine_env, platform_is_cpu
from offline_queue.engines.responses import (
    embeddings_body,
)
from offline_queue.engines.sampling import sampling_kwargs, structured_outputs
from offline_queue.engines.vllm_outputs import Naming, reply
from offline_queue.engines.vllm_steps import SharedSteps
from offline_queue.formats import (
    EMBEDDINGS_URL,
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    GenerateBody,
    ResponsesBody,
)
from offline_queue.model import model_context, model_version, resolve_model

log = logging.getLogger(__name__)

# At import, not when the engine is built: whatever imports vLLM, torch or transformers after
# this module in the process (the engine, the model's tokenizer) finds the environment set.
# The batch flow imports this module however it is loaded — a deployment loads flows/batch.py
# as a script, so no package __init__ of ours runs there — and so does every process that runs it.
apply_engine_env()

# On CPU: fp32 (no bf16 in hardware, ~3x slower), a fixed KV cache (the default wants 92 % of
# RAM), eager mode and the in-process executor (docs/engines.md).
CPU_KV_CACHE_BYTES = 512 * 2**20
CPU_MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class VLLMSettings:
    """What identifies one loaded engine; the Prefect block exposes the same fields."""

    model: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    seed: int = 0
    runner: str = "auto"

    def llm_kwargs(self, on_cpu: bool, model_context: int | None = None) -> dict[str, Any]:
        """`vllm.LLM` arguments. `model_context`: the context the model declares — on CPU a
        longer one is capped at CPU_MAX_MODEL_LEN, a shorter one is left to vLLM."""
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enforce_eager": self.enforce_eager,
            "seed": self.seed,
            "runner": self.runner,
            # Every request carries its tier as its priority: an urgent one is scheduled at the
            # next step ahead of waiting ones (under "fcfs" vLLM ignores the priority).
            "scheduling_policy": "priority",
        }
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        if self.max_num_seqs:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if self.kv_cache_memory_bytes:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        if on_cpu:
            kwargs["distributed_executor_backend"] = "uni"
            kwargs["enforce_eager"] = True
            if model_context is None or model_context > CPU_MAX_MODEL_LEN:
                kwargs.setdefault("max_model_len", CPU_MAX_MODEL_LEN)
            kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
            if self.dtype == "auto":
                kwargs["dtype"] = "float32"
        else:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        return kwargs


class LocalVLLM:
    """A `vllm.LLM` in this process."""

    def __init__(self, settings: VLLMSettings):
        _background_start.wait()  # a module half-imported by that thread is not importable yet
        from transformers import AutoTokenizer
        from vllm import LLM

        self.settings = settings
        on_cpu = platform_is_cpu()
        self.model_dir = resolve_model(settings.model, on_gpu=not on_cpu)
        self.model_version = model_version(self.model_dir)
        self.model_name = settings.served_model_name or self.model_dir.name
        kwargs = settings.llm_kwargs(on_cpu, model_context(self.model_dir))
        self.llm = LLM(model=str(self.model_dir), **kwargs)
        config = self.llm.llm_engine.model_config
        self.max_model_len: int = config.max_model_len
        self.embeds = config.runner_type == "pooling"
        """An embedding model: it serves /v1/embeddings and nothing else."""
        self.matryoshka = bool(getattr(config, "is_matryoshka", False))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self._naming = Naming(self.model_name, self.tokenizer)
        self._lock = threading.Lock()
        """Embeddings run one chunk at a time: `LLM.embed` steps the engine until it is empty."""
        self.steps = SharedSteps(self.llm)
        self.engine_key = f"local:{self.model_dir}"

    # -- prompts ---------------------------------------------------------------------------

    @staticmethod
    def generate_body(request: EngineRequest) -> GenerateBody:
        """What is sampled for a line: a responses line runs as its chat body."""
        body = request.body
        if isinstance(body, ResponsesBody):
            return body.as_chat()
        assert isinstance(body, ChatCompletionBody | CompletionBody)
        return body

    def prompt_ids(self, body: GenerateBody) -> list[int]:
        if isinstance(body, ChatCompletionBody):
            messages: Any = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                | ({"tool_calls": [c.model_dump() for c in m.tool_calls]} if m.tool_calls else {})
                | ({"tool_call_id": m.tool_call_id} if m.tool_call_id else {})
                for m in body.messages
            ]
            offered: Any = tools.template_tools(body)  # transformers' own type is narrower
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=offered,
                tokenize=False,
                add_generation_prompt=True,
            )
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        prompt = body.prompt_value()
        if isinstance(prompt, list):
            return list(prompt)
        return list(self.tokenizer.encode(prompt))

    def _wrong_endpoint(self, request: EngineRequest) -> Reply | None:
        if self.embeds == (request.url == EMBEDDINGS_URL):
            return None
        serves = EMBEDDINGS_URL if self.embeds else "chat, completions and responses"
        return Reply.error(
            400,
            "unsupported_endpoint",
            f"line {request.line_no}: url: {self.model_name} serves {serves}, not {request.url}",
        )

    def _prepare(self, request: EngineRequest) -> tuple[list[int], Any] | Reply:
        """Token ids and SamplingParams, or the reply that says why this request cannot run."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        body = self.generate_body(request)
        field = "body.prompt" if isinstance(body, CompletionBody) else "body.messages"
        if isinstance(request.body, ResponsesBody):
            field = "body.input"
        if isinstance(body, ChatCompletionBody) and (why := tools.unsupported(body)):
            return Reply.error(400, "unsupported_tool_choice", f"line {request.line_no}: {why}")
        try:
            ids = self.prompt_ids(body)  # a responses line's chat body, built once here
        except Exception as exc:  # a chat template can refuse a conversation (e.g. roles)
            return Reply.error(400, "invalid_request", f"line {request.line_no}: {field}: {exc}")
        room = self.max_model_len - len(ids)
        if room <= 0:
            return Reply.error(
                400,
                "context_length_exceeded",
                f"line {request.line_no}: {field}: the prompt is {len(ids)} tokens; "
                f"the model's context is {self.max_model_len} tokens",
            )
        limit = body.token_limit()
        kwargs = sampling_kwargs(body, min(limit, room) if limit else room)
        structured = structured_outputs(body)
        try:
            if structured is not None:
                kwargs["structured_outputs"] = StructuredOutputsParams(**structured)
            params = SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            return Reply.error(400, "invalid_request", f"line {request.line_no}: body: {exc}")
        return ids, params

    def _embedding_inputs(self, request: EngineRequest) -> list[list[int]] | Reply:
        """Token ids of each input of an embeddings line, or the reply saying why it cannot run."""
        body = request.body
        assert isinstance(body, EmbeddingBody)
        if body.dimensions is not None and not self.matryoshka:
            return Reply.error(
                400,
                "invalid_request",
                f"line {request.line_no}: body.dimensions: {self.model_name} cannot shorten its "
                "embeddings (not a Matryoshka model); leave dimensions out",
            )
        inputs = [
            list(item) if isinstance(item, list) else list(self.tokenizer.encode(item))
            for item in body.inputs()
        ]
        for k, ids in enumerate(inputs):
            if len(ids) > self.max_model_len:
                return Reply.error(
                    400,
                    "context_length_exceeded",
                    f"line {request.line_no}: body.input: input {k} is {len(ids)} tokens; "
                    f"the model's context is {self.max_model_len} tokens",
                )
        return inputs

    # -- inference -------------------------------------------------------------------------

    def infer(
        self, requests: Sequence[EngineRequest], overlap: Overlap | None = None
    ) -> list[Reply]:
        """The chunk's requests into the one engine, with the chunk's priority: chunks of
        several threads run in it together (vllm_steps.py). An embeddings chunk is one `embed`
        call, one at a time."""
        replies: list[Reply | None] = [None] * len(requests)
        runnable: list[tuple[int, list[int], Any]] = []
        embeddable: list[tuple[int, list[list[int]]]] = []
        for i, request in enumerate(requests):
            wrong = self._wrong_endpoint(request)
            if wrong is not None:
                replies[i] = wrong
                continue
            prepared = self._embedding_inputs(request) if self.embeds else self._prepare(request)
            if isinstance(prepared, Reply):
                replies[i] = prepared
            elif self.embeds:
                assert isinstance(prepared, list)
                embeddable.append((i, prepared))
            else:
                assert isinstance(prepared, tuple)
                runnable.append((i, *prepared))
        self._generate(requests, runnable, replies, overlap)
        with self._lock:
            self._embed(requests, embeddable, replies)
        if overlap is not None:
            overlap.room.set()  # nothing of it waits any more
        missing = [requests[i].line_no for i, r in enumerate(replies) if r is None]
        if missing:  # vLLM returned fewer outputs than prompts: an engine fault, retry the chunk
            raise RuntimeError(f"vLLM returned no output for lines {missing[:5]}")
        return [r for r in replies if r is not None]

    def _embed(
        self,
        requests: Sequence[EngineRequest],
        embeddable: list[tuple[int, list[list[int]]]],
        replies: list[Reply | None],
    ) -> None:
        """One `embed` call for every input of every line; each line's vectors back in order."""
        if not embeddable:
            return
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        for i, inputs in embeddable:
            body = requests[i].body
            assert isinstance(body, EmbeddingBody)
            for ids in inputs:
                prompts.append(TokensPrompt(prompt_token_ids=ids))
                params.append(PoolingParams(dimensions=body.dimensions))
        started = time.perf_counter()
        outputs = iter(self.llm.embed(prompts, pooling_params=params, use_tqdm=False))
        latency_ms = (time.perf_counter() - started) * 1000
        share = latency_ms / 1000 / len(embeddable)  # the engine was this call's alone
        for i, inputs in embeddable:
            body = requests[i].body
            assert isinstance(body, EmbeddingBody)
            vectors = [next(outputs).outputs.embedding for _ in inputs]
            tokens = sum(len(ids) for ids in inputs)
            answer = embeddings_body(self.model_name, vectors, body.encoding_format, tokens)
            replies[i] = Reply(
                ok=True,
                body=orjson.dumps(answer).decode(),
                prompt_tokens=tokens,
                latency_ms=latency_ms,
                finished_at=time.time(),
                engine_seconds=share,
            )

    def _generate(
        self,
        requests: Sequence[EngineRequest],
        runnable: list[tuple[int, list[int], Any]],
        replies: list[Reply | None],
        overlap: Overlap | None,
    ) -> None:
        if not runnable:
            return
        started = time.time()
        priority = requests[runnable[0][0]].priority  # a chunk is of one batch
        outcomes, seconds = self.steps.run(
            [(ids, params) for _, ids, params in runnable], overlap, priority
        )
        share = seconds / len(runnable)
        for (i, ids, _), outcome in zip(runnable, outcomes, strict=True):
            if isinstance(outcome, Exception):  # vLLM refused this one request
                replies[i] = Reply.error(
                    400, "invalid_request", f"line {requests[i].line_no}: body: {outcome}"
                )
            else:
                output, finished_at = outcome
                sampled = self.generate_body(requests[i])
                replies[i] = reply(
                    requests[i], sampled, ids, output, (started, finished_at), self._naming
                )
            replies[i].engine_seconds = share  # type: ignore[union-attr]


local_engine: PerProcess[VLLMSettings, LocalVLLM] = PerProcess(LocalVLLM)
"""The in-process engine for these settings (started on the first chunk)."""


class _BackgroundStart:
    """vLLM and transformers imported in a daemon thread (`start`), and the engine built there
    too when asked, with a wait for the import that costs nothing when none was started. The
    engine waits before its own imports: a package that thread is still importing is
    half-initialized to any other thread (transformers' lazy module then refuses
    `AutoTokenizer`)."""

    def __init__(self) -> None:
        self._imported = threading.Event()
        self._started = False

    def start(self, settings: VLLMSettings | None) -> None:
        def load() -> None:
            try:
                import transformers  # noqa: F401
                import vllm  # noqa: F401
            finally:
                self._imported.set()
            if settings is not None:
                try:
                    local_engine(settings)  # the flow's first chunk finds it made (or waits)
                except Exception as exc:  # the flow builds it again and fails with the reason
                    log.warning("the engine did not start ahead of the flow: %s", exc)

        self._started = True
        threading.Thread(target=load, name="start-vllm", daemon=True).start()

    def wait(self) -> None:
        if self._started:
            self._imported.wait()


_background_start = _BackgroundStart()


def start_in_background(settings: VLLMSettings | None = None) -> None:
    """Start importing vLLM now, and with `settings` building that engine too. A one-shot run
    spends its first 10-20 s waiting for Prefect's temporary server — a process of its own,
    on the other core — then ~14 s importing vLLM and ~20 s starting the engine: begun before
    the flow, both overlap the wait. The engine is built only when the caller knows which one
    the flow will want and that the batch is likely to need it: built for nothing (a rerun of a
    finished batch, a file whose every line is refused), it costs that process ~20 s and the
    engine's memory, never a wrong answer — the flow asks `local_engine` for its settings, and
    other settings get an engine of their own."""
    _background_start.start(settings)
