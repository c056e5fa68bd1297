"""The gate every request passes before any route reads its body: the API key (401), the declared
size (413 before a byte of the body is read), the body counted as it arrives (413 the moment it
passes the limit), and one access-log line per request, refused or not. A pure ASGI middleware,
because FastAPI reads a route's body before its dependencies run: a dependency could only say
401 after a 60 MB upload had been spooled."""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from anyio import to_thread
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from offline_queue.api.auth import rights_for_key
from offline_queue.api.errors import api_error, error_response

if TYPE_CHECKING:
    from offline_queue.api.settings import ApiSettings

ACCESS_LOGGER = "offline_queue.api.access"
_MULTIPART_SLACK = 64 << 10
"""Room for the multipart framing and form fields around an upload's file bytes."""


def access_log(settings: ApiSettings) -> logging.Logger:
    """Our own logger with its own handler, not propagating: Prefect's logging setup (which
    runs when the first batch starts in this process) replaces uvicorn's and the root's
    handlers, and uvicorn's access log went silent with them. Re-asserted on every call, so
    nothing configured later can switch it off."""
    target = str(settings.access_log or "")
    # A log file of its own has a logger of its own (two apps in one process, as in tests).
    name = (
        f"{ACCESS_LOGGER}.{hashlib.sha256(target.encode()).hexdigest()[:8]}"
        if target
        else ACCESS_LOGGER
    )
    log = logging.getLogger(name)
    if not any(getattr(h, "offline_queue_access", False) for h in log.handlers):
        handler: logging.Handler = (
            logging.FileHandler(settings.access_log)
            if settings.access_log
            else logging.StreamHandler(sys.stderr)
        )
        handler.offline_queue_access = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s access %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    log.disabled = False
    return log


def _printable(text: str, limit: int = 200) -> str:
    """A path as a log line can hold it: escaped, bounded (it is the caller's input)."""
    return text[:limit].encode("unicode_escape").decode("ascii")


def body_limit(settings: ApiSettings, method: str, path: str) -> int:
    if method == "POST" and path == "/v1/files":
        return settings.limits.max_file_bytes + _MULTIPART_SLACK
    return settings.max_json_bytes


HEALTH = "/health"
"""A path that needs no key: it says the server is up, and nothing else."""
METRICS = "/metrics"
"""Not here: a 404 with or without a key. Prometheus scrapes a listener of its own
(ApiSettings.metrics_port), so no tenant reads every tenant's figures."""


class Gate:
    def __init__(self, app: ASGIApp, settings: ApiSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.monotonic()
        seen: dict[str, Any] = {"status": 0, "tenant": None}

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_and_note, seen)
        finally:
            access_log(self.settings).info(
                "%s %s %s tenant=%s %.1fms",
                scope.get("method", "-"),
                _printable(scope.get("path", "")),
                seen["status"] or "-",
                seen["tenant"] or "-",
                (time.monotonic() - began) * 1000,
            )

    async def _handle(self, scope: Scope, receive: Receive, send: Send, seen: dict) -> None:
        if scope["path"] == HEALTH and scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if scope["path"] == METRICS:
            response = error_response(
                404, "/metrics is served on the metrics listener, not the API's port", "not_found"
            )
            await response(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = auth.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            response = error_response(
                401, "no API key: send Authorization: Bearer <key>", "invalid_api_key"
            )
            await response(scope, receive, send)
            return
        rights = None
        if len(key) <= 256 and key.isascii():
            rights = await to_thread.run_sync(rights_for_key, self.settings.db, key)
        if rights is None:
            await error_response(401, "invalid API key", "invalid_api_key")(scope, receive, send)
            return
        seen["tenant"] = rights.tenant
        scope.setdefault("state", {})["rights"] = rights

        limit = body_limit(self.settings, scope["method"], scope["path"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or len(declared) > 19:
                response = error_response(400, "Content-Length: not a size", "invalid_request")
                await response(scope, receive, send)
                return
            if int(declared) > limit:
                response = error_response(
                    413, f"the body is over {limit} bytes", "request_too_large"
                )
                await response(scope, receive, send)
                return
        read = 0

        async def counted() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    raise api_error(413, f"the body is over {limit} bytes", "request_too_large")
            return message

        await self.app(scope, counted, send)
