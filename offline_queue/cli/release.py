"""`release set|show|stage|set-fraction|promote|rollback|route`: the gray release of model
versions, kept in ReleasePolicy blocks (blocks/release.py); `route` shows what the router flow
would decide for given keys."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from offline_queue.cli.shared import err, out

if TYPE_CHECKING:
    from offline_queue.blocks.release import ReleasePolicy

release_app = typer.Typer(no_args_is_help=True, help="Gray release of model versions.")


PolicyOption = Annotated[
    str, typer.Option("--policy", help="Release policy block (one per model family).")
]


def _policy_block(name: str) -> ReleasePolicy:
    from offline_queue.blocks.release import load_policy

    try:
        return load_policy(name)
    except ValueError as exc:
        err.print(
            f"[red]error:[/red] no release policy {name!r}: `offline-queue release set` first"
        )
        raise typer.Exit(1) from exc


def _save_policy(block: ReleasePolicy, name: str, **changes: object) -> None:
    from pydantic import ValidationError

    from offline_queue.blocks.release import save_policy

    try:
        saved = save_policy(block, name, **changes)
    except (ValueError, ValidationError) as exc:
        err.print(f"[red]refused:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    _show_policy(saved, name)


def _show_policy(block: ReleasePolicy, name: str) -> None:
    table = Table(show_header=False, box=None, title=f"release policy {name}")
    for field in (
        "stable_version",
        "stable_engine",
        "candidate_version",
        "candidate_engine",
        "stage",
        "fraction",
        "sticky_by",
        "internal_tenants",
        "seed_groups",
        "max_error_rate_increase",
        "max_p95_latency_ratio",
        "min_samples",
    ):
        table.add_row(field, str(getattr(block, field)))
    out.print(table)


@release_app.command("set")
def release_set(
    policy: PolicyOption = "default",
    stable: Annotated[str | None, typer.Option(help="Stable model version.")] = None,
    stable_engine: Annotated[str | None, typer.Option(help="Engine block of stable.")] = None,
    candidate: Annotated[str | None, typer.Option(help="Candidate model version.")] = None,
    candidate_engine: Annotated[str | None, typer.Option(help="Engine block of candidate.")] = None,
    stage: Annotated[str | None, typer.Option(help="off|internal|seed|canary|full")] = None,
    fraction: Annotated[float | None, typer.Option(help="Canary share, 0..1.")] = None,
    sticky_by: Annotated[str | None, typer.Option(help="tenant|user_group|batch")] = None,
    internal_tenants: Annotated[str | None, typer.Option(help="Comma-separated.")] = None,
    seed_groups: Annotated[str | None, typer.Option(help="Comma-separated.")] = None,
    min_samples: Annotated[int | None, typer.Option(help="Guard minimum sample.")] = None,
) -> None:
    """Create or change a release policy (only the options given change)."""
    from offline_queue.blocks.release import ReleasePolicy

    changes = {
        k: v
        for k, v in {
            "stable_version": stable,
            "stable_engine": stable_engine,
            "candidate_version": candidate,
            "candidate_engine": candidate_engine,
            "stage": stage,
            "fraction": fraction,
            "sticky_by": sticky_by,
            "internal_tenants": internal_tenants.split(",") if internal_tenants else None,
            "seed_groups": seed_groups.split(",") if seed_groups else None,
            "min_samples": min_samples,
        }.items()
        if v is not None
    }
    try:
        block = _policy_block(policy)
    except typer.Exit:
        if not stable:
            raise
        block = ReleasePolicy(stable_version=stable)
    _save_policy(block, policy, **changes)


@release_app.command("show")
def release_show(policy: PolicyOption = "default") -> None:
    """The policy as it stands."""
    _show_policy(_policy_block(policy), policy)


@release_app.command("stage")
def release_stage(
    stage: Annotated[str, typer.Argument(help="off|internal|seed|canary|full")],
    policy: PolicyOption = "default",
) -> None:
    """Move the candidate to another stage."""
    _save_policy(_policy_block(policy), policy, stage=stage)


@release_app.command("set-fraction")
def release_set_fraction(
    fraction: Annotated[float, typer.Argument(help="Share of sticky keys on the candidate.")],
    policy: PolicyOption = "default",
) -> None:
    """Change the canary fraction."""
    _save_policy(_policy_block(policy), policy, fraction=fraction)


@release_app.command("promote")
def release_promote(policy: PolicyOption = "default") -> None:
    """The candidate becomes stable; every new batch goes to it."""
    block = _policy_block(policy)
    if not block.candidate_version:
        err.print("[red]refused:[/red] there is no candidate to promote")
        raise typer.Exit(2)
    _save_policy(
        block,
        policy,
        stable_version=block.candidate_version,
        stable_engine=block.candidate_engine,
        candidate_version=None,
        candidate_engine=None,
        stage="off",
        fraction=0.0,
    )


@release_app.command("rollback")
def release_rollback(policy: PolicyOption = "default") -> None:
    """Everything back to stable at once (candidate runs in flight finish)."""
    _save_policy(_policy_block(policy), policy, stage="off")


@release_app.command("route")
def release_route(
    key: Annotated[
        list[str] | None, typer.Option("--key", help="A sticky key (repeatable).")
    ] = None,
    keys_file: Annotated[Path | None, typer.Option(help="One key per line.")] = None,
    policy: PolicyOption = "default",
) -> None:
    """What the router would decide: `KEY TRACK VERSION REASON`, one line per key. A key
    stands for the tenant, the user group and the batch at once."""
    from offline_queue.release import RouteKey, route

    rules = _policy_block(policy).policy()
    keys = list(key or [])
    if keys_file:
        keys += [k.strip() for k in keys_file.read_text().splitlines() if k.strip()]
    for k in keys:
        d = route(rules, RouteKey(tenant=k, user_group=k, batch=k))
        print(f"{k} {d.track} {d.version} {d.reason}")
