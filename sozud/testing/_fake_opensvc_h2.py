"""A small HTTP/2 server (prior knowledge, any stream transport) for the OpenSVC simulator.

One ``H2ServerConnection`` per accepted connection. Requests are handed to an async handler once
their body is complete; the handler returns an ``H2Response``, an ``H2EventStream`` (headers, then
chunks until the connection goes), ``HOLD`` (never answer) or ``DROP`` (close the whole connection).

``ack_received_data=False`` reproduces the v2 agent's quirk: the server never sends WINDOW_UPDATE for
request bodies, so a connection carries at most 65,535 bytes of bodies over its whole life and the
request that would cross that is never answered (its client waits for window forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from sozud.log import get_logger

SERVER_HEADER = "opensvc-h2-server/1.0"
_log = get_logger(component="fake_opensvc.h2")


class Verdict(Enum):
    HOLD = "hold"  # never answer this request
    DROP = "drop"  # close the whole connection, no reply


HOLD = Verdict.HOLD
DROP = Verdict.DROP


@dataclass
class H2Request:
    stream_id: int
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes = b""
    tls_client_cert: bool = False

    def query_first(self, name: str) -> str | None:
        for key, value in self.query:
            if key == name:
                return value
        return None


@dataclass
class H2Response:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class H2EventStream:
    status: int
    content_type: str
    chunks: AsyncIterator[bytes]


Handler = Callable[[H2Request], Awaitable[H2Response | H2EventStream | Verdict]]
EarlyCheck = Callable[[H2Request], H2Response | None]


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


@dataclass
class _Stream:
    request: H2Request
    body: bytearray = field(default_factory=bytearray)
    answered: bool = False
    task: asyncio.Task[None] | None = None


class H2ServerConnection:
    """Serves one HTTP/2 connection until EOF, a protocol error, ``DROP`` or ``close()``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: Handler,
        *,
        ack_received_data: bool,
        max_body_bytes: int | None = None,
        early_check: EarlyCheck | None = None,
        too_large: Callable[[], H2Response] | None = None,
        tls_client_cert: bool = False,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._ack = ack_received_data
        self._max_body = max_body_bytes
        self._early_check = early_check
        self._too_large = too_large
        self._tls_client_cert = tls_client_cert
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True)
        )
        self._streams: dict[int, _Stream] = {}
        self._window = asyncio.Event()
        self._closed = False
        self._peer_gone = False

    # --- life cycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            self._conn.initiate_connection()
            self._flush()
            while not self._closed and not self._peer_gone:
                try:
                    data = await self._reader.read(65536)
                except (ConnectionError, OSError):
                    break
                if not data:
                    break
                try:
                    events = self._conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self._flush()  # GOAWAY
                    break
                for event in events:
                    self._on_event(event)
                self._flush()
        finally:
            self.close()

    def close(self) -> None:
        """Abort the connection (peers see a reset/EOF) and cancel every stream task."""
        if self._closed:
            return
        self._closed = True
        for stream in self._streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self._window.set()
        with contextlib.suppress(Exception):
            self._writer.transport.abort()

    # --- incoming --------------------------------------------------------------------------------

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None and not stream.answered:
                stream.answered = True
                stream.request.body = bytes(stream.body)
                stream.task = asyncio.get_running_loop().create_task(self._serve(stream))
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.pop(event.stream_id or 0, None)
            if stream is not None and stream.task is not None:
                stream.task.cancel()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._peer_gone = True  # GOAWAY from the client: stop reading, then close()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id or 0
        headers: dict[str, str] = {}
        for name, value in event.headers or []:
            headers[_text(name).lower()] = _text(value)
        target = headers.get(":path", "/")
        split = urllib.parse.urlsplit(target)
        request = H2Request(
            stream_id=stream_id,
            method=headers.get(":method", "GET"),
            path=urllib.parse.unquote(split.path),
            query=urllib.parse.parse_qsl(split.query, keep_blank_values=True),
            headers=headers,
            tls_client_cert=self._tls_client_cert,
        )
        stream = _Stream(request)
        self._streams[stream_id] = stream
        if self._early_check is not None:
            early = self._early_check(request)
            if early is not None:
                stream.answered = True
                stream.task = asyncio.get_running_loop().create_task(self._respond(stream_id, early))

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id or 0
        if self._ack and event.flow_controlled_length:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        stream = self._streams.get(stream_id)
        if stream is None or stream.answered:
            return
        stream.body += event.data or b""
        if self._max_body is not None and len(stream.body) > self._max_body and self._too_large is not None:
            stream.answered = True
            stream.body = bytearray()
            stream.task = asyncio.get_running_loop().create_task(self._respond(stream_id, self._too_large()))

    # --- outgoing --------------------------------------------------------------------------------

    async def _serve(self, stream: _Stream) -> None:
        try:
            result = await self._handler(stream.request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a handler bug must not kill the server
            _log.error("fake_opensvc.handler_failed", error=repr(exc), path=stream.request.path)
            result = H2Response(500, b'{"status": 500, "error": "simulator handler failed"}')
        if result is DROP:
            self.close()
            return
        if result is HOLD:
            return
        if isinstance(result, H2EventStream):
            await self._stream_events(stream.request.stream_id, result)
        elif isinstance(result, H2Response):
            await self._respond(stream.request.stream_id, result)

    async def _respond(self, stream_id: int, response: H2Response) -> None:
        headers = [(":status", str(response.status)), ("server", SERVER_HEADER)]
        if response.content_type is not None:
            headers.append(("content-type", response.content_type))
        if response.status not in (204, 304):
            headers.append(("content-length", str(len(response.body))))
        headers.extend(response.headers)
        try:
            self._conn.send_headers(stream_id, headers, end_stream=not response.body)
            self._flush()
            await self._send_data(stream_id, response.body, end_stream=True)
        except (h2.exceptions.ProtocolError, ConnectionError):
            return
        finally:
            self._streams.pop(stream_id, None)

    async def _stream_events(self, stream_id: int, stream: H2EventStream) -> None:
        headers = [(":status", str(stream.status)), ("server", SERVER_HEADER), ("content-type", stream.content_type)]
        try:
            self._conn.send_headers(stream_id, headers)
            self._flush()
            async for chunk in stream.chunks:
                await self._send_data(stream_id, chunk, end_stream=False)
        except (h2.exceptions.ProtocolError, ConnectionError):
            return
        finally:
            aclose = getattr(stream.chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _send_data(self, stream_id: int, data: bytes, *, end_stream: bool) -> None:
        view = memoryview(data)
        while view:
            if self._closed:
                raise ConnectionError("connection closed")
            window = min(self._conn.local_flow_control_window(stream_id), self._conn.max_outbound_frame_size)
            if window <= 0:
                self._window.clear()
                await self._window.wait()
                continue
            chunk, view = view[:window], view[window:]
            self._conn.send_data(stream_id, bytes(chunk), end_stream=end_stream and not view)
            self._flush()
            await self._writer.drain()

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and not self._closed and not self._writer.is_closing():
            self._writer.write(data)
