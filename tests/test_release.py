"""Gray-release routing and guards: deterministic, sticky, fraction-accurate; the stages do
what they say; the guard fires only with enough samples."""

from __future__ import annotations

import pytest

from offline_queue.release import (
    Guards,
    Policy,
    RouteKey,
    TrackStats,
    breached,
    route,
)


def policy(**kw: object) -> Policy:
    base: dict = {"stable_version": "v1", "candidate_version": "v2", "stage": "canary"}
    return Policy(**{**base, **kw})


def test_canary_fraction_is_accurate_and_sticky() -> None:
    p = policy(fraction=0.1)
    keys = [f"tenant-{i}" for i in range(10_000)]
    first = [route(p, RouteKey(tenant=k)).track for k in keys]
    share = first.count("candidate") / len(keys)
    assert 0.09 <= share <= 0.11, share
    again = [route(p, RouteKey(tenant=k)).track for k in keys]
    assert first == again  # the same key always gets the same track
    wider = [route(policy(fraction=0.3), RouteKey(tenant=k)).track for k in keys]
    # Raising the fraction only adds keys: nobody already on the candidate moves back.
    assert all(w == "candidate" for f, w in zip(first, wider, strict=True) if f == "candidate")


def test_sticky_by_user_group_and_batch() -> None:
    p = policy(fraction=0.5, sticky_by="user_group")
    tracks = {route(p, RouteKey(tenant=f"t{i}", user_group="g-7")).track for i in range(50)}
    assert len(tracks) == 1  # one user group, one track, whatever the tenant
    p = policy(fraction=0.5, sticky_by="batch")
    assert route(p, RouteKey(tenant="t")).track == "stable"  # nothing to route by
    assert "no batch" in route(p, RouteKey(tenant="t")).reason


def test_internal_and_seed_stages_route_only_the_allow_list() -> None:
    p = policy(stage="internal", internal_tenants=["acme-internal"])
    assert route(p, RouteKey(tenant="acme-internal")).track == "candidate"
    assert all(route(p, RouteKey(tenant=f"t{i}")).track == "stable" for i in range(1000))
    p = policy(stage="seed", seed_groups=["beta-testers"])
    assert route(p, RouteKey(tenant="x", user_group="beta-testers")).track == "candidate"
    assert route(p, RouteKey(tenant="x", user_group="others")).track == "stable"


@pytest.mark.parametrize(("stage", "track"), [("off", "stable"), ("full", "candidate")])
def test_off_and_full_route_everyone_to_one_side(stage: str, track: str) -> None:
    p = policy(stage=stage, fraction=0.5)
    assert {route(p, RouteKey(tenant=f"t{i}")).track for i in range(1000)} == {track}


def test_a_staged_policy_needs_a_candidate() -> None:
    with pytest.raises(ValueError, match="needs a candidate"):
        Policy(stable_version="v1", stage="canary")


def stats(requests: int, failed: int, p95: float) -> TrackStats:
    return TrackStats(1, requests, failed, p95 / 2, p95, requests * 10, 10.0)


def test_guards_need_samples_and_fire_on_errors_or_latency() -> None:
    g = Guards(max_error_rate_increase=0.05, max_p95_latency_ratio=1.5, min_samples=100)
    stable = stats(1000, 10, 200)
    assert breached(g, stable, stats(99, 99, 200)) is None  # too few samples yet
    why = breached(g, stable, stats(100, 20, 200))
    assert why is not None and "error rate" in why
    why = breached(g, stable, stats(100, 1, 400))
    assert why is not None and "p95" in why
    assert breached(g, stable, stats(100, 5, 250)) is None
