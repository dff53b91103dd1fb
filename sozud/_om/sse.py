"""Server-Sent Events parsing (the subset the OpenSVC agents use: ``event:``, ``data:``, ``id:``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from sozud._om.base import MAX_REPLY_BYTES
from sozud.errors import OpenSVCRefusedError


class SSEEvent(msgspec.Struct, frozen=True):
    """One dispatched event: its type (``message`` when the stream names none) and its data text."""

    event: str
    data: str


class SSETooLarge(Exception):
    """Internal: one event's data exceeds the size bound."""


async def parse_sse(lines: AsyncIterator[str], *, max_bytes: int = MAX_REPLY_BYTES) -> AsyncIterator[SSEEvent]:
    """Events from the stream's lines (line terminators already removed); a blank line dispatches."""
    data: list[str] = []
    size = 0
    event_type = ""
    async for raw_line in lines:
        line = raw_line.rstrip("\r\n")
        if not line:
            if data:
                yield SSEEvent(event=event_type or "message", data="\n".join(data))
            data, size, event_type = [], 0, ""
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            size += len(value) + 1
            if size > max_bytes:
                raise SSETooLarge(f"event data exceeds {max_bytes} bytes")
            data.append(value)
        elif field == "event":
            event_type = value
    # An event cut by the end of the stream is not dispatched (as the SSE specification says).


async def json_events(response: httpx.Response, *, transport: str, obj: str) -> AsyncIterator[tuple[SSEEvent, Any]]:
    """Each event of an SSE response with its data decoded as JSON (``None`` when it is not JSON).

    An event larger than the bound ends the stream with ``OpenSVCRefusedError``.
    """
    try:
        async for event in parse_sse(response.aiter_lines()):
            try:
                payload = msgspec.json.decode(event.data)
            except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
                payload = None
            yield event, payload
    except SSETooLarge as exc:
        raise OpenSVCRefusedError(f"event stream: {exc}", transport=transport, obj=obj) from None
