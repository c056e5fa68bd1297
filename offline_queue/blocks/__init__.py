"""Prefect blocks: what an operator edits in the UI, and the behaviour each one configures."""

from offline_queue.blocks.engines import VLLM, EngineBlock, OpenAIServer, load_engine_block

__all__ = ["VLLM", "EngineBlock", "OpenAIServer", "load_engine_block"]
