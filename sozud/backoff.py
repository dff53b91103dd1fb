"""Capped, jittered exponential backoff, shared by the sozu channel and the OpenSVC client."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays of ``initial_s * factor**n``, capped at ``max_s``, with "full jitter".

    ``next_delay_s()`` returns the next wait and advances; ``reset()`` after a success starts again
    from ``initial_s``. Full jitter (a uniform draw in ``[delay/2, delay]``) keeps many nodes that lost
    the same peer at the same moment from retrying in lockstep.
    """

    initial_s: float = 0.1
    max_s: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay_s(self) -> float:
        ceiling = min(self.max_s, self.initial_s * (self.factor**self.attempts))
        self.attempts += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0
