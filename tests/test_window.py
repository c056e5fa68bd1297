"""The adaptive in-flight window for served engines (window.py): it grows past the knee when
nothing is refused, settles near 2/f under a steady share f of refusals, halves under many."""

from __future__ import annotations

import time

from offline_queue.window import Window


def _window_after(refuse_every: int, replies: int = 3000, cap: int = 64) -> tuple[int, Window]:
    """A window fed replies as a server with a knee at 48 in flight would send them (the more in
    flight, the sooner the next one, up to the knee), one in `refuse_every` a refusal (0:
    none); its size at the end."""
    window = Window(cap=cap)
    for i in range(1, replies + 1):
        time.sleep(0.01 / min(window.limit, 48))
        if refuse_every and i % refuse_every == 0:
            window.overloaded()
        else:
            window.answered()
    return window.limit, window


def test_the_window_grows_past_the_knee_when_nothing_is_refused() -> None:
    assert _window_after(0)[0] >= 48


def test_a_steady_tenth_refused_settles_the_window_near_two_over_the_share() -> None:
    size, window = _window_after(10)
    assert 14 <= size <= 30, window.history[-10:]  # 2 / 0.1 = 20; halving went to ~2.5


def test_half_refused_halves_the_window_down_to_one() -> None:
    size, window = _window_after(2, replies=400)
    assert size <= 2 and any(why == "overloaded" for _, _, why in window.history)
