"""The TCP↔Unix-socket bridge (instruments.bridge) on the host: a unix-to-tcp in front of a
server and a tcp-to-unix in front of that, as a node and the host use them. Bytes arrive
intact in both directions at once, a half-close passes through, many connections run side by
side, and a bridge whose parent dies goes with it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from instruments.bridge import loopback
from instruments.loopback import free_port
from instruments.processes import wait_for
from tests.conftest import REPO


def bridge_command(mode: str, listen: str, connect: str) -> list[str]:
    return [sys.executable, "-m", "instruments.bridge", mode, listen, connect]


@contextlib.contextmanager
def bridge(mode: str, listen: str, connect: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(bridge_command(mode, listen, connect), cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        yield proc
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        assert proc.stdout is not None
        proc.stdout.close()


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """Echoes each chunk as it arrives; at the client's end of file, sends b"END" and closes
    (so a lost half-close shows as a hang, and a half-duplex pipe as a deadlock)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.sendall(b"END")

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@pytest.fixture
def bridged(tmp_path: Path) -> Iterator[int]:
    """The echo server behind a bridge pair; yields the port the client connects to."""
    sock = tmp_path / "echo.sock"
    front = free_port()
    with (
        echo_server() as port,
        bridge("unix-to-tcp", str(sock), f"127.0.0.1:{port}"),
        bridge("tcp-to-unix", f"127.0.0.1:{front}", str(sock)),
    ):
        yield front


def round_trip(port: int, payload: bytes) -> bytes:
    """Send `payload` while reading the echo, then half-close and read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:

        def send() -> None:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        received = bytearray()
        while data := conn.recv(65536):
            received += data
        sender.join()
        return bytes(received)


def test_full_duplex_with_half_close(bridged: int) -> None:
    payload = os.urandom(8 * 1024 * 1024)  # far more than any socket buffer: both ways at once
    assert round_trip(bridged, payload) == payload + b"END"


def test_many_connections_side_by_side(bridged: int) -> None:
    payloads = [os.urandom(64 * 1024 + i) for i in range(64)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda p: round_trip(bridged, p), payloads))
    assert answers == [p + b"END" for p in payloads]


def test_upstream_down_is_a_reset_not_a_hang(tmp_path: Path) -> None:
    front = free_port()
    with (
        bridge("tcp-to-unix", f"127.0.0.1:{front}", str(tmp_path / "nobody.sock")),
        # On loopback the reset may already be there when connect() returns.
        pytest.raises(ConnectionResetError),
        socket.create_connection(("127.0.0.1", front), timeout=10) as conn,
    ):
        conn.recv(1)


def test_a_bridge_ends_with_its_parent(tmp_path: Path) -> None:
    parent_code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen({bridge_command('unix-to-tcp', str(tmp_path / 's.sock'), '1')!r})\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=REPO, stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == b"ready"  # the bridge's, on the same pipe
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    parent.stdout.close()

    def gone() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    wait_for(gone, timeout=10)
    assert not (tmp_path / "s.sock").exists()


def test_only_loopback() -> None:
    assert loopback("8000") == ("127.0.0.1", 8000)
    assert loopback("127.0.0.2:8000") == ("127.0.0.2", 8000)
    with pytest.raises(ValueError, match="not a loopback address"):
        loopback("10.0.0.1:8000")
