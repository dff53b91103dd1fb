"""Backoff: capped exponential growth, full jitter, reset after a success."""

from __future__ import annotations

import random

from sozud.backoff import Backoff


def test_full_jitter_draws_from_zero_to_the_ceiling() -> None:
    """Full jitter: each delay is uniform in [0, ceiling], so about half of them fall below ceiling/2."""
    backoff = Backoff(initial_s=1.0, max_s=8.0, rng=random.Random(9))
    firsts = []
    for _ in range(400):
        firsts.append(backoff.next_delay_s())
        backoff.reset()
    assert all(0.0 <= d <= 1.0 for d in firsts)
    below_half = sum(1 for d in firsts if d < 0.5)
    assert 120 < below_half < 280, f"{below_half} of 400 first delays below ceiling/2: not uniform on [0, 1]"


def test_ceiling_grows_then_is_capped_and_reset_starts_over() -> None:
    backoff = Backoff(initial_s=0.5, max_s=3.0, factor=2.0, rng=random.Random(1))
    ceilings = [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    delays = [backoff.next_delay_s() for _ in ceilings]
    assert all(0.0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert backoff.attempts == len(ceilings)
    backoff.reset()
    assert backoff.attempts == 0 and backoff.next_delay_s() <= 0.5


def test_hours_of_failures_stay_at_the_cap() -> None:
    """An unbounded retry loop (sozu down for a day) must keep drawing delays, not overflow the float."""
    backoff = Backoff(initial_s=0.1, max_s=30.0, attempts=5000, rng=random.Random(3))
    assert 0.0 <= backoff.next_delay_s() <= 30.0
