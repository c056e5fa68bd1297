"""How long a retry waits: our own backoff (RetryPolicy: doubling, capped, jittered) and a
server's Retry-After header, in seconds or as an HTTP date."""

from __future__ import annotations

import email.utils
import random
import time

import httpx

from offline_queue.engines.openai_http import _retry_after
from offline_queue.retry import RetryPolicy

# ---- RetryPolicy -------------------------------------------------------------------------


def samples(policy: RetryPolicy, attempts: int, n: int = 400) -> list[float]:
    return [policy.delay(attempts) for _ in range(n)]


def test_each_retry_waits_about_twice_as_long() -> None:
    random.seed(1)
    policy = RetryPolicy(base_seconds=1.0, cap_seconds=1000.0)
    for attempts in range(1, 8):
        raw = 2.0 ** (attempts - 1)
        got = samples(policy, attempts)
        assert all(0.5 * raw <= d <= 1.5 * raw for d in got), attempts
        assert 0.9 * raw < sum(got) / len(got) < 1.1 * raw  # centred on the doubling
    # Two doublings apart, the ranges no longer overlap: waits really grow.
    assert max(samples(policy, 3)) < min(samples(policy, 5))
    assert min(samples(policy, 0)) >= 0.5 and max(samples(policy, 0)) <= 1.5  # as attempt 1


def test_no_wait_is_longer_than_the_cap() -> None:
    random.seed(2)
    policy = RetryPolicy(base_seconds=1.0, cap_seconds=10.0)
    for attempts in (4, 5, 6, 30):  # raw 8 s (its jitter reaches past the cap), then the cap
        assert max(samples(policy, attempts)) <= 10.0
    at_cap = samples(policy, 30)
    assert min(at_cap) >= 5.0
    # Still spread out at the cap, not piled up on it: a shared outage must not end in a herd.
    assert len({round(d, 3) for d in at_cap}) > 300
    assert sum(1 for d in at_cap if d == 10.0) < 5


def test_jitter_spreads_over_the_whole_window() -> None:
    random.seed(3)
    got = samples(RetryPolicy(base_seconds=2.0, cap_seconds=60.0), 2, n=2000)  # raw 4 s
    assert min(got) < 2.1 and max(got) > 5.9
    assert 0.4 < sum(1 for d in got if d < 4.0) / len(got) < 0.6


# ---- Retry-After -------------------------------------------------------------------------


def answer(retry_after: str | None) -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return httpx.Response(429, headers=headers)


def test_retry_after_in_seconds() -> None:
    assert _retry_after(answer("7")) == 7.0
    assert _retry_after(answer(" 0 ")) == 0.0
    assert _retry_after(answer("1.5")) == 1.5
    assert _retry_after(answer("-3")) == 0.0  # never a negative sleep


def test_retry_after_as_an_http_date() -> None:
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    got = _retry_after(answer(soon))
    assert got is not None and 27 <= got <= 31
    assert _retry_after(answer("Wed, 21 Oct 2015 07:28:00 GMT")) == 0.0  # in the past
    unknown_zone = email.utils.formatdate(time.time() + 60).replace("+0000", "-0000")
    got = _retry_after(answer(unknown_zone))
    assert got is not None and 57 <= got <= 61  # read as UTC, not as local time


def test_retry_after_missing_or_garbage_means_our_own_backoff() -> None:
    assert _retry_after(answer(None)) is None
    assert _retry_after(answer("")) is None
    assert _retry_after(answer("soon")) is None
    assert _retry_after(answer("inf")) is None
    assert _retry_after(answer("nan")) is None
