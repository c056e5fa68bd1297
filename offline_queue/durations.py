"""Durations as people write them — `24h`, `30m`, `90s`, `7d` — in one grammar: a batch's
completion window (the API) and a GPU-time report's window (`gpu-time --since`)."""

from __future__ import annotations

import re

_DURATION = re.compile(r"\A([1-9][0-9]{0,5})([smhd])\Z", re.ASCII)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> int | None:
    """Seconds of a duration like 24h; None when the text is not one (ASCII digits, 1 to 6 of
    them, then one of s, m, h, d)."""
    found = _DURATION.match(text)
    return int(found.group(1)) * _UNIT[found.group(2)] if found else None
