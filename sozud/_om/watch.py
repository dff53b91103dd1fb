"""The change watch of ``OMClient.changes``: "this key may have changed", from the agent's event stream or,
without one, from polling the key, plus the projected file when one is set.

Each source is a loop that never ends by itself and waits out a capped, jittered backoff
(:class:`sozud.backoff.Backoff`, named constants below) after a failure. They are not
:class:`sozud.reconnect.Reconnector` clients: an event stream is an async generator that must be closed
by awaiting it, a stream the agent accepts then drops at once must keep backing off (the backoff starts
over only after :data:`STABLE_STREAM_S` up, not on every successful open), and polling holds no
connection at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncGenerator
from typing import Any

from sozud._om.base import OMSettings, Transport
from sozud.backoff import Backoff
from sozud.errors import OpenSVCError, OpenSVCUnreachableError
from sozud.log import get_logger

__all__ = ["ChangeWatch"]

# The event stream: the first wait after a loss (doubling up to ``reconnect_max_s``); a stream that stayed
# up this long counts as healthy, and the backoff starts over.
EVENTS_RETRY_INITIAL_S = 0.2
STABLE_STREAM_S = 30.0
# Polling: the first wait after a failed read (doubling up to ``reconnect_max_s``, at most the poll interval).
POLL_RETRY_INITIAL_S = 0.2
# The projected file: the first wait after its directory could not be watched (up to ``reconnect_max_s``),
# and watchfiles' debounce and step.
FILE_WATCH_RETRY_INITIAL_S = 0.5
FILE_DEBOUNCE_MS = 200
FILE_STEP_MS = 50


def _log() -> Any:
    return get_logger()  # looked up at each use: configure_logging() may run after import


class ChangeWatch:
    """The sources of one ``OMClient``'s watch: ``events_transport``'s stream when there is one, else polls
    of ``transport`` every ``settings.poll_interval_s``; waits capped at ``reconnect_max_s``."""

    def __init__(
        self,
        transport: Transport,
        events_transport: Transport | None,
        settings: OMSettings,
        reconnect_max_s: float,
    ) -> None:
        self.transport = transport
        self.events_transport = events_transport
        self.settings = settings
        self.reconnect_max_s = reconnect_max_s

    async def run(self, obj: str, key: str, projected: str | None) -> AsyncGenerator[None, None]:
        """See ``OMClient.changes``; ``projected``: the absolute path of the projected file, or None."""
        wake = asyncio.Event()
        stop = asyncio.Event()
        sources: list[asyncio.Task[None]] = []
        if self.events_transport is not None:
            sources.append(asyncio.create_task(self._watch_events(self.events_transport, obj, key, wake)))
        else:
            sources.append(asyncio.create_task(self._poll(obj, key, wake)))
        if projected is not None:
            sources.append(asyncio.create_task(self._watch_file(projected, wake, stop)))
        try:
            while True:
                waiter = asyncio.create_task(wake.wait())
                try:
                    await asyncio.wait([waiter, *sources], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                for source in sources:
                    if source.done():  # sources loop forever: one that stopped has crashed
                        source.result()
                        raise AssertionError("a change source ended")
                wake.clear()
                yield None
        finally:
            stop.set()
            for source in sources:
                source.cancel()
            await asyncio.gather(*sources, return_exceptions=True)

    async def _watch_events(self, transport: Transport, obj: str, key: str, wake: asyncio.Event) -> None:
        backoff = Backoff(initial_s=EVENTS_RETRY_INITIAL_S, max_s=self.reconnect_max_s)
        loop = asyncio.get_running_loop()
        lost = False
        while True:
            started_s = loop.time()
            max_idle_s = self.settings.events_max_idle_s
            idle = asyncio.timeout_at(loop.time() + max_idle_s)
            try:
                signals = 0
                async with idle:
                    async for _ in transport.events(obj, key):
                        idle.reschedule(loop.time() + max_idle_s)
                        signals += 1
                        if signals == 1 and lost:
                            _log().info("opensvc.events_reconnected", transport=transport.name, obj=obj)
                        wake.set()
                raise OpenSVCUnreachableError("event stream ended", transport=transport.name, obj=obj)
            except TimeoutError:
                if not idle.expired():
                    raise
                _log().debug("opensvc.events_reopened", transport=transport.name, obj=obj, idle_s=max_idle_s)
                backoff.reset()
                lost = False
                continue
            except OpenSVCError as exc:
                if loop.time() - started_s >= STABLE_STREAM_S:
                    backoff.reset()
                delay_s = backoff.next_delay_s()
                lost = True
                _log().warning(
                    "opensvc.events_lost",
                    transport=transport.name,
                    obj=obj,
                    error=str(exc),
                    retry_in_s=round(delay_s, 3),
                )
            await asyncio.sleep(delay_s)

    async def _poll(self, obj: str, key: str, wake: asyncio.Event) -> None:
        backoff = Backoff(
            initial_s=POLL_RETRY_INITIAL_S, max_s=min(self.reconnect_max_s, self.settings.poll_interval_s)
        )
        last: bytes | None = None
        known = False
        while True:
            try:
                value = await self.transport.get_key(obj, key)
            except OpenSVCError as exc:
                known = False  # whatever comes back next is news
                delay_s = backoff.next_delay_s()
                _log().warning(
                    "opensvc.poll_failed", transport=self.transport.name, obj=obj, key_name=key, error=str(exc)
                )
            else:
                digest = None if value is None else hashlib.sha256(value).digest()
                if not known or digest != last:
                    wake.set()
                last, known = digest, True
                backoff.reset()
                delay_s = self.settings.poll_interval_s
            await asyncio.sleep(delay_s)

    async def _watch_file(self, target: str, wake: asyncio.Event, stop: asyncio.Event) -> None:
        import watchfiles

        backoff = Backoff(initial_s=FILE_WATCH_RETRY_INITIAL_S, max_s=self.reconnect_max_s)

        def concerns(_change: watchfiles.Change, changed: str) -> bool:
            return changed == target

        while not stop.is_set():
            try:
                async for _ in watchfiles.awatch(
                    os.path.dirname(target),
                    watch_filter=concerns,
                    debounce=FILE_DEBOUNCE_MS,
                    step=FILE_STEP_MS,
                    stop_event=stop,
                    recursive=False,
                ):
                    backoff.reset()
                    wake.set()
            except (OSError, RuntimeError) as exc:  # directory missing or unwatchable
                _log().warning("opensvc.projected_file_unwatchable", path=target, error=str(exc))
            await asyncio.sleep(backoff.next_delay_s())
