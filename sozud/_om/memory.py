"""An in-memory agent behind the transport interface, for unit tests of the client and its users."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from sozud._om.base import Transport
from sozud._om.v2 import check_text_value
from sozud.errors import OpenSVCError, OpenSVCNotFoundError, OpenSVCUnreachableError

_RESTART = object()


class MemoryTransport(Transport):
    """Objects and keys in a dict. Knobs for tests:

    ``down``: every call raises OpenSVCUnreachableError. ``fail_next``: errors raised, in order, by the
    next calls. ``put_gate``: when set to an unset ``asyncio.Event``, writes wait for it (to observe
    concurrency). ``calls``: every call as ``(operation, object, key)``; ``writes``: every write
    applied, as ``(object, key, value)``. ``max_in_flight``: the largest
    number of concurrent writes seen per object. ``carries_text``: apply the v2 value rule.
    ``restart()`` breaks every event subscription, like an agent restart.
    """

    def __init__(self, name: str = "memory://", *, carries_text: bool = False, has_events: bool = True) -> None:
        self.name = name
        self.carries_text = carries_text
        self.has_events = has_events
        self.objects: dict[str, dict[str, bytes]] = {}
        self.down = False
        self.fail_next: list[OpenSVCError] = []
        self.put_gate: asyncio.Event | None = None
        self.calls: list[tuple[str, str, str | None]] = []
        self.writes: list[tuple[str, str, bytes]] = []
        self.max_in_flight: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._subscribers: list[tuple[str, asyncio.Queue[object]]] = []

    # --- test-side helpers ----------------------------------------------------------------------

    def create_object(self, obj: str) -> None:
        self.objects.setdefault(obj, {})

    def set_value(self, obj: str, key: str, value: bytes) -> None:
        """A change made by someone else (another node, the CLI): stored and announced."""
        self.objects.setdefault(obj, {})[key] = value
        self._announce(obj)

    def restart(self) -> None:
        """Drop every event subscription, as an agent restart does."""
        for _, queue in self._subscribers:
            queue.put_nowait(_RESTART)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    # --- transport ------------------------------------------------------------------------------

    def _enter(self, op: str, obj: str, key: str | None) -> None:
        self.calls.append((op, obj, key))
        if self.down:
            raise OpenSVCUnreachableError("agent is down", transport=self.name, obj=obj, key=key)
        if self.fail_next:
            raise self.fail_next.pop(0)

    def _object(self, obj: str, key: str | None) -> dict[str, bytes]:
        try:
            return self.objects[obj]
        except KeyError:
            raise OpenSVCNotFoundError("object does not exist", transport=self.name, obj=obj, key=key) from None

    def _announce(self, obj: str) -> None:
        for watched, queue in self._subscribers:
            if watched == obj:
                queue.put_nowait(obj)

    async def get_key(self, obj: str, key: str) -> bytes | None:
        self._enter("get", obj, key)
        return self._object(obj, key).get(key)

    async def put_key(self, obj: str, key: str, value: bytes) -> None:
        self._enter("put", obj, key)
        self.check_value(obj, key, value)
        self._in_flight[obj] = self._in_flight.get(obj, 0) + 1
        self.max_in_flight[obj] = max(self.max_in_flight.get(obj, 0), self._in_flight[obj])
        try:
            if self.put_gate is not None:
                await self.put_gate.wait()
            if self.down:  # went down while the write was in flight: not applied
                raise OpenSVCUnreachableError("agent went down", transport=self.name, obj=obj, key=key)
            self._object(obj, key)[key] = bytes(value)
            self.writes.append((obj, key, bytes(value)))
        finally:
            self._in_flight[obj] -= 1
        self._announce(obj)

    async def list_keys(self, obj: str) -> list[str]:
        self._enter("list", obj, None)
        return list(self._object(obj, None))

    def check_value(self, obj: str, key: str, value: bytes) -> None:
        if self.carries_text:
            check_text_value(value, transport=self.name, obj=obj, key=key)

    async def events(self, obj: str, key: str) -> AsyncIterator[None]:
        if not self.has_events:
            raise OpenSVCError("this transport has no event stream", transport=self.name, obj=obj, key=key)
        self._enter("events", obj, key)
        queue: asyncio.Queue[object] = asyncio.Queue()
        entry = (obj, queue)
        self._subscribers.append(entry)
        try:
            yield None
            while True:
                item = await queue.get()
                if item is _RESTART:
                    raise OpenSVCUnreachableError("event stream lost (agent restart)", transport=self.name, obj=obj)
                yield None
        finally:
            self._subscribers.remove(entry)
