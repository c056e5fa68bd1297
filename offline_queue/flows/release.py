"""The release router: decide stable or candidate for a batch, start that deployment, and after
a candidate batch check the guards — rolling back automatically when the candidate regresses.

What `prefect deployment run 'route-batch/default'`, a nightly schedule or the API start. The
open-source Prefect server has no traffic split and no rollback; this flow is ours.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.events import emit_event
from prefect.runtime import flow_run

from offline_queue.blocks.release import ReleasePolicy, load_policy, save_policy
from offline_queue.blocks.store import store_url
from offline_queue.release import RouteKey, TrackStats, breached, route
from offline_queue.runs import BatchRun
from offline_queue.states import Tier
from offline_queue.store import stats

ROLLBACK_EVENT = "offline-queue.release.rolled-back"


def _tag_self(tags: list[str]) -> None:
    run_id = flow_run.get_id()
    if run_id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(UUID(run_id), tags=sorted(set(flow_run.get_tags()) | set(tags)))


def _stats_rows(stable: TrackStats, candidate: TrackStats) -> list[dict[str, Any]]:
    return [
        {
            "track": name,
            "batches": s.batches,
            "requests": s.requests,
            "error rate": f"{s.error_rate:.2%}",
            "p50 ms": round(s.p50_ms or 0),
            "p95 ms": round(s.p95_ms or 0),
            "tokens/s": round(s.tokens_per_second, 1),
            "engine s": round(s.engine_seconds, 1),
        }
        for name, s in (("stable", stable), ("candidate", candidate))
    ]


@task(name="check-release-guards", cache_policy=NO_CACHE)
def check_guards(policy_name: str, db: str) -> str | None:
    """Compare the candidate with stable over the policy's window; roll back on a breach.
    Returns why it rolled back, or None."""
    block = load_policy(policy_name)
    if block.stage == "off" or not block.candidate_version:
        return None
    since = time.time() - block.window_hours * 3600
    stable = stats.track_stats(db, "stable", block.stable_version, since)
    candidate = stats.track_stats(db, "candidate", block.candidate_version, since)
    rows = _stats_rows(stable, candidate)
    pairs, same = stats.track_agreement(db, block.stable_version, block.candidate_version, since)
    agreement = f"{same}/{pairs} ({same / pairs:.0%})" if pairs else "no shared requests"
    for row in rows:
        row["same answer as the other track"] = agreement
    create_table_artifact(
        key=f"release-{policy_name}-report",
        table=rows,
        description=f"{block.stable_version} (stable) vs {block.candidate_version} (candidate)",
    )
    why = breached(block.policy().guards, stable, candidate)
    if why is None:
        return None
    save_policy(block, policy_name, stage="off")
    emit_event(
        event=ROLLBACK_EVENT,
        resource={
            "prefect.resource.id": f"offline-queue.release-policy.{policy_name}",
            "prefect.resource.name": policy_name,
        },
        payload={
            "reason": why,
            "stable_version": block.stable_version,
            "candidate_version": block.candidate_version,
            "stable": rows[0],
            "candidate": rows[1],
        },
    )
    head = "| " + " | ".join(rows[0]) + " |\n" + "|---" * len(rows[0]) + "|\n"
    table = head + "\n".join("| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows)
    create_markdown_artifact(
        key=f"release-{policy_name}-rollback",
        markdown=f"# Rolled back {block.candidate_version}\n\n**Why:** {why}\n\n"
        f"{table}\n\n"
        f"Every new batch now goes to {block.stable_version}.",
        description=f"Automatic rollback of {policy_name}",
    )
    get_run_logger().warning("release %s rolled back: %s", policy_name, why)
    return why


@flow(name="route-batch")
def route_batch(
    input: str,
    tenant: str | None = None,
    user_group: str | None = None,
    tier: Tier = Tier.STANDARD,
    weight: int = 1,
    policy: str = "default",
    idempotency_key: str | None = None,
    batch_id: str | None = None,
    output: str | None = None,
    errors: str | None = None,
    chunk_size: int = 256,
    max_attempts: int = 3,
    store: str | None = "default",
    db: str | None = None,
    deployment_prefix: str = "batch-inference",
) -> dict[str, Any]:
    """Send one batch to the stable or the candidate deployment, as the release policy says.

    Args:
        input: Path of the OpenAI Batch JSONL file.
        tenant: Who the batch is for (sticky key, internal allow-list).
        user_group: The tenant's user group (sticky key, seed allow-list).
        tier: Priority tier: critical, standard or bulk.
        weight: Share of a shared engine within the tier.
        policy: Name of the release-policy block (one per model family).
        idempotency_key: The same key again resumes the same batch.
        batch_id: Explicit batch id (also the sticky key when sticky_by is `batch`).
        output: Output file. Default: next to the input.
        errors: Error file. Default: next to the input.
        chunk_size: Requests per task.
        max_attempts: Tries per request.
        store: Store block name (where the guards read both tracks' results).
        db: Store URL; overrides `store`.
        deployment_prefix: Flow name of the `stable` and `candidate` deployments.
    """
    block: ReleasePolicy = load_policy(policy)
    key = RouteKey(tenant=tenant, user_group=user_group, batch=batch_id or idempotency_key or input)
    decision = route(block.policy(), key)
    logger = get_run_logger()
    logger.info("%s → %s %s (%s)", key, decision.track, decision.version, decision.reason)
    tags = [f"track:{decision.track}", f"version:{decision.version}", f"tier:{tier}"]
    _tag_self(tags)
    run = BatchRun(
        input=input,
        tier=Tier(tier),
        weight=weight,
        tenant=tenant,
        idempotency_key=idempotency_key,
        batch_id=batch_id,
        output=output,
        errors=errors,
        chunk_size=chunk_size,
        max_attempts=max_attempts,
        store=store,
        db=db,
        release_track=decision.track,
        release_version=decision.version,
        metadata={"release_reason": decision.reason},
        engine=decision.engine or None,  # none: the deployment's own
    )
    child: FlowRun = run_deployment(  # type: ignore[assignment]  # sync in a sync flow
        f"{deployment_prefix}/{decision.track}", parameters=run.parameters(), tags=tags
    )
    state = getattr(child, "state", None)
    rolled_back = None
    if decision.track == "candidate":
        rolled_back = check_guards(policy, store_url(db, store))
    if state is None or not state.is_completed():
        raise RuntimeError(
            f"the {decision.track} run {child.id} ended {state.type.value if state else 'unknown'}"
        )
    return {
        "track": decision.track,
        "version": decision.version,
        "reason": decision.reason,
        "flow_run_id": str(child.id),
        "state": state.type.value if state else None,
        "rolled_back": rolled_back,
    }
