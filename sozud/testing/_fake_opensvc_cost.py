"""What a write costs the SIMULATED v2 agent, as measured on a real OpenSVC v2.1 agent (issue 11).

The agent keeps every key of an object in one file; after a write through the API it re-reads,
checksums, re-projects and replicates the whole object. Measured with ``sozud key``: a 1.07 MB value
took 0.17 s to write, 3.22 MB 0.41 s, 10.8 MB 2.2 s; after the 10.8 MB write every request took up to
1.6 s for about 11 s, and the first read after the write about 15 s. Modelled here, per MB of the
object's total size (all its keys): ``write_s_per_mb`` for the write itself, a busy window of
``busy_s_per_mb`` after it, during which every request to that agent waits ``busy_request_s_per_mb``
more. The raw listener serves one request at a time (``serialise_raw``), as the real one does.
Defaults are zero (no cost): tests and benchmarks that study agent load set them, e.g. REAL_V2.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

MB = 1_000_000


@dataclass
class AgentCost:
    write_s_per_mb: float = 0.0
    busy_s_per_mb: float = 0.0
    busy_request_s_per_mb: float = 0.0
    serialise_raw: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.write_s_per_mb or self.busy_s_per_mb or self.busy_request_s_per_mb or self.serialise_raw)


# Fitted to the measurements above (10.8 MB: 2.2 s write, ~11 s busy, up to 1.6 s per request).
REAL_V2 = AgentCost(write_s_per_mb=0.2, busy_s_per_mb=1.0, busy_request_s_per_mb=0.15, serialise_raw=True)


@dataclass
class AgentLoad:
    """One agent's state under the cost model."""

    cost: AgentCost
    busy_until: float = 0.0
    busy_delay_s: float = 0.0
    raw_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    busy_time_s: float = 0.0  # total time requests spent waiting on the agent (for benchmarks)

    async def before_request(self) -> None:
        if time.monotonic() < self.busy_until and self.busy_delay_s > 0:
            self.busy_time_s += self.busy_delay_s
            await asyncio.sleep(self.busy_delay_s)

    async def write(self, object_bytes: int) -> None:
        size_mb = object_bytes / MB
        spent = self.cost.write_s_per_mb * size_mb
        self.busy_time_s += spent
        if spent > 0:
            await asyncio.sleep(spent)
        window = self.cost.busy_s_per_mb * size_mb
        if window > 0:
            self.busy_until = max(self.busy_until, time.monotonic() + window)
            self.busy_delay_s = max(
                self.busy_delay_s if time.monotonic() < self.busy_until else 0.0,
                self.cost.busy_request_s_per_mb * size_mb,
            )
