"""One reconnect primitive: keep one connection up, with an explicit state and a capped, jittered backoff.

    DISCONNECTED ──get()──> CONNECTING ──ok──> CONNECTED ──lost()──> DISCONNECTED
                                │
                                └──failed──> WAITING ──delay over, or kick()──> CONNECTING ...
    any state ──stop()──> STOPPED (terminal: get() raises, a wait in progress ends at once)

- **One attempt at a time.** Attempts run under the primitive's own lock; a caller that finds an attempt
  in progress waits for it and uses its connection. The lock is never held while waiting out a backoff,
  so a caller with a deadline is never stuck behind a caller without one.
- **Capped, jittered backoff that resets on success** (:class:`sozud.backoff.Backoff`), shared by every
  caller: the delay grows with the failures in a row, whoever made them.
- **kick()** cuts every wait in progress short (an outside sign that the peer is back); **stop()** ends
  them and makes the primitive refuse to connect again.
- A caller gives up after ``max_attempts`` failed attempts of its own, or when the next delay would end
  past its deadline; the error is built by ``fail`` (an error of :mod:`sozud.errors` naming the peer).

The primitive knows nothing about sockets: ``connect(deadline)`` opens one connection, ``close(conn)``
closes one, ``alive(conn)`` says whether an idle connection is still usable.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from sozud.backoff import Backoff
from sozud.errors import SozudError

__all__ = ["LinkState", "Reconnector"]

T = TypeVar("T")


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"  # never connected, or lost: the next get() connects
    CONNECTING = "connecting"  # an attempt is in progress
    CONNECTED = "connected"
    WAITING = "waiting"  # the last attempt failed: waiting out the backoff (kick() cuts it short)
    STOPPED = "stopped"  # stop() was called: terminal


def _always_alive(_conn: Any) -> bool:
    return True


class Reconnector(Generic[T]):
    """Keeps one connection of type ``T`` up (see the module docstring).

    ``retry_on``: the exceptions of ``connect`` that count as a failed attempt (others propagate).
    ``describe(error)``: the text of a failure for logs and the give-up message. ``on_connected(conn)``
    runs once per new connection, in state CONNECTED. ``log``: a structlog logger; events are
    ``<event_prefix>connect_failed`` and ``<event_prefix>disconnected``.
    """

    def __init__(
        self,
        connect: Callable[[float | None], Awaitable[T]],
        *,
        close: Callable[[T], None],
        fail: Callable[[str], SozudError],
        backoff: Backoff,
        log: Any,
        event_prefix: str,
        retry_on: tuple[type[BaseException], ...] = (SozudError, OSError),
        describe: Callable[[BaseException], str] = str,
        alive: Callable[[T], bool] = _always_alive,
        on_connected: Callable[[T], None] | None = None,
        max_attempts: int | None = None,
    ) -> None:
        self._connect = connect
        self._close = close
        self._fail = fail
        self.backoff = backoff
        self._log = log
        self._prefix = event_prefix
        self._retry_on = retry_on
        self._describe = describe
        self._alive = alive
        self._on_connected = on_connected
        self.max_attempts = max_attempts
        self.state = LinkState.DISCONNECTED
        self.current: T | None = None
        self.last_failure: str | None = None  # why the last attempt (of any caller) failed
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    @property
    def stopped(self) -> bool:
        return self.state is LinkState.STOPPED

    def usable(self) -> T | None:
        """The current connection if it is up and alive; a dead idle one is dropped (and logged)."""
        conn = self.current
        if conn is None or self.state is not LinkState.CONNECTED:
            return None
        if self._alive(conn):
            return conn
        self.lost(conn, "closed_while_idle")
        return None

    async def get(self, deadline: float | None = None) -> T:
        """The current connection, or a new one: attempts with backoff until one succeeds, the deadline
        (loop time) leaves no room for the next wait, ``max_attempts`` failed, or ``stop()``."""
        loop = asyncio.get_running_loop()
        failed = 0
        while True:
            if self.stopped:
                raise self._fail("closed")
            conn = self.usable()
            if conn is not None:
                return conn
            try:
                async with asyncio.timeout_at(deadline):
                    await self._lock.acquire()
            except TimeoutError:
                raise self._fail("cannot connect: another connection attempt did not finish in time") from None
            try:
                conn = self.usable()
                if conn is not None:
                    return conn  # another caller connected while this one waited for the lock
                if self.stopped:
                    raise self._fail("closed")
                if deadline is not None and loop.time() >= deadline:
                    raise self._fail(self._give_up_text(failed, "no time left to connect"))
                self.state = LinkState.CONNECTING
                try:
                    conn = await self._connect(deadline)
                except self._retry_on as e:
                    if self.stopped:
                        raise self._fail("closed") from None
                    failed += 1
                    delay_s = self._failed(e, failed, deadline, loop.time())
                else:
                    return self._connected(conn)
            finally:
                self._lock.release()
            await self.wait(delay_s)

    def _failed(self, error: BaseException, failed: int, deadline: float | None, now: float) -> float:
        """Log a failed attempt and return the wait before the next one, or raise when giving up."""
        self.state = LinkState.WAITING
        delay_s = self.backoff.next_delay_s()
        give_up = (self.max_attempts is not None and failed >= self.max_attempts) or (
            deadline is not None and now + delay_s >= deadline
        )
        reason = self.last_failure = self._describe(error)
        self._log.warning(
            f"{self._prefix}connect_failed", attempt=failed, error=reason, retry_in_s=None if give_up else delay_s
        )
        if give_up:
            self.state = LinkState.DISCONNECTED
            raise self._fail(self._give_up_text(failed, reason)) from None
        return delay_s

    def _give_up_text(self, failed: int, fallback: str) -> str:
        reason = self.last_failure or fallback
        return f"gave up after {failed} connection attempt(s): {reason}" if failed else reason

    def _connected(self, conn: T) -> T:
        if self.stopped:
            self._close(conn)
            raise self._fail("closed")
        self.backoff.reset()
        self.last_failure = None
        self.current = conn
        self.state = LinkState.CONNECTED
        if self._on_connected is not None:
            self._on_connected(conn)
        return conn

    async def wait(self, delay_s: float) -> None:
        """Wait ``delay_s`` seconds, or less if ``kick()`` or ``stop()`` is called meanwhile."""
        wake = self._wake
        if self.stopped:
            return
        self.state = LinkState.WAITING
        try:
            async with asyncio.timeout(delay_s):
                await wake.wait()
        except TimeoutError:
            pass
        if self.state is LinkState.WAITING:
            self.state = LinkState.DISCONNECTED

    def kick(self) -> None:
        """Cut every wait in progress short: the next attempt starts now."""
        self._wake.set()
        self._wake = asyncio.Event()

    def lost(self, conn: T, reason: str, **context: Any) -> bool:
        """``conn`` failed: close it and, if it was the current connection, go back to DISCONNECTED
        (logged as ``<event_prefix>disconnected`` with ``reason`` and ``context``)."""
        self._close(conn)
        if self.current is not conn:
            return False
        self.current = None
        if self.state is LinkState.CONNECTED:
            self.state = LinkState.DISCONNECTED
            self._log.info(f"{self._prefix}disconnected", reason=reason, **context)
        return True

    def stop(self) -> T | None:
        """Terminal: wake every waiter, refuse to connect again; returns the connection still open (the
        caller closes it, possibly waiting for it)."""
        self.state = LinkState.STOPPED
        conn, self.current = self.current, None
        self.kick()
        return conn
