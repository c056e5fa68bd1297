"""The release policy block: what an operator edits (or `offline-queue release …` edits) to
move a model family's candidate version through its stages."""

from __future__ import annotations

from typing import Any, cast

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field

from offline_queue.release import Guards, Policy, Stage, StickyBy


class ReleasePolicy(Block):
    """Stable and candidate versions of one model family, and who gets the candidate.

    Stages: off (everyone on stable) → internal (internal tenants) → seed (seed user groups)
    → canary (`fraction` of sticky keys) → full (everyone on the candidate); `promote` makes
    the candidate stable, `rollback` (or a guard) sends everyone back to stable at once."""

    _block_type_name = "Release policy"
    _block_type_slug = "release-policy"
    _description = "Gray release of a model family: stable/candidate versions, stage, fraction."

    model_config = ConfigDict(use_attribute_docstrings=True)

    stable_version: str
    """Model version every batch gets unless routed."""
    stable_engine: str | None = None
    """Engine block of stable."""
    candidate_version: str | None = None
    """The version on trial."""
    candidate_engine: str | None = None
    """Engine block of candidate."""
    stage: Stage = "off"
    """off, internal, seed, canary or full."""
    fraction: float = Field(default=0.0, ge=0, le=1)
    """Canary share of sticky keys."""
    sticky_by: StickyBy = "tenant"
    """What keeps routing stable: a tenant (or user group, or batch) always gets the same track
    while the policy stays the same."""
    internal_tenants: list[str] = Field(default_factory=list)
    """Stage internal."""
    seed_groups: list[str] = Field(default_factory=list)
    """Stage seed."""
    max_error_rate_increase: float = Field(default=0.05, ge=0, le=1)
    """Roll back when candidate errors exceed stable's by more."""
    max_p95_latency_ratio: float = Field(default=1.5, gt=0)
    """Roll back when candidate p95 latency / stable's is higher."""
    min_samples: int = Field(default=200, ge=1)
    """Candidate requests needed before a guard may fire."""
    window_hours: float = Field(default=24.0, gt=0)
    """How far back guards look."""

    def policy(self) -> Policy:
        """The domain's policy: the block's fields by name, the guards' nested as Policy has
        them (so a field added to both needs no line here)."""
        mine = self.model_dump()
        guards = Guards(**{k: mine[k] for k in Guards.model_fields})
        return Policy(**{k: mine[k] for k in Policy.model_fields if k in mine}, guards=guards)


def load_policy(name: str) -> ReleasePolicy:
    return cast(ReleasePolicy, ReleasePolicy.load(name))


def save_policy(block: ReleasePolicy, name: str, **changes: Any) -> ReleasePolicy:
    """Apply `changes`, check the result is a valid policy, save it."""
    updated = block.model_copy(update=changes)
    updated.policy()  # raises if e.g. a stage needs a candidate that is not set
    updated.save(name, overwrite=True)
    return updated
