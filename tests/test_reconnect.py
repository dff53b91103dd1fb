"""The reconnect primitive on its own: states, one attempt at a time, backoff reset, kick() and stop()."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from sozud.backoff import Backoff
from sozud.errors import SozuConnectionError
from sozud.log import get_logger
from sozud.reconnect import LinkState, Reconnector
from sozud.testing.cluster import wait_until

HOUR_S = 3600.0


class Ceiling(random.Random):
    """Draws the ceiling every time: the waits are exactly as long as the backoff allows."""

    def uniform(self, a: float, b: float) -> float:
        return b


def hour_backoff() -> Backoff:
    return Backoff(initial_s=HOUR_S, max_s=HOUR_S, rng=Ceiling())


class Peer:
    """A peer that refuses ``refusals`` attempts, then accepts; each accepted connection is a number."""

    def __init__(self, refusals: int = 0) -> None:
        self.refusals = refusals
        self.attempts = 0
        self.closed: list[int] = []
        self.gate: asyncio.Event | None = None  # when set, an attempt waits for it

    async def connect(self, _deadline: float | None) -> int:
        self.attempts += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.refusals > 0:
            self.refusals -= 1
            raise SozuConnectionError("refused", socket_path="peer")
        return self.attempts

    def close(self, conn: int) -> None:
        self.closed.append(conn)


def reconnector(peer: Peer, backoff: Backoff, **kw: Any) -> Reconnector[int]:
    return Reconnector(
        peer.connect,
        close=peer.close,
        fail=lambda message: SozuConnectionError(message, socket_path="peer"),
        backoff=backoff,
        log=get_logger(test="reconnect"),
        event_prefix="test.",
        **kw,
    )


async def test_connects_once_and_reuses_the_connection() -> None:
    peer = Peer()
    r = reconnector(peer, Backoff())
    assert r.state is LinkState.DISCONNECTED
    assert await r.get() == 1 and await r.get() == 1
    assert r.state is LinkState.CONNECTED and peer.attempts == 1


async def test_concurrent_callers_share_one_attempt() -> None:
    peer = Peer()
    peer.gate = asyncio.Event()
    r = reconnector(peer, Backoff())
    first, second = asyncio.create_task(r.get()), asyncio.create_task(r.get())
    await wait_until(lambda: peer.attempts == 1, what="the first attempt")
    assert r.state is LinkState.CONNECTING
    peer.gate.set()
    assert (await first, await second) == (1, 1)
    assert peer.attempts == 1


async def test_backoff_resets_once_connected_and_a_lost_connection_is_replaced() -> None:
    peer = Peer(refusals=2)
    backoff = Backoff(initial_s=0.001, max_s=0.002)
    r = reconnector(peer, backoff)
    assert await r.get() == 3
    assert backoff.attempts == 0, "a success starts the backoff over"
    assert r.lost(3, "test") and peer.closed == [3]
    assert r.state is LinkState.DISCONNECTED
    assert await r.get() == 4


async def test_kick_cuts_the_wait_short() -> None:
    peer = Peer(refusals=1)
    r = reconnector(peer, hour_backoff())
    task = asyncio.create_task(r.get())
    await wait_until(lambda: r.state is LinkState.WAITING, what="a wait after the refusal")
    r.kick()
    await wait_until(task.done, what="kick() to end an hour's wait")
    assert task.result() == 2


async def test_gives_up_after_max_attempts_or_before_the_deadline() -> None:
    r = reconnector(Peer(refusals=10), Backoff(initial_s=0.001, max_s=0.002), max_attempts=3)
    with pytest.raises(SozuConnectionError, match=r"gave up after 3 connection attempt\(s\): .*refused"):
        await r.get()
    r = reconnector(Peer(refusals=10), hour_backoff())
    deadline = asyncio.get_running_loop().time() + 60.0
    with pytest.raises(SozuConnectionError, match=r"gave up after 1 connection attempt"):
        await r.get(deadline)  # an hour's wait cannot fit in a minute: give up at once, never wait


async def test_stop_ends_a_wait_and_refuses_to_connect_again() -> None:
    peer = Peer(refusals=1)
    r = reconnector(peer, hour_backoff())
    task = asyncio.create_task(r.get())
    await wait_until(lambda: r.state is LinkState.WAITING, what="a wait after the refusal")
    assert r.stop() is None
    with pytest.raises(SozuConnectionError, match="closed"):
        await task
    assert r.state is LinkState.STOPPED and peer.attempts == 1
