"""The catalog of served models: which model a line's `model` names, and whether it serves the
line's endpoint.

A line's `model` used to be ignored (the engine wrote its own name over it), so a line naming a
model nobody serves was answered by whatever was loaded. The catalog maps every name a batch
may use (a model's name and its aliases) to one entry; a batch's lines must all name the same
served model (OpenAI's rule), and a line that does not is an error of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from offline_queue.formats import CHAT_URL, COMPLETIONS_URL


@dataclass(frozen=True)
class ServedModel:
    """One served model name and what serves it."""

    name: str
    aliases: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = (CHAT_URL, COMPLETIONS_URL)
    engine: str | None = None
    """Engine block name (see blocks/engines.py); None: vLLM in process with the bundled model."""
    group: str | None = None
    """Node group (work pool) whose workers serve it; None: any."""
    release: str | None = None
    """Release policy block picking its version, if any."""

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


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

    def find(self, name: str) -> ServedModel | None:
        return self._by_name.get(name)

    def served(self) -> str:
        return ", ".join(m.name for m in self.models)

    def check(self, url: str, name: str, batch_model: ServedModel | None) -> str | None:
        """Why a line naming `name` on `url` cannot run in a batch of `batch_model`, or None."""
        model = self.find(name)
        if model is None:
            return f"model: {name!r} is not served; served models: {self.served()}"
        if url not in model.endpoints:
            return f"url: {model.name} does not serve {url}; it serves {', '.join(model.endpoints)}"
        if batch_model is not None and model is not batch_model:
            return (
                f"model: {name!r} is another model than the batch's ({batch_model.name}); "
                "a batch's lines must name one model"
            )
        return None


BUNDLED_CHAT = ServedModel(name="smollm2", aliases=("SmolLM2-135M-Instruct",))
DEFAULT_CATALOG = Catalog((BUNDLED_CHAT,))
