"""Real services for the suite: a PostgreSQL server started here, a Prefect server, and the
real vLLM engine on CPU with the bundled model (one per test session)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# Before anything imports Prefect: a private Prefect home, no analytics, room for a slow start.
_PREFECT_HOME = tempfile.mkdtemp(prefix="oq-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.pop("OFFLINE_QUEUE_DB", None)
# The store a command finds by default (the user's data directory) is the session's own: no
# test writes to the user's, and two sessions (or pytest-xdist's workers) never share one.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="oq-data-")
# The suite runs several engines at once (this process's, the session's vllm serve, the nodes'):
# one OpenMP thread each, or their spinning threads fight over the two cores (docs/engines.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Batches run in this process are served by a loop of its own, as `offline-queue run` does
# (offline_queue/flows/waiting.py); a node's `worker start` drops it for what it starts.
os.environ["OFFLINE_QUEUE_SERVE_HERE"] = "1"

from offline_queue.engines.env import apply_engine_env  # noqa: E402

apply_engine_env()

from instruments.loopback import free_port, healthy  # noqa: E402
from instruments.nodes import Cluster, namespaces_refused  # noqa: E402
from instruments.postgres import Postgres, create_database, postgres  # noqa: E402
from instruments.prefect_server import prefect_server  # noqa: E402
from instruments.processes import BIN, serving  # noqa: E402

if TYPE_CHECKING:
    from offline_queue.engines.vllm_local import LocalVLLM

REPO = Path(__file__).resolve().parents[1]

VLLM_FIXTURES = frozenset({"engine", "vllm_server", "embedding_server", "model_dir"})
"""The fixtures that start a vLLM engine or prepare the model for one: a test that takes any of
them is marked `vllm`. A test that reaches vLLM otherwise (a batch run end to end, a worker
process, `import vllm`) carries the mark itself."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `vllm` each test whose fixtures include an engine's (`make test-fast` skips them),
    then put the modules with `slow` tests first and those with `vllm` ones next, each keeping
    its own order: `make test` hands whole modules to two workers (pytest-xdist, `--dist
    loadfile`) in this order, and a long module taken last would leave one worker idle."""
    for item in items:
        if VLLM_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.vllm)
    weight: dict[Path, int] = {}
    for item in items:
        rank = 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("vllm") else 2
        weight[item.path] = min(weight.get(item.path, 2), rank)
    items.sort(key=lambda item: weight[item.path])


@pytest.fixture(scope="session", autouse=True)
def no_thread_outlives_the_session() -> Iterator[None]:
    """No thread may outlive the session's tests and services: one left running (a loop, a
    dispatcher, a pool's worker waiting on a server the session stopped) fails the run here,
    with its name and where it stands, rather than being cut off unseen. Set up first, so torn
    down last, after every other fixture; in each pytest-xdist worker too."""
    yield
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _stuck():
        time.sleep(0.2)
    stuck = _stuck()
    if not stuck:
        return
    frames = sys._current_frames()
    lines = ["threads left running at the end of the session:"]
    for t in stuck:
        lines.append(f"--- {t.name}")
        frame = frames.get(t.ident or -1)
        if frame is not None:
            lines.append("".join(traceback.format_stack(frame)).rstrip())
    pytest.fail("\n".join(lines), pytrace=False)


def _stuck() -> list[threading.Thread]:
    main = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]


@pytest.fixture(scope="session")
def pg_instance() -> Iterator[Postgres | None]:
    """The PostgreSQL server this session starts on loopback (its Unix socket where simulated
    nodes reach it), or None when OFFLINE_QUEUE_TEST_PG names an external one."""
    if os.environ.get("OFFLINE_QUEUE_TEST_PG"):
        yield None
        return
    with postgres() as pg:
        yield pg


@pytest.fixture(scope="session")
def pg_server(pg_instance: Postgres | None) -> str:
    """The session's PostgreSQL server's base URL (no database)."""
    if pg_instance is None:
        return os.environ["OFFLINE_QUEUE_TEST_PG"].rstrip("/")
    return pg_instance.url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis server on loopback for the session (Debian's redis-server, which `make test`
    installs); without one the stream tests are skipped, unless OQ_REQUIRE_REDIS says not to."""
    from instruments.redis_server import redis_installed, redis_server

    if not redis_installed():
        if os.environ.get("OQ_REQUIRE_REDIS"):
            pytest.fail("redis-server is missing (apt-get install redis-server)")
        pytest.skip("no redis-server: the stream tests need one")
    with redis_server() as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A fresh database on the session's server for one test."""
    return create_database(pg_server, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture(params=["sqlite", "pg"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs on the embedded default and on PostgreSQL."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture(scope="module")
def nodes() -> Iterator[Cluster]:
    """Simulated machines (instruments/nodes.py) for one test module; skipped where this kernel
    or user cannot make namespaces."""
    refused = namespaces_refused()
    if refused:
        pytest.skip(f"this kernel or user cannot make namespaces: {refused}")
    with Cluster() as c:
        yield c


@pytest.fixture(scope="session")
def prefect_api(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Prefect server for the session (flows in this process and CLI subprocesses), on the
    session's PostgreSQL. On SQLite (Prefect's test harness) ten flow runs at once, as the API
    tests start them, held its database locked past its 60 s busy timeout: the server answered
    503 and a batch's run could not be created."""
    from prefect.context import refresh_global_settings_context

    home = tmp_path_factory.mktemp("prefect-home")
    database = create_database(pg_server, "prefect_session")
    with prefect_server(home, database_url=database, timeout=300) as env:
        url = env["PREFECT_API_URL"]
        os.environ["PREFECT_API_URL"] = url
        # Prefect's root settings were read at import: every thread of this process (the API's
        # server, its batch runs) must see the server too, not only this one's context.
        refresh_global_settings_context()
        yield url


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from offline_queue.model import prepare_bundled_model

    return prepare_bundled_model()


@pytest.fixture(scope="session")
def engine(model_dir: Path) -> LocalVLLM:
    """The real in-process vLLM engine, started once and shared by the session's tests."""
    from offline_queue.engines.vllm_local import VLLMSettings, local_engine

    return local_engine(VLLMSettings())


def cli_env(prefect_api: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PREFECT_API_URL=prefect_api, **extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "offline-queue"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture(scope="session")
def vllm_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`offline-queue engine serve` on loopback for the session; yields its /v1 URL. Stopping
    it with SIGTERM must end the server and its engine process within seconds."""
    # Tool calls on `vllm serve` need a parser for the model's syntax, even a named choice;
    # pythonic is one the bundled model's tokenizer passes (llama3_json and hermes want tokens
    # it lacks).
    tools = ("--enable-auto-tool-choice", "--tool-call-parser", "pythonic")
    with engine_serve(tmp_path_factory, "--served-model-name", "smollm2", *tools) as url:
        yield url


@pytest.fixture(scope="session")
def embedding_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bundled embedding model on `offline-queue engine serve`, for the session."""
    with engine_serve(
        tmp_path_factory, "--model", "all-MiniLM-L6-v2", "--served-model-name", "all-minilm-l6-v2"
    ) as url:
        yield url


@contextlib.contextmanager
def engine_serve(tmp_path_factory: pytest.TempPathFactory, *args: str) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    health = f"http://127.0.0.1:{port}/health"
    with serving(
        [str(BIN / "offline-queue"), "engine", "serve", "--port", str(port), *args],
        lambda: healthy(health),
        log_path,
        timeout=300,
        interval=1,
        grace=60,
        cwd=REPO,
    ) as proc:
        yield f"http://127.0.0.1:{port}/v1"
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert not healthy(health)
