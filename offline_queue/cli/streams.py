"""`streams consume`: a member of a Redis stream's consumer group (offline_queue/streams.py)."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from offline_queue.cli.shared import DbOption, err
from offline_queue.states import Tier

streams_app = typer.Typer(no_args_is_help=True, help="Redis Streams in front of the queue.")


@streams_app.command("consume")
def consume(
    redis: Annotated[str, typer.Option("--redis", help="redis://host:port/db of the stream.")],
    stream: Annotated[str, typer.Option(help="The stream whose entries are batch lines.")],
    group: Annotated[str, typer.Option(help="The consumer group.")] = "offline-queue",
    consumer: Annotated[
        str | None, typer.Option(help="This member's name. Default: host and process id.")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Whose work the entries are.")] = None,
    tier: Annotated[Tier, typer.Option(help="Tier of entries without a `tier` field.")] = Tier.BULK,
    engine: Annotated[
        str | None,
        typer.Option(help="Engine URL or block whose route the entries wait on (and served here)."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model folder (in-process engine).")] = None,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve/--no-serve",
            help="Serve what is taken with a loop of this process; --no-serve leaves it to the "
            "group's serving loops.",
        ),
    ] = True,
    chunk_size: Annotated[int, typer.Option(min=1, help="Requests per claim of the loop.")] = 64,
    read_count: Annotated[
        int, typer.Option(min=1, help="Entries per read: one batch in the queue.")
    ] = 256,
    max_pending: Annotated[
        int, typer.Option(min=1, help="Stop reading while this many taken entries wait.")
    ] = 10_000,
    claim_idle: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds an entry may sit with a silent consumer before this one takes it over.",
        ),
    ] = 30.0,
    db: DbOption = None,
) -> None:
    """Take the stream's entries into the queue (acknowledged once committed), and write each
    answer to `STREAM:results` (or the entry's `reply_to`). Ctrl-C or SIGTERM stops it."""
    from offline_queue.blocks.engines import load_engine_block, route_of
    from offline_queue.store.db import resolve_url
    from offline_queue.streams import StreamConsumer, StreamSettings

    url = resolve_url(db)
    route = route_of(engine, model)
    settings = StreamSettings(
        redis_url=redis,
        stream=stream,
        group=group,
        consumer=consumer or "",
        tenant=tenant,
        tier=tier,
        route=route,
        max_pending=max_pending,
        read_count=read_count,
        claim_idle_ms=int(claim_idle * 1000),
    )
    member = StreamConsumer(url, settings)
    loop = None
    if serve:
        from offline_queue.loop import ServingLoop

        with err.status(f"Loading the engine for {route}…"):
            chosen = load_engine_block(engine, model).engine()
        loop = ServingLoop(url, chosen, route, chunk_size=chunk_size).start()

    def stop(*_: object) -> None:
        member.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    err.print(f"consuming {stream} as {member.name} of group {group}, route {route}")
    with err.status("") as status:
        import threading

        def show() -> None:
            while not member.stopped(0.5):
                status.update(
                    f"{stream}: taken {member.taken}, queued {member.queued}, "
                    f"refused {member.rejected}, answered {member.replied}"
                )

        threading.Thread(target=show, daemon=True).start()
        member.run()
    if loop is not None:
        loop.stop(timeout=60)
    err.print(
        f"stopped: taken {member.taken}, queued {member.queued}, refused {member.rejected}, "
        f"answered {member.replied}"
    )
