"""A batch's run parameters are defined once (BatchRun); the flow's signature, which Prefect
turns into the deployment's form and `--param` names, must not drift from it."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

from prefect.utilities.callables import parameter_schema

from offline_queue.engines import env
from offline_queue.flows.batch import batch_inference
from offline_queue.runs import BatchRun, one_line

REPO = Path(__file__).resolve().parents[1]


def test_flow_parameters_are_the_run_model_fields() -> None:
    signature = inspect.signature(batch_inference.fn, eval_str=True)
    fields = BatchRun.model_fields
    assert list(signature.parameters) == list(fields)
    for name, parameter in signature.parameters.items():
        field = fields[name]
        assert parameter.annotation == field.annotation, name
        expected = inspect.Parameter.empty if field.is_required() else field.default
        assert parameter.default == expected, name


def test_flow_form_shows_the_field_descriptions() -> None:
    properties = parameter_schema(batch_inference).properties
    for name, field in BatchRun.model_fields.items():
        assert field.description
        assert properties[name]["description"] == one_line(field.description), name


def test_parameters_leave_out_what_was_not_chosen() -> None:
    """A deployment run gets only what the caller chose: the deployment's own engine and chunk
    size (prefect.yaml) stay in force for the rest."""
    run = BatchRun(input="/x.jsonl", tenant=None, chunk_size=64)
    assert run.parameters() == {"input": "/x.jsonl", "chunk_size": 64}
    local = run.model_copy(update={"engine": "vllm/cpu-local", "model": None})
    assert local.parameters() == {"input": "/x.jsonl", "chunk_size": 64, "engine": "vllm/cpu-local"}


def test_loading_the_deployment_entrypoint_sets_the_engine_env_first() -> None:
    """Prefect loads `flows/batch.py:batch_inference` as a script (no package __init__ runs):
    the engine's environment must be set by then, and nothing may have imported torch, vLLM or
    transformers before it."""
    names = [*env._ALWAYS, *(env._CPU if env.vllm_on_cpu() else {})]
    child_env = {k: v for k, v in os.environ.items() if k not in names}
    code = (
        "import os, sys\n"
        "from prefect.flows import load_flow_from_entrypoint\n"
        "load_flow_from_entrypoint('flows/batch.py:batch_inference', use_placeholder_flow=False)\n"
        "heavy = [m for m in ('torch', 'vllm', 'transformers', 'huggingface_hub') "
        "if m in sys.modules]\n"
        f"missing = [k for k in {names!r} if k not in os.environ]\n"
        "print(heavy, missing)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[] []"
