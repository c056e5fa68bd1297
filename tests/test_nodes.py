"""Simulated nodes (instruments.nodes): a node's files are its own, its installed software is
the host's (read-only), a node with its own network namespace reaches the session's PostgreSQL,
the session's Prefect server and an HTTP server on the host only through Unix sockets, two
nodes bind the same 127.0.0.1 port, and a node's process handles are the real processes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName

from instruments.loopback import free_port
from instruments.nodes import REPO, Cluster, Node, namespaces_refused
from instruments.postgres import Postgres
from instruments.processes import wait_for

PYTHON = sys.executable

CONNECT = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
    print("connected")
except ConnectionRefusedError:
    print("refused")
"""

LISTEN = """
import socket, sys
s = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[int]:
    """A plain HTTP server on the host's 127.0.0.1 serving `directory`; yields its port."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def out(node: Node, *cmd: str) -> str:
    done = node.run(list(cmd), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_node_reads_no_file_another_node_or_the_host_wrote(nodes: Cluster) -> None:
    a, b = nodes.node("files-a"), nodes.node("files-b")
    tag = uuid.uuid4().hex
    places = [f"/tmp/{tag}", f"/var/tmp/{tag}", f"/dev/shm/{tag}", f"{a.home}/{tag}"]
    places.append(f"{a.home}/.cache/{tag}")  # an XDG default under HOME
    script = "; ".join(f"mkdir -p $(dirname {p}) && echo from-a > {p}" for p in places)
    out(a, "sh", "-c", script)
    for place in places:
        assert out(a, "cat", place) == "from-a"
        assert a.path(place).read_text() == "from-a\n"  # the host looks in through /proc
        assert not Path(place).exists(), f"{place} leaked to the host"
        assert b.run(["test", "-e", place]).returncode == 1, f"{place} leaked to node b"
    host_file = Path(f"/tmp/host-{tag}")
    host_file.write_text("from the host")
    try:
        assert a.run(["test", "-e", str(host_file)]).returncode == 1
    finally:
        host_file.unlink()
    # Each node is its own host name; default places in its environment are private ones.
    assert out(a, "hostname") == "files-a"
    cache = out(a, PYTHON, "-c", "import platformdirs; print(platformdirs.user_cache_dir())")
    assert cache.startswith(str(a.home))


def test_installed_software_is_visible_and_read_only(nodes: Cluster) -> None:
    node = nodes.node("installed")
    assert out(node, "cat", str(REPO / "pyproject.toml")).startswith("[")
    assert out(node, PYTHON, "-c", "import instruments.nodes; print('ok')") == "ok"
    denied = node.run(["touch", str(REPO / f"written-by-node-{uuid.uuid4().hex}")])
    assert denied.returncode != 0
    assert node.run(["touch", f"{sys.prefix}/written-by-node"]).returncode != 0


def test_own_loopback_reaches_the_host_only_through_the_bridge(
    nodes: Cluster, tmp_path: Path
) -> None:
    (tmp_path / "hello.txt").write_text("hello from the host")
    with http_server(tmp_path) as port:
        node = nodes.node("http", netns=True)
        # Its 127.0.0.1 is its own: nothing listens on the host's port there.
        assert out(node, PYTHON, "-c", CONNECT, str(port)) == "refused"
        node.forward(port, nodes.publish(port))
        get = f"import httpx; print(httpx.get('http://127.0.0.1:{port}/hello.txt').text)"
        assert out(node, PYTHON, "-c", get) == "hello from the host"


def test_own_loopback_reaches_postgres_through_its_socket(
    nodes: Cluster, pg_instance: Postgres | None
) -> None:
    if pg_instance is None:
        pytest.skip("an external PostgreSQL (OFFLINE_QUEUE_TEST_PG) has no socket directory here")
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg_instance.create_database(name)
    node = nodes.node("pg", netns=True)
    assert out(node, PYTHON, "-c", CONNECT, str(pg_instance.port)) == "refused"
    query = (
        "import sqlalchemy as sa, sys\n"
        "with sa.create_engine(sys.argv[1]).connect() as c:\n"
        "    print(c.execute(sa.text('SELECT 1')).scalar())\n"
    )
    assert out(node, PYTHON, "-c", query, pg_instance.socket_url(name)) == "1"


def test_a_flow_in_a_node_reports_to_the_sessions_prefect_server(
    nodes: Cluster, prefect_api: str
) -> None:
    """The Prefect server at the same URL as on the host, through the bridge pair."""
    port = urlsplit(prefect_api).port
    assert port is not None
    node = nodes.node("prefect", netns=True, reach=[port])
    tag = uuid.uuid4().hex[:8]
    code = f"from prefect import flow\n@flow(name='node-{tag}')\ndef f(): return 42\nprint(f())"
    done = node.run(
        [PYTHON, "-c", code],
        env=node.env(PREFECT_API_URL=prefect_api),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "42"

    async def runs() -> list[str]:
        async with get_client() as client:
            found = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[f"node-{tag}"]))
            )
            return [str(r.state_type.value) if r.state_type else "" for r in found]

    assert asyncio.run(runs()) == ["COMPLETED"]


def test_each_node_has_its_own_127_0_0_1_port(nodes: Cluster) -> None:
    port = free_port()
    listeners = []
    try:
        for name in ("port-a", "port-b"):
            node = nodes.node(name, netns=True)
            proc = node.popen(
                [PYTHON, "-c", LISTEN, str(port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            listeners.append(proc)
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "listening", f"{name} could not bind"
    finally:
        for proc in listeners:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


def test_kill_9_of_a_handle_ends_the_process_in_the_node(nodes: Cluster) -> None:
    node = nodes.node("kill", netns=True)
    proc = node.popen(["sleep", "300"])
    # The handle is the command itself (nsenter execs it), not a wrapper around it.
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    wait_for(lambda: cmdline.read_bytes().split(b"\0")[0] == b"sleep", timeout=10, interval=0.02)
    assert proc.pid in node.pids()
    proc.kill()
    assert proc.wait(10) == -9
    assert proc.pid not in node.pids()


def test_leaving_a_node_ends_its_processes_and_namespaces() -> None:
    refused = namespaces_refused()
    if refused:
        pytest.skip(f"this kernel or user cannot make namespaces: {refused}")
    with Node("leaving", netns=True) as node:
        # A daemon that left its session and its parent: still the node's, still ended.
        node.run(["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 < /dev/null &"], check=True)
        node.popen(["sleep", "300"])
        # nsenter joins the namespace a moment after it is started
        wait_for(lambda: len(node.pids()) == 2, timeout=10, interval=0.02)
        pids, holder, netns = node.pids(), node.holder_pid, node.netns
        assert len(pids) == 2
        assert netns is not None
    assert not any(Path(f"/proc/{p}").exists() and _alive(p) for p in [*pids, holder])
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert netns not in listed


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
