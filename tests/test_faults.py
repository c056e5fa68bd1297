"""A short fault schedule (bench/faults.py): the `offline-queue run` process, a serving loop, a
whole node (every process in its namespace), the vLLM server and PostgreSQL SIGKILLed mid-batch,
and faults injected by a proxy — nothing lost, nothing twice.

The driver starts its own PostgreSQL, Prefect server and `vllm serve`, so the session's shared
services are neither used nor disturbed. `make faults` runs the full schedule."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO


def _driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_faults", REPO / "bench" / "faults.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_faults"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two vLLM starts and the loops' take far longer on a busy machine
def test_short_fault_schedule_loses_nothing_and_does_nothing_twice(tmp_path: Path) -> None:
    from instruments.nodes import namespaces_refused

    faults = _driver()
    summary = faults.run_schedule(seed=11, trials_per_kind=1, requests=24, out=tmp_path)
    print(summary.table())
    print(summary.result_lines())
    kinds = {k for k in faults.KINDS if k != "node" or not namespaces_refused()}
    assert len(summary.trials) == len(kinds)
    assert {t.kind for t in summary.trials} == kinds
    for trial in summary.trials:
        assert trial.injected >= 1, f"{trial.kind}: the fault never landed ({trial})"
        assert trial.status == "completed", trial
    assert summary.lost == 0, summary.table()
    assert summary.duplicated == 0, summary.table()
    assert not summary.problems, summary.problems
