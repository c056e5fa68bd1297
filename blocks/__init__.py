"""Prefect blocks: what an operator edits in the UI, and the behaviour each one configures."""

from blocks.engines import VLLM, load_engine_block

__all__ = ["VLLM", "load_engine_block"]
