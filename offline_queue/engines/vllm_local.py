"""vLLM in this process: the highest-throughput engine, loaded once per process and settings.

Prompts are rendered and tokenized here (chat template, then token ids) so that a prompt too
long for the context is a per-request error with the line named, not a fault of the whole
chunk, and `max_tokens` is clamped to what the context leaves, as `vllm serve` does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from offline_queue.engines.base import EngineRequest, PerProcess, Reply, Share
from offline_queue.engines.env import apply_engine_env, is_cpu_build
from offline_queue.engines.responses import Choice, TokenLogprob, response_body
from offline_queue.engines.sampling import logprobs_count, sampling_kwargs, structured_outputs
from offline_queue.formats import ChatCompletionBody, CompletionBody
from offline_queue.model import model_version, resolve_model

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

    def llm_kwargs(self, on_cpu: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enforce_eager": self.enforce_eager,
            "seed": self.seed,
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
            kwargs.setdefault("max_model_len", CPU_MAX_MODEL_LEN)
            kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
            if self.dtype == "auto":
                kwargs["dtype"] = "float32"
        else:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        return kwargs


class LocalVLLM:
    """A `vllm.LLM` in this process. Not re-entrant: one chunk at a time (the lock)."""

    shared = False

    def __init__(self, settings: VLLMSettings):
        _background_import.wait()  # a module half-imported by that thread is not importable yet
        from transformers import AutoTokenizer
        from vllm import LLM

        self.settings = settings
        self.model_dir = resolve_model(settings.model)
        self.model_version = model_version(self.model_dir)
        self.model_name = settings.served_model_name or self.model_dir.name
        self.llm = LLM(model=str(self.model_dir), **settings.llm_kwargs(is_cpu_build()))
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self._lock = threading.Lock()
        self.engine_key = f"local:{self.model_dir}"
        self.capacity = 1

    # -- prompts ---------------------------------------------------------------------------

    def prompt_ids(self, request: EngineRequest) -> list[int]:
        body = request.body
        if isinstance(body, ChatCompletionBody):
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages
            ]
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        assert isinstance(body, CompletionBody)
        prompt = body.prompt_value()
        if isinstance(prompt, list):
            return list(prompt)
        return list(self.tokenizer.encode(prompt))

    def _prepare(self, request: EngineRequest) -> tuple[list[int], Any] | Reply:
        """Token ids and SamplingParams, or the reply that says why this request cannot run."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        field = "body.messages" if isinstance(request.body, ChatCompletionBody) else "body.prompt"
        try:
            ids = self.prompt_ids(request)
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
        limit = request.body.token_limit()
        kwargs = sampling_kwargs(request.body, min(limit, room) if limit else room)
        structured = structured_outputs(request.body)
        try:
            if structured is not None:
                kwargs["structured_outputs"] = StructuredOutputsParams(**structured)
            params = SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            return Reply.error(400, "invalid_request", f"line {request.line_no}: body: {exc}")
        return ids, params

    # -- inference -------------------------------------------------------------------------

    def infer(self, requests: Sequence[EngineRequest], share: Share | None = None) -> list[Reply]:
        """The whole chunk in one `generate` call: vLLM schedules it best. (`share` is for
        engines that several batches use at once; this one serves one batch at a time.)"""
        replies: list[Reply | None] = [None] * len(requests)
        runnable: list[tuple[int, list[int], Any]] = []
        for i, request in enumerate(requests):
            prepared = self._prepare(request)
            if isinstance(prepared, Reply):
                replies[i] = prepared
            else:
                runnable.append((i, *prepared))
        with self._lock:
            self._generate(requests, runnable, replies)
        missing = [requests[i].line_no for i, r in enumerate(replies) if r is None]
        if missing:  # vLLM returned fewer outputs than prompts: an engine fault, retry the chunk
            raise RuntimeError(f"vLLM returned no output for lines {missing[:5]}")
        return [r for r in replies if r is not None]

    def _generate(
        self,
        requests: Sequence[EngineRequest],
        runnable: list[tuple[int, list[int], Any]],
        replies: list[Reply | None],
    ) -> None:
        if not runnable:
            return
        from vllm.inputs import TokensPrompt

        started = time.perf_counter()
        try:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for _, ids, _ in runnable],
                [params for _, _, params in runnable],
                use_tqdm=False,
            )
        except (ValueError, TypeError) as exc:
            if len(runnable) > 1:  # one bad request: run them one by one to find it
                for item in runnable:
                    self._generate(requests, [item], replies)
                return
            i = runnable[0][0]
            replies[i] = Reply.error(
                400, "invalid_request", f"line {requests[i].line_no}: body: {exc}"
            )
            return
        latency_ms = (time.perf_counter() - started) * 1000
        for (i, ids, _), output in zip(runnable, outputs, strict=True):
            replies[i] = self._reply(requests[i], ids, output, latency_ms)

    def _reply(
        self, request: EngineRequest, ids: list[int], output: Any, latency_ms: float
    ) -> Reply:
        want_logprobs = logprobs_count(request.body)
        choices = []
        completion_tokens = 0
        for completion in output.outputs:
            completion_tokens += len(completion.token_ids)
            choices.append(
                Choice(
                    text=completion.text,
                    finish_reason=completion.finish_reason or "stop",
                    logprobs=self._logprobs(completion, want_logprobs)
                    if want_logprobs is not None
                    else None,
                )
            )
        body = response_body(request.url, self.model_name, choices, len(ids), completion_tokens)
        return Reply(
            ok=True,
            body=orjson.dumps(body).decode(),
            prompt_tokens=len(ids),
            completion_tokens=completion_tokens,
            latency_ms=latency_ms,
            finished_at=time.time(),
        )

    def _logprobs(self, completion: Any, top: int) -> list[TokenLogprob]:
        tokens = []
        for token_id, candidates in zip(
            completion.token_ids, completion.logprobs or [], strict=False
        ):
            chosen = candidates.get(token_id)
            ranked = sorted(candidates.items(), key=lambda kv: kv[1].rank)[:top]
            tokens.append(
                TokenLogprob(
                    token=self._decoded(token_id, chosen),
                    logprob=chosen.logprob if chosen is not None else float("-inf"),
                    top=[(self._decoded(tid, lp), lp.logprob) for tid, lp in ranked],
                )
            )
        return tokens

    def _decoded(self, token_id: int, logprob: Any) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return str(logprob.decoded_token)
        return str(self.tokenizer.decode([token_id]))


local_engine: PerProcess[VLLMSettings, LocalVLLM] = PerProcess(LocalVLLM)
"""The in-process engine for these settings (started on the first chunk)."""


class _BackgroundImport:
    """vLLM and transformers imported in a daemon thread (`start`), and a wait for it that
    costs nothing when none was started. The engine waits before its own imports: a package
    that thread is still importing is half-initialized to any other thread (transformers'
    lazy module then refuses `AutoTokenizer`)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        def load() -> None:
            import transformers  # noqa: F401
            import vllm  # noqa: F401

        self._thread = threading.Thread(target=load, name="import-vllm", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()


_background_import = _BackgroundImport()


def import_in_background() -> None:
    """Start importing vLLM now. A one-shot run spends its first 10-20 s waiting for
    Prefect's temporary server — a process of its own, on the other core — and then ~14 s
    importing vLLM before the engine can start: begun before the flow, the import overlaps
    the wait. Only the import: a batch with nothing to infer (every line rejected, or resumed
    after its last result) still never builds an engine."""
    _background_import.start()
