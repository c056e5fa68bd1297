"""Loopback addresses for the instruments' services: a free port, and whether an HTTP service
there answers. Every instrument listens on 127.0.0.1 only; nothing here reaches further."""

from __future__ import annotations

import socket

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
