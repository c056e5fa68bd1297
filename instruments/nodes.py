"""Simulated cluster nodes on one machine: processes that share no disk with each other or the
host and, when asked, not even 127.0.0.1 — so a test or a benchmark finds out when something
only works because every "machine" is the same machine.

What a node shares, and what it keeps to itself:

- Private (an empty tmpfs of the node's own over each): /tmp, /var/tmp, /dev/shm and HOME —
  hence the XDG cache/config/data dirs, PREFECT_HOME and every default place a program writes.
  A file one node writes there is invisible to every other node and to the host (the host can
  still look in through `node.path()`, for a test's assertions).
- Installed software, visible read-only at its usual path: the repository checkout, the
  virtualenv and its base Python (and whatever else `installed=` names, e.g. a model folder
  under HOME). A node can run the code but not pass files to another node through it.
- Everything else of the file system as it is, in particular /run, where the shared services'
  sockets live (`shared_dir()`): PostgreSQL's socket directory and the bridges' sockets.
- The kernel: a node is a set of namespaces (mount and UTS — its own hostname — and optionally
  network), not a VM. Pids are the host's, so a node's process handle is a real process that
  `kill -9` ends.

With `netns=True` a node gets a network namespace of its own (`ip netns add`, loopback up and
nothing else: no veth, no route, no address but 127.0.0.1/::1), so several nodes can each run
an engine at their own 127.0.0.1:8000. They reach the shared services through Unix sockets only,
because a Unix socket is a file and crosses network namespaces where its directory is visible:
PostgreSQL natively (`Postgres.socket_url()`, libpq's `host=/socket/dir`), HTTP services (the
Prefect server, the offline-queue API) through a pair of `instruments.bridge` forwarders — on
the host, a Unix socket in front of 127.0.0.1:PORT (`Cluster.publish`); in the node, its own
127.0.0.1:PORT in front of that socket (`Node.forward`) — so the node uses the service's usual
URL. Every packet stays on a loopback.

Mechanics: a node is a holder process started under `unshare --mount --uts --propagation
private` (inside the netns when there is one) that mounts the tmpfs, binds the installed
software back in and then waits; every command joins its namespaces with `nsenter`, which
`exec`s the command, so the handle's pid is the command's. Leaving the node SIGTERMs, then
SIGKILLs, every process in its mount namespace (whatever it forked, setsid or not), ends the
holder — which unmounts everything with the namespace — and deletes the netns; losing it
(`lose()`, a fault schedule's lost machine) SIGKILLs them all first. The holder also ends by
itself when the process that made the node dies.

One module a little over 400 lines: a node and the cluster that bridges its services are one
mechanism (the cluster's bridges are the other half of a node's `forward`), and their
docstring above is most of the length.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from instruments.processes import stop

REPO = Path(__file__).resolve().parents[1]
INSTALLED: tuple[Path, ...] = (REPO, Path(sys.prefix), Path(sys.base_prefix))
"""What every node sees read-only, its installed software: the checkout, the virtualenv and the
Python it was made from (which may live under HOME, as a pyenv one does)."""
SHARED_ROOT = Path("/run")


def vllm_model_info_cache() -> tuple[Path, ...]:
    """vLLM's cache of what each model class supports (~/.cache/vllm/modelinfos), when this
    machine has one: for a node that runs an engine, installed read-only with the model, as on
    a machine that served before. Without it every node's first engine inspects the model class
    in a subprocess of its own (a second torch and vLLM import, ~20 s on 2 cores) and cannot
    keep the answer. Only vLLM's own records of its model classes are in it, nothing a node
    could hand another."""
    cache = Path.home() / ".cache" / "vllm" / "modelinfos"
    return (cache,) if cache.is_dir() and any(cache.glob("*.json")) else ()


def private_paths() -> tuple[Path, ...]:
    """The directories each node gets an empty tmpfs of its own over (those that exist)."""
    candidates = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path.home())
    return tuple(p for p in dict.fromkeys(candidates) if p.is_dir())


def shared_dir(prefix: str) -> Path:
    """A new directory that every node sees: under /run, which nodes leave alone (a temporary
    directory when /run is not writable — not root, so no nodes either)."""
    root = SHARED_ROOT if os.access(SHARED_ROOT, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def namespaces_refused() -> str | None:
    """Why this machine cannot make nodes, or None when it can (root, and a kernel that lets
    us make mount, UTS and network namespaces)."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--uts", "--propagation", "private", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        return f"`unshare --mount --uts` refused: {probe.stderr.strip()}"
    name = f"oq-probe-{os.getpid()}"
    added = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if added.returncode:
        return f"`ip netns add` refused: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return None


def _await_ready(proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    """Wait for the `ready` line a holder or a bridge prints once it is set up."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if readable else b""
    if line.strip() == b"ready":
        return
    proc.kill()
    proc.wait()
    detail = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    raise RuntimeError(f"{what} did not start (waited up to {timeout:.0f} s): {detail.strip()}")


def _bridge_command(mode: str, listen: str, connect: str) -> list[str]:
    return [sys.executable, "-m", "instruments.bridge", mode, listen, connect]


def _bridge_env(env: Mapping[str, str]) -> dict[str, str]:
    paths = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def _mount_namespace(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


class Node:
    """One simulated machine; see the module docstring. Use it as a context manager (or
    `start()` / `stop()`); `popen()` and `run()` are `subprocess`'s, run inside the node."""

    def __init__(
        self,
        name: str,
        *,
        netns: bool = False,
        installed: Iterable[Path] = INSTALLED,
        private: Sequence[Path] | None = None,
    ) -> None:
        if not name.replace("-", "").isalnum():
            raise ValueError(f"a node's name is letters, digits and dashes, not {name!r}")
        self.name = name
        self.netns = f"oq-{os.getpid()}-{name}" if netns else None
        self.installed = tuple(dict.fromkeys(Path(p).resolve() for p in installed))
        self.private = tuple(private if private is not None else private_paths())
        if any(p == Path("/") for p in self.private):
            raise ValueError("a node cannot mask the whole file system")
        self.home = Path.home()
        self._holder: subprocess.Popen[bytes] | None = None
        self._scratch: Path | None = None
        self._started: list[subprocess.Popen[bytes]] = []

    # -- life ------------------------------------------------------------------------------------

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> Node:
        try:
            if self.netns:
                subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
                subprocess.run(
                    ["ip", "-n", self.netns, "link", "set", "lo", "up"],
                    check=True,
                    capture_output=True,
                )
            self._scratch = shared_dir(f"oq-node-{self.name}-")
            cmd = ["unshare", "--mount", "--uts", "--propagation", "private"]
            cmd += ["sh", "-c", self._setup_script(self._scratch)]
            if self.netns:
                cmd = ["nsenter", f"--net=/run/netns/{self.netns}", *cmd]
            self._holder = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            _await_ready(self._holder, f"node {self.name}", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _setup_script(self, scratch: Path) -> str:
        """The holder's shell script: build each private tmpfs aside (with the installed
        software bound into it read-only while that is still visible), move it over its
        path, bind the rest of the installed software read-only in place, then wait."""
        q = shlex.quote
        lines = ["set -e", f"hostname {q(self.name)}"]

        def bind_read_only(source: Path, target: Path) -> None:
            lines.append(f"mkdir -p {q(str(target))}")
            lines.append(f"mount --rbind {q(str(source))} {q(str(target))}")
            lines.append(f"mount -o remount,bind,ro {q(str(target))}")

        def masked_by(path: Path) -> Path | None:
            under = [p for p in self.private if path == p or p in path.parents]
            return max(under, key=lambda p: len(p.parts)) if under else None

        for path in self.installed:
            if masked_by(path) is None:
                bind_read_only(path, path)
        for i, private in enumerate(self.private):
            aside = scratch / str(i)
            mode = os.stat(private).st_mode & 0o7777
            lines.append(f"mkdir -p {q(str(aside))}")
            lines.append(f"mount -t tmpfs -o mode={mode:o} oq-{q(self.name)} {q(str(aside))}")
            for path in self.installed:
                if masked_by(path) == private:
                    bind_read_only(path, aside / path.relative_to(private))
            lines.append(f"mount --move {q(str(aside))} {q(str(private))}")
        lines.append("echo ready")
        # Ends with the process that made the node, so a killed test leaves no namespace.
        lines.append(f"exec tail -f --pid={os.getpid()} /dev/null")
        return "\n".join(lines)

    def stop(self, grace: float = 5) -> None:
        """SIGTERM every process of the node, SIGKILL what is left after `grace` seconds,
        then end the holder (the mounts go with its namespace) and delete the netns."""
        if self._holder is not None and self._holder.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                self._signal_all(sig)
                deadline = time.monotonic() + wait
                while self.pids() and time.monotonic() < deadline:
                    self._reap()
                    time.sleep(0.05)
            self._holder.kill()
        for proc in (*self._started, *([self._holder] if self._holder else [])):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._started.clear()
        self._holder = None
        if self.netns:
            subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def lose(self, timeout: float = 10) -> None:
        """The machine lost: every process of the node SIGKILLed at once — nothing drains, no
        handler runs, as in a power cut — then the node taken down as `stop` does."""
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:  # again for what forked meanwhile
            self._signal_all(signal.SIGKILL)
            self._reap()
            time.sleep(0.05)
        self.stop()

    def _signal_all(self, sig: int) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reap(self) -> None:
        for proc in self._started:
            proc.poll()

    # -- inside ----------------------------------------------------------------------------------

    @property
    def holder_pid(self) -> int:
        if self._holder is None or self._holder.poll() is not None:
            raise RuntimeError(f"node {self.name} is not running")
        return self._holder.pid

    def pids(self) -> list[int]:
        """The node's processes (those in its mount namespace), the holder excepted."""
        if self._holder is None:
            return []
        ns = _mount_namespace(self._holder.pid)
        if ns is None:
            return []
        pids = (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit())
        return [p for p in pids if p != self._holder.pid and _mount_namespace(p) == ns]

    def env(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        """`base` (default: this process's environment) pointed at the node's private places:
        HOME, TMPDIR, PREFECT_HOME, no XDG overrides leading into the host's; this checkout first
        on PYTHONPATH, so a node runs the code its test runs (the instruments too, which the
        installed package does not hold)."""
        env = {k: v for k, v in (base or os.environ).items() if not k.startswith("XDG_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        env.update(
            HOME=str(self.home),
            TMPDIR="/tmp",
            PREFECT_HOME=str(self.home / ".prefect"),
            HOSTNAME=self.name,
            **extra,
        )
        return env

    def command(self, cmd: Sequence[str], cwd: Path | str | None = None) -> list[str]:
        """`cmd` wrapped to run in the node: `nsenter` joins its namespaces and execs it."""
        joins = ["-m", "-u", *(["-n"] if self.netns else [])]
        wd = str(cwd or self.home)
        return ["nsenter", "-t", str(self.holder_pid), *joins, f"--wd={wd}", "--", *cmd]

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """`subprocess.Popen` in the node; the handle's pid is the command's own process.
        `env` defaults to `self.env()`; `cwd` (a path as the node sees it) to the node's HOME."""
        proc: subprocess.Popen[Any] = subprocess.Popen(**self._in_node(cmd, **kwargs))
        self._started.append(proc)
        return proc

    def run(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """`subprocess.run` in the node; `env` and `cwd` as for `popen`."""
        return subprocess.run(**self._in_node(cmd, **kwargs))

    def _in_node(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        env = dict(env) if env is not None else self.env()
        return {"args": self.command(cmd, cwd), "env": env, **kwargs}

    def path(self, path: Path | str) -> Path:
        """Where the host finds `path` as the node sees it (through /proc/<holder>/root): for
        a test's assertions, never for passing files to the node's programs."""
        return Path(f"/proc/{self.holder_pid}/root") / Path(path).relative_to("/")

    def forward(self, port: int, socket_path: Path, timeout: float = 30) -> subprocess.Popen[bytes]:
        """Listen on the node's own 127.0.0.1:`port` and forward to `socket_path` (a bridge's
        Unix socket on the host, `Cluster.publish`). Needs the node's own netns: without one,
        its 127.0.0.1 is the host's and the service already listens on that port."""
        if not self.netns:
            raise ValueError(f"node {self.name} shares the host's loopback: nothing to forward")
        bridge = self.popen(
            _bridge_command("tcp-to-unix", f"127.0.0.1:{port}", str(socket_path)),
            env=_bridge_env(self.env()),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        _await_ready(bridge, f"bridge into node {self.name} for port {port}", timeout)
        return bridge


class Cluster:
    """Nodes, and the host-side bridges to the services they share: `publish(port)` puts a
    Unix socket in front of the host's 127.0.0.1:`port`; `node(..., reach=[port])` makes a node
    whose own 127.0.0.1:`port` leads there. Leaving it stops the nodes, then the bridges."""

    def __init__(self) -> None:
        self.dir = shared_dir("oq-cluster-")
        self.nodes: list[Node] = []
        self._sockets: dict[int, Path] = {}
        self._bridges: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def publish(self, port: int, timeout: float = 30) -> Path:
        """A Unix socket (in a directory every node sees) forwarding to 127.0.0.1:`port`."""
        if port not in self._sockets:
            path = self.dir / f"tcp-{port}.sock"
            bridge = subprocess.Popen(
                _bridge_command("unix-to-tcp", str(path), f"127.0.0.1:{port}"),
                env=_bridge_env(os.environ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
            )
            self._bridges.append(bridge)
            _await_ready(bridge, f"bridge to port {port}", timeout)
            self._sockets[port] = path
        return self._sockets[port]

    def node(
        self,
        name: str,
        *,
        netns: bool = False,
        reach: Iterable[int] = (),
        installed: Iterable[Path] = INSTALLED,
    ) -> Node:
        """A started node; with `netns`, its 127.0.0.1:PORT for each port in `reach` leads to
        the host's 127.0.0.1:PORT (the same URL works on the host and in the node)."""
        node = Node(name, netns=netns, installed=installed).start()
        self.nodes.append(node)
        for port in reach:
            node.forward(port, self.publish(port))
        return node

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
        stop(*self._bridges, grace=10)
        for bridge in self._bridges:
            if bridge.stdout is not None:
                bridge.stdout.close()
        self._bridges.clear()
        self._sockets.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
