"""The catalog of served models: which model a line's `model` names, what serves it, and whether
it serves the line's endpoint — so a line naming a model nobody serves is an error of its own,
not an answer from whatever engine is loaded. (docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from offline_queue.formats import EMBEDDINGS_URL, GENERATE_URLS
from offline_queue.model import BUNDLED_EMBEDDING_NAME


class ServedModel(BaseModel):
    """One served model name and what serves it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    aliases: tuple[str, ...] = ()
    """Other names the lines may give: a batch written for a hosted model (`gpt-4o-mini`) runs
    on the model a team serves under it."""
    endpoints: tuple[str, ...] = GENERATE_URLS
    engine: str | None = None
    """Engine block name or server URL (blocks/engines.py); None: vLLM in the worker process
    with `model`."""
    model: str | None = None
    """For vLLM in process: a model folder or a bundled model's name; None: the bundled chat
    model. For a server: the served model name to ask for (None: the first it lists)."""
    group: str | None = None
    """Node group (work pool) whose workers serve it; None: any (informational for now)."""
    release: str | None = None
    """Release policy block picking its version, if any: a batch routed here goes to the track
    (stable or candidate) the policy gives it, on that track's engine (flows/batch.py)."""

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


_ENTRIES = TypeAdapter(tuple[ServedModel, ...])


@dataclass(frozen=True)
class Catalog:
    models: tuple[ServedModel, ...]
    _by_name: dict[str, ServedModel] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, ServedModel] = {}
        for model in self.models:
            for name in model.names():
                if name in by_name:
                    raise ValueError(f"model name {name!r} is in the catalog twice")
                by_name[name] = model
        object.__setattr__(self, "_by_name", by_name)

    def find(self, name: str | None) -> ServedModel | None:
        return self._by_name.get(name) if name else None

    def served(self) -> str:
        return ", ".join(m.name for m in self.models)

    def check(self, url: str, name: str, batch_model: ServedModel | None) -> str | None:
        """Why a line naming `name` on `url` cannot run in a batch of `batch_model`, or None."""
        model = self.find(name)
        if model is None:
            return f"model: {name!r} is not served; served models: {self.served()}"
        if url not in model.endpoints:
            return f"url: {model.name} does not serve {url}; it serves {', '.join(model.endpoints)}"
        if batch_model is not None and model != batch_model:
            return (
                f"model: {name!r} is another model than the batch's ({batch_model.name}); "
                "a batch's lines must name one model"
            )
        return None

    def batch_model(self, lines: Iterable[tuple[str, str]]) -> ServedModel | None:
        """The entry of the first (url, model) line that names a served model for its url: the
        batch's model. None when no line does (then every line is an error of its own)."""
        for url, name in lines:
            model = self.find(name)
            if model is not None and url in model.endpoints:
                return model
        return None

    def with_entries(self, entries: Iterable[ServedModel]) -> Catalog:
        """This catalog with `entries` added; an entry of the same name replaces the old one."""
        added = {e.name: e for e in entries}
        replaced = tuple(added.pop(m.name, m) for m in self.models)  # in place: order is kept
        return Catalog((*replaced, *added.values()))

    def to_json(self) -> str:
        return _ENTRIES.dump_json(self.models).decode()

    @classmethod
    def from_json(cls, text: str) -> Catalog:
        return cls(_ENTRIES.validate_python(orjson.loads(text)))


BUNDLED_CHAT = ServedModel(name="smollm2", aliases=("SmolLM2-135M-Instruct",))
BUNDLED_EMBEDDING = ServedModel(
    name="all-minilm-l6-v2",
    aliases=(BUNDLED_EMBEDDING_NAME, f"sentence-transformers/{BUNDLED_EMBEDDING_NAME}"),
    endpoints=(EMBEDDINGS_URL,),
    model=BUNDLED_EMBEDDING_NAME,
)
DEFAULT_CATALOG = Catalog((BUNDLED_CHAT, BUNDLED_EMBEDDING))
