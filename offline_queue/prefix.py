"""Prefix keys: a sortable key per request such that requests sharing a longer rendered prefix
sort next to each other, so claims (store/claims.py) hand the engine those requests together and
its prefix cache computes each shared prefix once.
(docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

_DEPTHS = (256, 1024, 4096)
"""Characters of the rendered conversation at which a segment is cut (beyond the system)."""
_SEGMENT = 8
"""Hex characters per segment: 32 bits, enough that unrelated prefixes rarely interleave."""
KEY_LENGTH = _SEGMENT * (1 + len(_DEPTHS))


def _text(content: Any) -> str:
    return content if isinstance(content, str) else orjson.dumps(content).decode()


def render(dumped: dict[str, Any]) -> tuple[str, str]:
    """(the leading system/developer messages, the whole rendered prompt) of a body as
    `validate_line` dumps it. Not the chat template: a stand-in with the
    same prefix structure (equal prefixes render equal, and diverge where the messages do)."""
    messages = dumped.get("messages")
    if messages is None and "input" in dumped:  # embeddings; responses (with instructions)
        instructions = _text(dumped.get("instructions", ""))
        return instructions, instructions + _text(dumped["input"])
    if messages is None:
        prompt = _text(dumped.get("prompt", ""))
        return "", prompt
    parts: list[str] = []
    system_end = 0
    leading = True
    for m in messages:
        role = m.get("role", "")
        parts.append(f"\x1e{role}\x1f{_text(m.get('content', ''))}")
        if leading and role in ("system", "developer"):
            system_end = len(parts)
        else:
            leading = False
    return "".join(parts[:system_end]), "".join(parts)


def prefix_key(dumped: dict[str, Any]) -> str:
    """The request's sortable prefix key (docs/ARCHITECTURE.md, `offline_queue/prefix.py`)."""
    system, whole = render(dumped)
    h = hashlib.blake2b(str(dumped.get("model", "")).encode() + b"\x00" + system.encode())
    segments = [h.hexdigest()[:_SEGMENT]]
    # One running hash of the prompt, read at each depth: the digest of whole[:depth], without
    # hashing its start again; a prompt that ends before a depth has that segment already.
    h, cut, segment = hashlib.blake2b(digest_size=8), 0, ""
    for depth in _DEPTHS:
        if not segment or cut < len(whole):
            h.update(whole[cut:depth].encode())
            cut, segment = depth, h.hexdigest()[:_SEGMENT]
        segments.append(segment)
    return "".join(segments)
