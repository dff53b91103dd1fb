"""Capped, jittered exponential backoff, shared by the reconnect primitive and the OpenSVC client."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays drawn under a ceiling of ``initial_s * factor**n``, capped at ``max_s``, with full jitter.

    ``next_delay_s()`` returns the next wait and advances; ``reset()`` after a success starts again
    from ``initial_s``. Full jitter (a uniform draw in ``[0, ceiling]``) keeps many nodes that lost
    the same peer at the same moment from retrying in lockstep.
    """

    initial_s: float = 0.1
    max_s: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay_s(self) -> float:
        try:
            ceiling = min(self.max_s, self.initial_s * (self.factor**self.attempts))
        except OverflowError:  # thousands of failures in a row (sozu down for hours): long past the cap
            ceiling = self.max_s
        self.attempts += 1
        return self.rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.attempts = 0

    def fresh(self) -> Backoff:
        """A backoff with the same settings, starting over, with a random generator of its own."""
        return Backoff(initial_s=self.initial_s, max_s=self.max_s, factor=self.factor)
