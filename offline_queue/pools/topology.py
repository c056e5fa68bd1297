"""The cluster file (deployments/pools.yaml): node groups, tiers, engines — validated whole
before anything is applied, so a bad file changes nothing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from offline_queue.blocks.engines import VLLM, OpenAIServer
from offline_queue.states import Tier

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class TopologyError(ValueError):
    """The file is not a valid cluster description; the message names the field."""


class TierSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    priority: int = Field(ge=1, description="Lower goes first (1 is the highest).")
    concurrency_limit: int | None = Field(default=None, ge=0, description="Runs at once.")


class EngineSpec(BaseModel):
    """The engine block the group's deployments use, saved under `block` (slug/name)."""

    model_config = ConfigDict(extra="allow")
    block: str
    type: Literal["vllm", "openai-server"]

    def build(self) -> VLLM | OpenAIServer:
        fields: dict[str, Any] = dict(self.model_extra or {})
        cls = VLLM if self.type == "vllm" else OpenAIServer
        return cls(**fields)

    @field_validator("block")
    @classmethod
    def _slug_and_name(cls, value: str) -> str:
        slug, _, name = value.partition("/")
        if slug not in ("vllm", "openai-server") or not _NAME.match(name):
            raise ValueError("must be `vllm/NAME` or `openai-server/NAME` (lowercase, digits, -)")
        return value


class GroupSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    concurrency_limit: int = Field(
        ge=1, description="Batch flow runs the group runs at once (waiting batches hold no GPU)."
    )
    tiers: dict[Tier, TierSpec] = Field(default_factory=dict)
    device: Literal["gpu", "cpu"] = "gpu"
    """What the group's nodes run their engines on. A GPU group's in-process engine must name
    its model; the bundled demo model is for `cpu` groups only."""
    engine: EngineSpec | None = None
    """None for a group that runs only control flows (the release router)."""


class Topology(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tiers: dict[Tier, TierSpec]
    groups: dict[str, GroupSpec] = Field(min_length=1)

    @field_validator("groups")
    @classmethod
    def _group_names(cls, groups: dict[str, GroupSpec]) -> dict[str, GroupSpec]:
        for name in groups:
            if not _NAME.match(name):
                raise ValueError(f"group name {name!r}: lowercase letters, digits and - only")
        return groups

    def queues(self, group: str) -> dict[Tier, TierSpec]:
        """The group's tiers: the defaults, overridden by the group's own."""
        return {**self.tiers, **self.groups[group].tiers}


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def load_topology(path: Path) -> Topology:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TopologyError(f"{path}: {exc}") from exc
    try:
        topology = Topology.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise TopologyError(f"{path}: {_where(first['loc'])}: {first['msg']}") from exc
    for name, group in topology.groups.items():  # engine fields are checked by the block itself
        if group.engine is None:
            continue
        try:
            block = group.engine.build()
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            raise TopologyError(
                f"{path}: groups.{name}.engine.{_where(first['loc'])}: {first['msg']}"
            ) from exc
        if group.device == "gpu" and isinstance(block, VLLM) and not block.model:
            raise TopologyError(
                f"{path}: groups.{name}.engine.model: a GPU group must name its model (a Hugging "
                "Face model folder on its nodes, or a model id in their Hugging Face cache); "
                "the bundled demo model is for `device: cpu` groups"
            )
    return topology
