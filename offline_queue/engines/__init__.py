"""Engines: what turns a validated request body into an OpenAI response body."""

from offline_queue.engines.base import Engine, EngineRequest, Reply

__all__ = ["Engine", "EngineRequest", "Reply"]
