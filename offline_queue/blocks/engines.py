"""Engine blocks. A flow takes a block name, so an operator can move a batch to another model
or node in the UI without a redeploy."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr

from offline_queue.engines.openai_http import HttpEngine, ServerSettings, http_engine
from offline_queue.engines.vllm_local import LocalVLLM, VLLMSettings, local_engine
from offline_queue.routes import in_process_route


class VLLM(Block):
    """vLLM in a node's serving loop: the engine is loaded once for the loop's life and
    serves every batch routed to its model (offline_queue/loop.py)."""

    _block_type_name = "vLLM in process"
    _block_type_slug = "vllm"
    _description = "vLLM's LLM engine inside a node's serving loop (GPU, or CPU build)."

    model_config = ConfigDict(use_attribute_docstrings=True)

    model: str | None = None
    """Hugging Face model folder, or a model id in the node's Hugging Face cache. Empty: the
    bundled SmolLM2-135M-Instruct (a CPU demo model, converted once and cached) — on the CPU
    build only; a GPU engine refuses to start without a model."""
    served_model_name: str | None = None
    """The `model` written in responses. Empty: the folder's name."""
    dtype: str = "auto"
    """Weights dtype. `auto` is float32 on CPU (no bf16 in hardware there: bf16 is ~3x slower) and
    the model's own dtype on a GPU."""
    max_model_len: int | None = None
    """Context length. Longer contexts admit longer prompts but fewer concurrent sequences in the
    same KV cache. Empty: the model's own (2048 on CPU)."""
    tensor_parallel_size: int = 1
    """GPUs one engine spans. More fits bigger models, not more speed for small ones."""
    gpu_memory_utilization: float = 0.9
    """Share of GPU memory vLLM may take (weights + KV cache). Lower it when another process shares
    the GPU."""
    kv_cache_memory_bytes: int | None = None
    """Fixed KV cache size. Required on CPU (default 512 MiB there; without it vLLM wants 92% of
    RAM); on a GPU, empty lets gpu_memory_utilization decide."""
    enforce_eager: bool = False
    """Skip CUDA graph capture: faster start, slower decoding. Always on for CPU."""
    max_num_seqs: int | None = None
    """Most sequences decoded at once. Empty: vLLM's default."""
    seed: int = 0
    """Engine seed (requests may set their own)."""
    runner: str = "auto"
    """`generate` (chat, completions, responses) or `pooling` (embeddings). `auto`: what the
    model's architecture is (an embedding model pools)."""

    def settings(self) -> VLLMSettings:
        fields = VLLMSettings.__dataclass_fields__
        return VLLMSettings(**{k: getattr(self, k) for k in fields})

    def engine(self) -> LocalVLLM:
        return local_engine(self.settings())


class OpenAIServer(Block):
    """An OpenAI-compatible server — first of all `vllm serve` on a GPU node — over HTTP.

    A node's serving loop sends it the chunks of every batch on its route under one in-flight
    limit; a free slot goes to the most urgent request, which carries its tier as `priority`."""

    _block_type_name = "OpenAI-compatible server"
    _block_type_slug = "openai-server"
    _description = "An OpenAI-compatible inference server (vllm serve) reached over HTTP."

    model_config = ConfigDict(use_attribute_docstrings=True)

    base_url: str
    """Up to and including /v1, e.g. http://gpu-1:8000/v1."""
    api_key: SecretStr | None = None
    """Bearer token, if the server wants one."""
    model: str | None = None
    """Served model name sent with every request. Empty: the first the server lists."""
    max_in_flight: int = Field(default=1024, ge=1)
    """The most requests outstanding at the server from one node's process (its loops share it);
    the adaptive window finds the server's knee under it. Past the server's max_num_seqs
    requests wait in its priority queue."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds to wait for one answer before it is retried. Empty: 2 minutes plus a quarter second
    per max_tokens (15 minutes without max_tokens)."""
    max_attempts: int = Field(default=4, ge=1)
    """Tries per request within a chunk for retriable errors (timeouts, resets, 429, 5xx), with
    exponential backoff and jitter (Retry-After honoured)."""
    outage_seconds: float = Field(default=300.0, ge=0)
    """How long requests wait for a server that refuses connections (a restart) before they count
    as failed attempts."""

    def settings(self) -> ServerSettings:
        return ServerSettings(
            base_url=self.base_url,
            api_key=self.api_key.get_secret_value() if self.api_key else None,
            model=self.model,
            max_in_flight=self.max_in_flight,
            timeout=self.timeout,
            max_attempts=self.max_attempts,
            outage_seconds=self.outage_seconds,
        )

    def engine(self) -> HttpEngine:
        return http_engine(self.settings())


EngineBlock = VLLM | OpenAIServer


def load_engine_block(name: str | None, model: str | None = None) -> EngineBlock:
    """The engine a flow run uses: a URL (an OpenAI-compatible server), a saved block by name
    (`vllm/a100`, `openai-server/node-1`, or a bare VLLM block name), else vLLM in process with
    `model` (or the bundled model)."""
    if not name:
        return VLLM(model=model)
    if name.startswith(("http://", "https://")):
        return OpenAIServer(base_url=name, model=model)
    slug, _, block_name = name.rpartition("/")
    block: Any = Block.load(name) if slug else VLLM.load(block_name)
    if model:
        block = block.model_copy(update={"model": model})
    return block


def route_of(engine: str | None, model: str | None = None) -> str:
    """The route a batch on this engine waits on, and that a loop on it serves: the same for
    every way of naming one engine. A VLLM block is vLLM in process on its model
    (`vllm:MODEL`, as a catalog entry without an engine); a server block keeps its name (its
    nodes' loopback URLs differ); a URL is itself (with `#model` when one is asked for)."""
    if engine and not engine.startswith(("http://", "https://")):
        block = load_engine_block(engine, model)
        if isinstance(block, VLLM):
            return in_process_route(block.model)
        return engine
    if engine:
        return f"{engine}#{model}" if model else engine
    return in_process_route(model)
