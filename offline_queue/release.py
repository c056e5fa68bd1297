"""Gray release of model versions: which track (stable or candidate) a batch goes to, and when the
candidate is doing worse than stable. Routing is a pure function of the policy and the batch's
sticky key: the same key always gets the same track (a tenant's nightly batches do not flip), and
`fraction` of the keys go to the candidate (a SHA-256 bucket, uniform over keys).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Stage = Literal["off", "internal", "seed", "canary", "full"]
StickyBy = Literal["tenant", "user_group", "batch"]
Track = Literal["stable", "candidate"]


class Guards(BaseModel):
    """When the candidate is rolled back automatically."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    max_error_rate_increase: float = Field(default=0.05, ge=0, le=1)
    """Candidate error rate minus stable's, at most."""
    max_p95_latency_ratio: float = Field(default=1.5, gt=0)
    """Candidate p95 latency over stable's, at most."""
    min_samples: int = Field(default=200, ge=1)
    """Candidate requests needed before a guard can fire."""


class Policy(BaseModel):
    stable_version: str
    stable_engine: str | None = None
    candidate_version: str | None = None
    candidate_engine: str | None = None
    stage: Stage = "off"
    fraction: float = Field(default=0.0, ge=0, le=1)
    sticky_by: StickyBy = "tenant"
    internal_tenants: list[str] = Field(default_factory=list)
    seed_groups: list[str] = Field(default_factory=list)
    guards: Guards = Field(default_factory=Guards)
    salt: str = "offline-queue"
    """Changing it reshuffles which keys fall in the canary fraction."""

    @model_validator(mode="after")
    def _candidate_when_staged(self) -> Policy:
        if self.stage != "off" and not self.candidate_version:
            raise ValueError(f"stage {self.stage!r} needs a candidate version")
        return self


@dataclass(frozen=True)
class RouteKey:
    tenant: str | None = None
    user_group: str | None = None
    batch: str | None = None

    def sticky(self, by: StickyBy) -> str | None:
        return {"tenant": self.tenant, "user_group": self.user_group, "batch": self.batch}[by]


@dataclass(frozen=True)
class Decision:
    track: Track
    version: str
    engine: str | None
    reason: str


def bucket(salt: str, key: str) -> float:
    """A key's place in [0, 1), uniform over keys and fixed for a key."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def route(policy: Policy, key: RouteKey) -> Decision:
    def stable(reason: str) -> Decision:
        return Decision("stable", policy.stable_version, policy.stable_engine, reason)

    def candidate(reason: str) -> Decision:
        assert policy.candidate_version is not None
        return Decision("candidate", policy.candidate_version, policy.candidate_engine, reason)

    stage = policy.stage
    if stage == "off":
        return stable("stage off")
    if stage == "full":
        return candidate("stage full")
    if stage == "internal":
        if key.tenant in policy.internal_tenants:
            return candidate(f"internal tenant {key.tenant}")
        return stable("stage internal: tenant not on the internal list")
    if stage == "seed":
        if key.user_group in policy.seed_groups or key.tenant in policy.internal_tenants:
            return candidate(f"seed group {key.user_group or key.tenant}")
        return stable("stage seed: not a seed group")
    sticky = key.sticky(policy.sticky_by)
    if sticky is None:
        return stable(f"canary: no {policy.sticky_by} to route by")
    b = bucket(policy.salt, sticky)
    if b < policy.fraction:
        return candidate(f"canary: {policy.sticky_by} bucket {b:.4f} < {policy.fraction}")
    return stable(f"canary: {policy.sticky_by} bucket {b:.4f} >= {policy.fraction}")


@dataclass(frozen=True)
class TrackStats:
    batches: int
    requests: int
    failed: int
    p50_ms: float | None
    p95_ms: float | None
    output_tokens: int
    seconds: float
    engine_seconds: float = 0.0
    """GPU time the track's batches used (offline_queue/gpu_time.py): what the candidate costs."""

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


def breached(guards: Guards, stable: TrackStats, candidate: TrackStats) -> str | None:
    """Why the candidate must be rolled back, or None. Needs `min_samples` candidate requests."""
    if candidate.requests < guards.min_samples:
        return None
    increase = candidate.error_rate - stable.error_rate
    if increase > guards.max_error_rate_increase:
        return (
            f"error rate {candidate.error_rate:.1%} vs stable {stable.error_rate:.1%} "
            f"(+{increase:.1%} > {guards.max_error_rate_increase:.1%})"
        )
    if candidate.p95_ms and stable.p95_ms:
        ratio = candidate.p95_ms / stable.p95_ms
        if ratio > guards.max_p95_latency_ratio:
            return (
                f"p95 latency {candidate.p95_ms:.0f} ms vs stable {stable.p95_ms:.0f} ms "
                f"(x{ratio:.2f} > x{guards.max_p95_latency_ratio})"
            )
    return None
