"""Routes: the name of the engine a batch waits on and a serving loop serves (blocks/engines.py
`route_of` names every engine so). A loop claims only chunks of batches on its route."""

from __future__ import annotations

from offline_queue.catalog import BUNDLED_CHAT


def in_process_route(model: str | None) -> str:
    """vLLM in process on `model` (a folder, or a bundled model's name; None: the bundled chat
    model)."""
    return f"vllm:{model or BUNDLED_CHAT.name}"
