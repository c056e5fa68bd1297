"""Batch files in object storage, through fsspec against a real S3 API server on loopback
(moto's server mode): a run from S3 to S3, a storage block's credentials, objects that appear
whole or not at all, validation that streams, and a clear error for a missing backend."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from instruments.loopback import free_port, healthy
from instruments.processes import BIN, serving
from offline_queue.storage import (
    OPTIONS_VAR,
    RemoteFile,
    StorageUnavailable,
    locate,
)
from offline_queue.validate import FileRefused, Limits, inspect_file, validate_file
from tests.conftest import cli_env, run_cli
from tests.test_stored_files import request_line

BUCKET = "batches"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 API server on loopback, with credentials and the endpoint in the environment
    (as a user sets them), for this process and the CLI processes it starts. In a process of
    its own: its Flask app in this one leaves proxies in sys.modules that vLLM's kernel
    registration trips over when a later test builds the in-process engine."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    settings = {
        OPTIONS_VAR: json.dumps({"s3": {"endpoint_url": endpoint}}),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NO_PROXY": "127.0.0.1",
    }
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with (
        serving(command, lambda: healthy(f"{endpoint}/moto-api/data.json"), log, timeout=60),
        pytest.MonkeyPatch.context() as env,
    ):
        for key, value in settings.items():
            env.setenv(key, value)
        s3fs().mkdir(BUCKET)
        yield endpoint


def s3fs() -> Any:
    import s3fs as s3fs_module

    options = json.loads(os.environ[OPTIONS_VAR])["s3"]
    return s3fs_module.S3FileSystem(**options, skip_instance_cache=True)


@pytest.mark.usefixtures("model_dir")
def test_a_batch_runs_from_s3_to_s3_through_the_cli(
    s3_endpoint: str, tmp_path: Path, prefect_api: str
) -> None:
    s3 = s3fs()
    lines = [request_line(i, bad=i == 2) for i in range(5)]
    s3.pipe(f"{BUCKET}/run/in.jsonl", b"".join(lines).rstrip(b"\n"))  # no final newline
    proc = run_cli(
        "run",
        f"s3://{BUCKET}/run/in.jsonl",
        "--output",
        f"s3://{BUCKET}/run/out.jsonl",
        "--errors",
        f"s3://{BUCKET}/run/err.jsonl",
        "--db",
        f"sqlite:///{tmp_path / 's.db'}",
        "--json",
        env=cli_env(prefect_api),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = json.loads(proc.stdout.strip().splitlines()[-1])
    assert batch["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    assert batch["output_file"] == f"s3://{BUCKET}/run/out.jsonl"
    outputs = [json.loads(x) for x in s3.cat(f"{BUCKET}/run/out.jsonl").splitlines()]
    errors = [json.loads(x) for x in s3.cat(f"{BUCKET}/run/err.jsonl").splitlines()]
    ids = Counter(x["custom_id"] for x in outputs + errors)
    assert ids == Counter(f"req-{i}" for i in range(5))  # every custom_id exactly once
    assert all(x["response"]["status_code"] == 200 for x in outputs)
    assert [x["custom_id"] for x in errors] == ["req-2"]
    assert "max_tokens" in errors[0]["error"]["message"]
    assert not list(tmp_path.glob("*.jsonl"))  # nothing was written to this disk


@pytest.mark.usefixtures("model_dir")
def test_a_storage_block_gives_a_run_its_credentials(
    s3_endpoint: str, tmp_path: Path, prefect_api: str
) -> None:
    """A run that names an offline-queue-storage block reads and writes s3:// with the block's
    credentials and endpoint: none of them is in the CLI's environment."""
    from pydantic import SecretStr

    from offline_queue.blocks.storage import ObjectStorage

    name = f"lake-{uuid.uuid4().hex[:8]}"
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    ObjectStorage(protocol="s3", options=SecretStr(json.dumps(options))).save(name)
    s3 = s3fs()
    s3.pipe(f"{BUCKET}/block/in.jsonl", b"".join(request_line(i) for i in range(2)))
    env = cli_env(prefect_api)
    for var in (OPTIONS_VAR, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(var, None)
    args = ["run", f"s3://{BUCKET}/block/in.jsonl", "--output", f"s3://{BUCKET}/block/out.jsonl"]
    args += ["--errors", f"s3://{BUCKET}/block/err.jsonl", "--db", f"sqlite:///{tmp_path / 's.db'}"]
    without = run_cli(*args, env=env)
    assert without.returncode != 0  # the environment alone does not reach this endpoint
    proc = run_cli(*args, "--storage", name, "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = [json.loads(x) for x in s3.cat(f"{BUCKET}/block/out.jsonl").splitlines()]
    assert sorted(x["custom_id"] for x in outputs) == ["req-0", "req-1"]


def test_an_object_appears_whole_or_not_at_all(s3_endpoint: str) -> None:
    s3 = s3fs()
    url = f"s3://{BUCKET}/whole/out.jsonl"
    block = b"x" * (1 << 20)
    with pytest.raises(RuntimeError), locate(url).writing() as out:
        for _ in range(10):  # past one 8 MiB part: a multipart upload is under way
            out.write(block)
        raise RuntimeError("the writer fails")
    assert not s3.exists(f"{BUCKET}/whole/out.jsonl")
    assert not s3.list_multipart_uploads(BUCKET)  # aborted, not left to linger

    with locate(url).writing() as out:
        for _ in range(10):
            out.write(block)
    assert s3.size(f"{BUCKET}/whole/out.jsonl") == 10 << 20


def test_validation_reads_object_storage_as_a_stream(s3_endpoint: str, tmp_path: Path) -> None:
    data = b"".join(request_line(i) for i in range(3)) + b"\r\n" + request_line(3).rstrip(b"\n")
    s3fs().pipe(f"{BUCKET}/v/in.jsonl", data)
    local = tmp_path / "in.jsonl"
    local.write_bytes(data)
    remote = inspect_file(f"s3://{BUCKET}/v/in.jsonl", Limits())
    assert remote == inspect_file(local, Limits())
    assert [x.custom_id for x in validate_file(f"s3://{BUCKET}/v/in.jsonl", Limits())] == [
        f"req-{i}" for i in range(4)
    ]
    limits = Limits(max_line_bytes=100)  # over-long lines are cut at the limit, as locally
    assert list(validate_file(f"s3://{BUCKET}/v/in.jsonl", limits)) == list(
        validate_file(local, limits)
    )
    with pytest.raises(FileRefused, match="no such file"):
        inspect_file(f"s3://{BUCKET}/v/missing.jsonl", Limits())


def test_a_missing_implementation_names_the_package_to_install() -> None:
    for url, hint in (
        ("gs://bucket/in.jsonl", "install offline-queue[gcs] (gcsfs)"),
        ("az://container/in.jsonl", "install offline-queue[azure] (adlfs)"),
    ):
        with pytest.raises(StorageUnavailable, match=re.escape(f"{url}: {hint}")):
            RemoteFile(url)
    with pytest.raises(StorageUnavailable, match="nosuch"):
        locate("nosuch://x/y")
