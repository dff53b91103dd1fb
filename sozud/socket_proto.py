"""The asyncio client of sozu's command channel (docs/sozu-command-protocol.md §2, §3, §10-§12).

Three layers, bottom up:

- **Framing** (``ProtobufFraming``, ``JsonFraming``): bytes <-> ``pb.Request`` / ``pb.Response``.
  1.x/2.x: an 8-byte little-endian length that counts itself, then protobuf. 0.15: sozu's serde JSON
  followed by one NUL. Both readers cap what they buffer at ``max_frame_bytes`` and turn every bad
  frame into ``SozuProtocolError`` and every EOF into ``SozuConnectionError``; neither ever hangs on
  garbage (a declared length is checked before anything is read).
- **Exchange** (``SozuChannel.request``): one request, then frames until ``OK`` or ``FAILURE``. sozu has
  no request id and 1.x/2.x silently drop all but the last of several frames read together, so exactly
  one request is in flight on the connection (an ``asyncio.Lock``), and every request has a timeout.
  After a timeout, a bad frame, an EOF or a cancellation the stream's position is unknown: the
  connection is dropped and the next request reconnects, so a late answer is never attributed to the
  next request.
- **Connection life cycle**: a ``Reconnector`` (``sozud.reconnect``) holds the state
  (``DISCONNECTED`` -> ``CONNECTING`` -> ``CONNECTED``, ``WAITING`` out a capped, jittered backoff
  after a failed attempt, ``STOPPED`` after ``aclose()``). ``epoch`` + 1 on every connection, listeners
  called on a *re*-connection. Connecting never holds the request lock: one attempt at a time runs
  under the reconnector's lock, and the waits between attempts hold no lock at all.

One connection carries every request: several active connections make real sozu stall requests for
``worker_timeout`` (§11.5). Events (``subscribe_events``) need their own connection, since sozu sends
them as ``PROCESSING`` frames (§3.6).

Version detection (``version=None``): the first frame is a protobuf ``list_listeners`` (main-only,
answered by every version; ``status`` would wait on the workers). A 0.15 main process splits its input
on NUL, cannot parse the first chunk and closes the connection: the client then reconnects in JSON
mode and confirms with a JSON ``list_listeners``. Among protobuf versions, 2.x listeners carry fields
1.x does not have (HTTP/HTTPS ``elide_x_real_ip``/``send_x_real_ip``, HTTPS ``alpn_protocols``); when
the listeners say nothing (none, or TCP only), a ``query_health_checks`` probe on a throw-away
connection decides: 2.x answers it, 1.x never does (an unknown request type gets no answer). The
exact patch version cannot be known: the family's representative (0.15.19, 1.1.1 or 2.1.0) is used.
An auto-detected version is detected again after every reconnection (sozu may have been upgraded).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from google.protobuf.message import DecodeError, EncodeError, Message

from sozud import serde
from sozud.backoff import Backoff
from sozud.errors import (
    ConfigError,
    SozuConnectionError,
    SozuError,
    SozuProtocolError,
    SozuRequestError,
    SozuTimeoutError,
    SozuUnsupportedError,
    StateError,
)
from sozud.log import get_logger
from sozud.proto import command_pb2 as pb
from sozud.reconnect import LinkState, Reconnector
from sozud.redact import redact_text
from sozud.versions import V0_15_19, V1_1_1, V2_1_0, SozuVersion

__all__ = [
    "DETECT_PROBE_TIMEOUT_S",
    "JsonFraming",
    "ProtobufFraming",
    "Reply",
    "SozuChannel",
    "make_framing",
    "request_summary",
]

_HEADER = struct.Struct("<Q")
HEADER_BYTES = _HEADER.size  # 8: size_of::<usize>() on every 64-bit sozu build

# How long the throw-away ``query_health_checks`` probe waits before concluding "1.x" (1.x never answers).
DETECT_PROBE_TIMEOUT_S = 1.0

# Request types sozu never answers with a final frame (§3.2, §11.2): refused before sending.
_NEVER_ANSWERED = {
    "launch_worker": "sozu never answers launch_worker",
    "return_listen_sockets": "sozu never answers return_listen_sockets",
    "subscribe_events": "subscriptions never get a final answer; use SozuChannel.subscribe_events()",
}

_STATUS_NAMES = {pb.OK: "OK", pb.PROCESSING: "PROCESSING", pb.FAILURE: "FAILURE"}


@dataclass
class Reply:
    """The final ``OK`` frame of one request, and the ``PROCESSING`` frames that came before it."""

    response: pb.Response
    processing: list[pb.Response] = field(default_factory=list)


# --- framing --------------------------------------------------------------------------------------------

# PROCESSING frames kept per request (sozu sends a few), and the most accepted before giving up on a peer.
MAX_PROCESSING_KEPT = 16
MAX_PROCESSING_FRAMES = 10_000


class Framing(Protocol):
    """Bytes <-> messages for one protocol family; errors name ``socket_path``."""

    family: str
    socket_path: str

    def encode(self, req: pb.Request) -> bytes: ...

    async def read(self, reader: asyncio.StreamReader) -> pb.Response: ...


def _check_response(resp: pb.Response, socket_path: str, what: str) -> pb.Response:
    if not resp.IsInitialized():
        errors: list[str] = []
        check: Callable[[list[str]], bool] = resp.IsInitialized  # type: ignore[assignment]
        check(errors)  # the runtime fills in the paths of the missing fields
        missing = ", ".join(errors) or "?"
        raise SozuProtocolError(f"{what}: response lacks required fields ({missing})", socket_path=socket_path)
    return resp


class ProtobufFraming:
    """sozu 1.x/2.x: u64 little-endian total length (prefix included) + protobuf payload."""

    family = "protobuf"

    def __init__(self, *, socket_path: str, max_frame_bytes: int) -> None:
        self.socket_path = socket_path
        self.max_frame_bytes = max_frame_bytes

    def encode(self, req: pb.Request) -> bytes:
        try:
            body = req.SerializeToString(deterministic=True)
        except EncodeError as e:
            raise SozuProtocolError(
                f"{serde.request_kind(req)} cannot be encoded: {e}", socket_path=self.socket_path
            ) from None
        return _HEADER.pack(len(body) + HEADER_BYTES) + body

    def decode_length(self, header: bytes) -> int:
        (length,) = _HEADER.unpack(header)
        if length < HEADER_BYTES:
            raise SozuProtocolError(
                f"frame declares {length} bytes, less than its own {HEADER_BYTES}-byte length prefix",
                socket_path=self.socket_path,
            )
        if length > self.max_frame_bytes:
            raise SozuProtocolError(
                f"frame declares {length} bytes, more than max_frame_bytes={self.max_frame_bytes}",
                socket_path=self.socket_path,
            )
        return int(length)

    def decode_payload(self, payload: bytes) -> pb.Response:
        resp = pb.Response()
        try:
            resp.ParseFromString(payload)
        except DecodeError as e:
            raise SozuProtocolError(
                f"undecodable protobuf Response ({len(payload)} bytes): {e}", socket_path=self.socket_path
            ) from None
        return _check_response(resp, self.socket_path, "protobuf frame")

    async def read(self, reader: asyncio.StreamReader) -> pb.Response:
        header = await _read_exactly(reader, HEADER_BYTES, self.socket_path, "length prefix")
        length = self.decode_length(header)
        payload = await _read_exactly(reader, length - HEADER_BYTES, self.socket_path, f"{length}-byte frame")
        return self.decode_payload(payload)


class JsonFraming:
    """sozu 0.15: serde JSON (compact) + one NUL, both directions."""

    family = "json"
    _encoder = msgspec.json.Encoder()

    def __init__(self, *, socket_path: str, max_frame_bytes: int, version: SozuVersion = V0_15_19) -> None:
        self.socket_path = socket_path
        self.max_frame_bytes = max_frame_bytes
        self.version = version

    def encode(self, req: pb.Request) -> bytes:
        try:
            value = serde.to_json(req, self.version)
        except StateError as e:
            raise SozuUnsupportedError(str(e), socket_path=self.socket_path) from None
        return self._encoder.encode(value) + b"\0"

    def decode_chunk(self, chunk: bytes) -> pb.Response:
        """One frame without its NUL."""
        try:
            value = msgspec.json.decode(chunk)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as e:
            raise SozuProtocolError(
                f"undecodable JSON frame ({len(chunk)} bytes): {e}", socket_path=self.socket_path
            ) from None
        try:
            resp = serde.from_json(pb.Response, value, self.version, source="JSON frame")
        except StateError as e:
            raise SozuProtocolError(f"not a Response: {e}", socket_path=self.socket_path) from None
        return _check_response(resp, self.socket_path, "JSON frame")

    async def read(self, reader: asyncio.StreamReader) -> pb.Response:
        try:
            chunk = await reader.readuntil(b"\0")
        except asyncio.LimitOverrunError:
            raise SozuProtocolError(
                f"JSON frame longer than max_frame_bytes={self.max_frame_bytes} (no NUL terminator)",
                socket_path=self.socket_path,
            ) from None
        except asyncio.IncompleteReadError as e:
            raise _eof(self.socket_path, len(e.partial), None, "JSON frame") from None
        except OSError as e:
            raise SozuConnectionError(f"read failed: {e}", socket_path=self.socket_path) from None
        if len(chunk) > self.max_frame_bytes:
            raise SozuProtocolError(
                f"JSON frame of {len(chunk)} bytes, more than max_frame_bytes={self.max_frame_bytes}",
                socket_path=self.socket_path,
            )
        return self.decode_chunk(chunk[:-1])


def _eof(socket_path: str, got: int, expected: int | None, what: str) -> SozuConnectionError:
    if got == 0:
        return SozuConnectionError("connection closed by sozu", socket_path=socket_path)
    of = f" of {expected}" if expected is not None else ""
    return SozuConnectionError(
        f"connection closed in the middle of a {what} ({got}{of} bytes received)", socket_path=socket_path
    )


async def _read_exactly(reader: asyncio.StreamReader, n: int, socket_path: str, what: str) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise _eof(socket_path, len(e.partial), n, what) from None
    except OSError as e:
        raise SozuConnectionError(f"read failed: {e}", socket_path=socket_path) from None


def make_framing(version: SozuVersion, *, socket_path: str, max_frame_bytes: int) -> Framing:
    if version.json_socket:
        return JsonFraming(socket_path=socket_path, max_frame_bytes=max_frame_bytes, version=version)
    return ProtobufFraming(socket_path=socket_path, max_frame_bytes=max_frame_bytes)


# --- request descriptions (never a private key) -----------------------------------------------------------

# Fields safe to show in a summary; certificates and keys are never among them.
_SUMMARY_FIELDS = (
    "cluster_id",
    "backend_id",
    "hostname",
    "path",
    "method",
    "address",
    "proxy",
    "old_fingerprint",
    "fingerprint",
    "domain",
    "names",
)


def _summary_value(value: Any) -> str:
    if isinstance(value, pb.SocketAddress):
        return serde.address_text(value)
    if isinstance(value, pb.PathRule):
        return {pb.PREFIX: "prefix:", pb.REGEX: "regex:", pb.EQUALS: "equals:"}.get(value.kind, "?:") + value.value
    if isinstance(value, Message):
        return "{...}"
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)


def request_summary(req: pb.Request, *, max_chars: int = 160) -> str:
    """A short identity of ``req`` for errors and logs (ids, addresses, hostname, path; never keys)."""
    kind = req.WhichOneof("request_type")
    if kind is None:
        return ""
    value = getattr(req, kind)
    parts: list[str] = []
    if isinstance(value, Message):
        for name in _SUMMARY_FIELDS:
            fd = value.DESCRIPTOR.fields_by_name.get(name)
            if fd is None:
                continue
            if fd.is_repeated:
                items = list(getattr(value, name))
                if items:
                    parts.append(f"{name}={','.join(_summary_value(i) for i in items)}")
            elif value.HasField(name):
                parts.append(f"{name}={_summary_value(getattr(value, name))}")
        if isinstance(value, pb.AddCertificate | pb.ReplaceCertificate):
            cert = value.certificate if isinstance(value, pb.AddCertificate) else value.new_certificate
            if cert.names:
                parts.append(f"names={','.join(cert.names)}")
    else:
        parts.append(_summary_value(value))
    text = redact_text(" ".join(parts))
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


# --- the channel ------------------------------------------------------------------------------------------

# Waits between failed connection attempts: a ceiling from 0.1 s, doubling, never over 30 s (full jitter).
CONNECT_BACKOFF_INITIAL_S = 0.1
CONNECT_BACKOFF_MAX_S = 30.0


@dataclass
class Link:
    """One open connection to sozu, the framing it speaks and the version it was opened for (``how``:
    how that version was detected, None when it was given)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    framing: Framing
    version: SozuVersion | None = None
    how: str | None = None

    def alive(self) -> bool:
        """sozu has not closed it (an idle connection sozu closed is at EOF)."""
        return not self.reader.at_eof() and self.reader.exception() is None

    async def send(self, req: pb.Request) -> None:
        await self.send_frame(self.framing.encode(req))

    async def send_frame(self, frame: bytes) -> None:
        try:
            self.writer.write(frame)
            await self.writer.drain()
        except OSError as e:
            raise SozuConnectionError(f"write failed: {e}", socket_path=self.framing.socket_path) from None

    async def receive(self) -> pb.Response:
        return await self.framing.read(self.reader)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def bare_error(e: BaseException, socket_path: str) -> str:
    """An error's text without the ``sozu at <socket>:`` prefix (for messages that add their own)."""
    if isinstance(e, SozuError):
        return str(e).removeprefix(f"sozu at {socket_path}: ")
    return f"{type(e).__name__}: {e}"


class SozuChannel:
    """The command channel to one sozu main process.

    ``request_timeout_s`` bounds each request as a whole: waiting for the earlier requests of the channel
    (one in flight at a time), reconnecting if needed, and the exchange itself.
    ``connect_timeout_s`` bounds one connection attempt, and each step of version detection.
    ``max_frame_bytes`` caps one incoming frame (sozu's own default cap is 2 000 000) and one outgoing
    request (2.x would never answer a bigger one). ``max_connect_attempts`` (None: unbounded) makes
    ``connect()`` give up. ``probe_timeout_s`` is how long the 1.x/2.x probe waits (§ module docstring).
    ``backoff``: the waits between failed connection attempts (default: ``CONNECT_BACKOFF_*``).

    The link API (``closed``, ``known_version``, ``open_link``, ``retry_backoff``, close listeners) is for
    users of connections of their own, like ``EventSubscription``.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        version: SozuVersion | None = None,
        request_timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        max_frame_bytes: int = 2_000_000,
        backoff: Backoff | None = None,
        max_connect_attempts: int | None = None,
        probe_timeout_s: float = DETECT_PROBE_TIMEOUT_S,
    ) -> None:
        if max_frame_bytes < 64:
            raise ConfigError(f"sozu channel {socket_path}: max_frame_bytes={max_frame_bytes} is too small")
        self.socket_path = socket_path
        self._fixed_version = version
        self._version = version
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.probe_timeout_s = probe_timeout_s
        self._lock = asyncio.Lock()  # one request in flight on the connection; never held to connect
        self._epoch = 0
        self._listeners: list[Callable[[int], None]] = []
        self._close_listeners: list[Callable[[], None]] = []
        self._log = get_logger(socket=socket_path)
        self._links: Reconnector[Link] = Reconnector(
            self._open_and_detect,
            close=Link.close,
            fail=self._connection_error,
            backoff=backoff or Backoff(initial_s=CONNECT_BACKOFF_INITIAL_S, max_s=CONNECT_BACKOFF_MAX_S),
            log=self._log,
            event_prefix="sozu.",
            describe=self._bare,
            alive=Link.alive,
            on_connected=self._connected,
            max_attempts=max_connect_attempts,
        )

    # -- public surface --

    @property
    def version(self) -> SozuVersion:
        """The sozu version spoken (given, or detected at connection; a family representative)."""
        if self._version is None:
            raise SozuConnectionError("sozu version not known yet: connect first", socket_path=self.socket_path)
        return self._version

    @property
    def epoch(self) -> int:
        """+1 on every successful (re)connection; a change means sozu may have restarted (re-sync)."""
        return self._epoch

    @property
    def connected(self) -> bool:
        return self._links.state is LinkState.CONNECTED

    @property
    def max_connect_attempts(self) -> int | None:
        return self._links.max_attempts

    def add_reconnect_listener(self, cb: Callable[[int], None]) -> None:
        """``cb(new_epoch)`` runs after every *re*-connection (not the first connection)."""
        self._listeners.append(cb)

    def remove_reconnect_listener(self, cb: Callable[[int], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(cb)

    async def connect(self) -> None:
        """Connect (detecting the version if unknown), retrying with backoff until it works.

        Raises ``SozuConnectionError`` after ``max_connect_attempts`` failed attempts, if set.
        Does nothing when already connected. Holds no lock while it waits between attempts: requests
        made meanwhile make their own attempts and fail with the connection error.
        """
        await self._links.get(deadline=None)

    def frame_size(self, req: pb.Request) -> int | None:
        """The bytes ``req`` takes on the wire to the connected sozu version (None while it is unknown):
        a plan checks every request against ``max_frame_bytes`` before it sends the first one."""
        if self._version is None:
            return None
        framing = make_framing(self._version, socket_path=self.socket_path, max_frame_bytes=self.max_frame_bytes)
        return len(framing.encode(req))

    async def request(self, req: pb.Request, *, timeout_s: float | None = None) -> Reply:
        """Send ``req`` and wait for its final frame.

        ``OK`` -> ``Reply``; ``FAILURE`` -> ``SozuRequestError`` (sozu's text, request kind and summary);
        no final frame in time -> ``SozuTimeoutError`` (the request's effect is unknown); refused before
        sending (``SozuUnsupportedError``): an empty request, a type the connected version does not know,
        a field it does not know, a type sozu never answers.
        """
        kind = req.WhichOneof("request_type")
        if kind is None:
            raise SozuUnsupportedError(
                "refusing to send an empty request (no request type): sozu 1.x/2.x never answer it",
                socket_path=self.socket_path,
            )
        if kind in _NEVER_ANSWERED:
            raise SozuUnsupportedError(
                f"refusing to send {kind}: {_NEVER_ANSWERED[kind]}", socket_path=self.socket_path
            )
        checked = self._version
        if checked is not None:  # refuse before waiting for the connection when we can
            self._check_known(req, kind, checked)
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        deadline = asyncio.get_running_loop().time() + timeout
        link = await self._acquire(req, kind, deadline, timeout)
        try:
            if self.version != checked:  # detected just now, or changed at a reconnection
                self._check_known(req, kind, self.version)
            final, processing = await self._send_and_wait(link, req, kind, deadline, timeout)
        finally:
            self._lock.release()
        if final.status == pb.FAILURE:
            raise SozuRequestError(
                redact_text(final.message),
                request_kind=kind,
                request_summary=request_summary(req),
                socket_path=self.socket_path,
                processing=tuple(redact_text(p.message) for p in processing),
            )
        return Reply(response=final, processing=processing)

    def subscribe_events(self) -> EventSubscription:
        """Events on a connection of their own, as an async iterator (see ``EventSubscription``)."""
        if self.closed:
            raise SozuConnectionError("channel closed", socket_path=self.socket_path)
        return EventSubscription(self)

    async def aclose(self) -> None:
        """Close the channel and its subscriptions; later requests raise ``SozuConnectionError``."""
        link = self._links.stop()
        if link is not None:
            link.close()
            with contextlib.suppress(Exception):
                await link.writer.wait_closed()
        for cb in list(self._close_listeners):
            cb()

    async def __aenter__(self) -> SozuChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- link API: connections of their own for other users (events) --

    @property
    def closed(self) -> bool:
        return self._links.stopped

    @property
    def known_version(self) -> SozuVersion | None:
        """The version, or None before it is known (``version`` raises instead)."""
        return self._version

    def retry_backoff(self) -> Backoff:
        """A backoff with the channel's settings, starting over (for a connection of one's own)."""
        return self._links.backoff.fresh()

    async def open_link(self, deadline: float | None = None) -> Link:
        """A new connection of the caller's own (not the request connection), in the channel's framing;
        connects the channel first when the version is not known yet. The caller closes it."""
        if self.closed:
            raise self._connection_error("closed")
        if self._version is None:
            await self._links.get(deadline)
        version = self.version
        framing = make_framing(version, socket_path=self.socket_path, max_frame_bytes=self.max_frame_bytes)
        link = await self._open(framing, deadline)
        link.version = version
        return link

    def add_close_listener(self, cb: Callable[[], None]) -> None:
        """``cb()`` runs when the channel is closed."""
        self._close_listeners.append(cb)

    def remove_close_listener(self, cb: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._close_listeners.remove(cb)

    # -- one request --

    async def _acquire(self, req: pb.Request, kind: str, deadline: float, timeout_s: float) -> Link:
        """A connection, then the request lock on it (held on return). Connecting comes first and
        without the lock, so a connection being retried never makes other requests wait for the lock:
        each fails with the connection error within its own deadline."""
        while True:
            link = await self._links.get(deadline)
            try:
                async with asyncio.timeout_at(deadline):
                    await self._lock.acquire()
            except TimeoutError:
                raise SozuTimeoutError(
                    f"{kind} {request_summary(req)}: the channel stayed busy with earlier requests "
                    f"for {timeout_s:g} s; nothing was sent",
                    socket_path=self.socket_path,
                ) from None
            if self._links.usable() is link:
                return link
            self._lock.release()  # the link was dropped while this request waited: connect again

    async def _send_and_wait(
        self, link: Link, req: pb.Request, kind: str, deadline: float, timeout_s: float
    ) -> tuple[pb.Response, list[pb.Response]]:
        """The exchange of one request, with the request lock held; any failure drops the connection."""
        frame = link.framing.encode(req)
        if len(frame) > self.max_frame_bytes:
            raise SozuProtocolError(
                f"{kind} {request_summary(req)}: request of {len(frame)} bytes exceeds max_frame_bytes="
                f"{self.max_frame_bytes} (sozu would never answer it)",
                socket_path=self.socket_path,
            )
        try:
            async with asyncio.timeout_at(deadline):
                return await self._exchange(link, frame)
        except TimeoutError:
            self._drop(link, "request_timeout")
            summary = request_summary(req)
            self._log.warning("sozu.request_timeout", request=kind, summary=summary, timeout_s=timeout_s)
            raise SozuTimeoutError(
                f"{kind} {summary}: no final answer within {timeout_s:g} s; its effect is unknown "
                "(connection dropped, the next request reconnects)",
                socket_path=self.socket_path,
            ) from None
        except SozuProtocolError as e:
            self._drop(link, "protocol_error")
            self._log.warning("sozu.protocol_error", request=kind, error=str(e))
            raise
        except SozuConnectionError as e:
            self._drop(link, "connection_lost")
            if self.closed:
                raise self._connection_error("channel closed") from None
            self._log.warning("sozu.connection_lost", request=kind, error=str(e))
            raise
        except BaseException:
            # cancelled (or anything unexpected) mid-exchange: the stream position is unknown
            self._drop(link, "interrupted")
            raise

    def _check_known(self, req: pb.Request, kind: str, version: SozuVersion) -> None:
        if not version.knows_request(kind):
            raise SozuUnsupportedError(
                f"refusing to send {kind}: sozu {version} does not know this request type and would never answer it",
                socket_path=self.socket_path,
            )
        # sozu 1.x/2.x would skip a field they do not know without a word (0.15 would fail to parse the
        # request and close the connection): refuse rather than lose it
        body = getattr(req, kind)
        unknown = _unknown_field(body, version) if isinstance(body, Message) else None
        if unknown is not None:
            raise SozuUnsupportedError(
                f"refusing to send {kind}: {kind}.{unknown} is set but sozu {version} has no such field",
                socket_path=self.socket_path,
            )

    # -- connection life cycle (the Reconnector's hooks) --

    def _connection_error(self, message: str) -> SozuConnectionError:
        return SozuConnectionError(message, socket_path=self.socket_path)

    def _bare(self, e: BaseException) -> str:
        return bare_error(e, self.socket_path)

    def _drop(self, link: Link, reason: str) -> None:
        self._links.lost(link, reason, epoch=self._epoch)

    def _connected(self, link: Link) -> None:
        version = link.version
        assert version is not None
        if link.how is not None:
            if self._version is not None and version != self._version:
                self._log.warning("sozu.version_changed", previous=str(self._version), version=str(version))
            self._log.info("sozu.version_detected", version=str(version), how=link.how)
        self._version = version
        self._epoch += 1
        if self._epoch == 1:
            self._log.info("sozu.connected", epoch=self._epoch, version=str(version))
            return
        self._log.info("sozu.reconnected", epoch=self._epoch, version=str(version))
        for cb in list(self._listeners):
            try:
                cb(self._epoch)
            except Exception as cb_error:  # a listener must not break the channel
                self._log.error("sozu.reconnect_listener_failed", error=repr(cb_error))

    def _step_timeout_s(self, deadline: float | None) -> float:
        if deadline is None:
            return self.connect_timeout_s
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise SozuConnectionError("no time left to connect", socket_path=self.socket_path)
        return min(self.connect_timeout_s, remaining)

    async def _open(self, framing: Framing, deadline: float | None) -> Link:
        try:
            async with asyncio.timeout(self._step_timeout_s(deadline)):
                reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=self.max_frame_bytes + 1)
        except TimeoutError:
            raise SozuConnectionError("connection attempt timed out", socket_path=self.socket_path) from None
        except OSError as e:
            raise SozuConnectionError(f"cannot connect: {e.strerror or e}", socket_path=self.socket_path) from None
        return Link(reader, writer, framing)

    async def _open_and_detect(self, deadline: float | None) -> Link:
        """A new connection, with the version it speaks (and how it was decided, if it was detected)."""
        if self._fixed_version is not None:
            framing = make_framing(
                self._fixed_version, socket_path=self.socket_path, max_frame_bytes=self.max_frame_bytes
            )
            link = await self._open(framing, deadline)
            link.version = self._fixed_version
            return link
        link, link.version, link.how = await self._detect(deadline)
        return link

    async def _detect(self, deadline: float | None) -> tuple[Link, SozuVersion, str]:
        """A new connection and the version it speaks, detected (see the module docstring)."""
        proto = ProtobufFraming(socket_path=self.socket_path, max_frame_bytes=self.max_frame_bytes)
        link = await self._open(proto, deadline)
        probe = pb.Request(list_listeners=pb.ListListeners())
        try:
            final, _ = await self._timed_exchange(link, proto.encode(probe), deadline)
        except SozuConnectionError:
            link.close()
            # 0.15 splits on NUL, cannot parse the protobuf frame and closes: retry in JSON mode
            json_framing = JsonFraming(socket_path=self.socket_path, max_frame_bytes=self.max_frame_bytes)
            link = await self._open(json_framing, deadline)
            try:
                final, _ = await self._timed_exchange(link, json_framing.encode(probe), deadline)
            except BaseException:
                link.close()
                raise
            if final.status != pb.OK:
                link.close()
                raise SozuProtocolError(
                    f"version detection: JSON list_listeners answered {_STATUS_NAMES.get(final.status)}: "
                    f"{redact_text(final.message)}",
                    socket_path=self.socket_path,
                ) from None
            return link, V0_15_19, "protobuf frame closed the connection, JSON list_listeners answered (0.15)"
        except BaseException:
            link.close()
            raise
        if final.status == pb.OK and final.content.HasField("listeners_list"):
            marker = _v2_listener_marker(final.content.listeners_list)
            if marker is not None:
                return link, V2_1_0, f"list_listeners shows a 2.x-only field ({marker})"
        try:
            answered = await self._probe_health_checks(deadline)
        except BaseException:
            link.close()
            raise
        if answered:
            return link, V2_1_0, "query_health_checks probe answered (2.x)"
        return link, V1_1_1, f"query_health_checks probe unanswered within {self.probe_timeout_s:g} s (1.x)"

    async def _probe_health_checks(self, deadline: float | None) -> bool:
        """On a throw-away connection: does sozu answer ``query_health_checks`` (2.x) or not (1.x)?"""
        proto = ProtobufFraming(socket_path=self.socket_path, max_frame_bytes=self.max_frame_bytes)
        link = await self._open(proto, deadline)
        try:
            await link.send(pb.Request(query_health_checks=pb.QueryHealthChecks()))
            timeout = min(self.probe_timeout_s, self._step_timeout_s(deadline))
            try:
                async with asyncio.timeout(timeout):
                    await link.receive()
            except TimeoutError:
                return False
            return True
        finally:
            link.close()

    async def _timed_exchange(
        self, link: Link, frame: bytes, deadline: float | None
    ) -> tuple[pb.Response, list[pb.Response]]:
        try:
            async with asyncio.timeout(self._step_timeout_s(deadline)):
                return await self._exchange(link, frame)
        except TimeoutError:
            raise SozuTimeoutError(
                "version detection: no answer to list_listeners", socket_path=self.socket_path
            ) from None

    async def _exchange(self, link: Link, frame: bytes) -> tuple[pb.Response, list[pb.Response]]:
        """Write one request frame, read frames until the final one."""
        await link.send_frame(frame)
        processing: list[pb.Response] = []
        seen = 0
        while True:
            resp = await link.receive()
            if resp.status == pb.PROCESSING:
                # sozu sends a few per request (one per stage or worker); keep the first ones only, and
                # give up on a peer that never ends (memory stays bounded whatever the timeout).
                seen += 1
                if len(processing) < MAX_PROCESSING_KEPT:
                    processing.append(resp)
                if seen > MAX_PROCESSING_FRAMES:
                    self._drop(link, "processing_flood")
                    raise SozuProtocolError(
                        f"more than {MAX_PROCESSING_FRAMES} PROCESSING frames for one request and no final answer "
                        "(connection dropped, the next request reconnects)",
                        socket_path=self.socket_path,
                    )
                continue
            return resp, processing


@functools.lru_cache(maxsize=4096)
def _knows_field(version: SozuVersion, message: str, name: str) -> bool:
    return version.knows_field(message, name)


_SCALAR, _MESSAGE, _REPEATED, _MAP = range(4)


@functools.lru_cache(maxsize=4096)
def _container(fd: Any) -> int:
    """How a field holds messages: not at all, one, a list, or as the values of a map."""
    if fd.type != fd.TYPE_MESSAGE or fd.message_type is None:
        return _SCALAR
    if fd.message_type.GetOptions().map_entry:
        value_fd = fd.message_type.fields_by_name["value"]
        return _MAP if value_fd.type == value_fd.TYPE_MESSAGE else _SCALAR
    return _REPEATED if fd.is_repeated else _MESSAGE


def _unknown_field(value: Message, version: SozuVersion) -> str | None:
    """The path of the first field set in ``value`` that ``version`` does not have, if any."""
    message = value.DESCRIPTOR.name
    for fd, item in value.ListFields():
        if not _knows_field(version, message, fd.name):
            return fd.name
        how = _container(fd)
        if how == _SCALAR:
            continue
        items = [item] if how == _MESSAGE else list(item) if how == _REPEATED else list(item.values())
        for elem in items:
            found = _unknown_field(elem, version)
            if found is not None:
                return f"{fd.name}.{found}"
    return None


def _v2_listener_marker(listeners: pb.ListenersList) -> str | None:
    for addr, https in listeners.https_listeners.items():
        if len(https.alpn_protocols) > 0:
            return f"HTTPS listener {addr} alpn_protocols"
        for name in ("elide_x_real_ip", "send_x_real_ip"):
            if https.HasField(name):
                return f"HTTPS listener {addr} {name}"
    for addr, http in listeners.http_listeners.items():
        for name in ("elide_x_real_ip", "send_x_real_ip"):
            if http.HasField(name):  # type: ignore[arg-type]
                return f"HTTP listener {addr} {name}"
    return None


# --- events -------------------------------------------------------------------------------------------------


class EventSubscription:
    """Async iterator of sozu events, on a connection of its own (the channel's link API).

    Acknowledgements are skipped (2.1.0: the ``EVENTS_SUBSCRIBED`` event; 0.15: the ``OK`` frame);
    every other event is delivered as sozu sends it (2.1.0 sends most of them twice, §11.7). When the
    connection is lost it reconnects (a ``Reconnector`` with the channel's backoff settings, kicked when
    the channel itself reconnects) and subscribes again; ``epoch`` counts the subscriptions made, so a
    consumer can tell that events may have been missed in between (and re-read the live state). Raises
    ``SozuConnectionError`` when the channel's ``max_connect_attempts`` is exhausted,
    ``SozuRequestError`` if sozu refuses the subscription; ends when it or the channel is closed. There
    is no read timeout: events can be rare.
    """

    def __init__(self, channel: SozuChannel) -> None:
        self._channel = channel
        self.epoch = 0
        self._log = get_logger(socket=channel.socket_path, stream="events")
        self._links: Reconnector[Link] = Reconnector(
            self._subscribe,
            close=Link.close,
            fail=lambda message: SozuConnectionError(message, socket_path=channel.socket_path),
            backoff=channel.retry_backoff(),
            log=self._log,
            event_prefix="sozu.events_",
            describe=lambda e: bare_error(e, channel.socket_path),
            on_connected=self._subscribed,
            max_attempts=channel.max_connect_attempts,
        )
        channel.add_close_listener(self._stop)
        channel.add_reconnect_listener(self._kick)  # sozu is back: stop waiting out the backoff

    @property
    def state(self) -> LinkState:
        return self._links.state

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> pb.Event:
        while True:
            try:
                link = await self._links.get()
            except SozuConnectionError:
                if self._links.stopped:
                    raise StopAsyncIteration from None
                raise
            try:
                resp = await link.receive()
            except SozuError as e:
                if self._links.stopped:
                    raise StopAsyncIteration from None
                reason = "protocol_error" if isinstance(e, SozuProtocolError) else "connection_lost"
                self._links.lost(link, reason, error=str(e))
                continue
            if resp.status == pb.FAILURE:
                self._links.lost(link, "subscription_refused")
                raise SozuRequestError(
                    redact_text(resp.message), request_kind="subscribe_events", socket_path=self._channel.socket_path
                )
            if not resp.content.HasField("event"):
                continue  # 0.15's OK acknowledgement
            if resp.content.event.kind == pb.EVENTS_SUBSCRIBED:
                continue  # 2.1.0's acknowledgement
            return resp.content.event

    async def _subscribe(self, deadline: float | None) -> Link:
        link = await self._channel.open_link(deadline)
        try:
            await link.send(pb.Request(subscribe_events=pb.SubscribeEvents()))
        except BaseException:
            link.close()
            raise
        return link

    def _subscribed(self, link: Link) -> None:
        self.epoch += 1
        self._log.info("sozu.events_subscribed", epoch=self.epoch, version=str(link.version))

    def _stop(self) -> None:
        link = self._links.stop()
        if link is not None:
            link.close()

    def _kick(self, _epoch: int) -> None:
        self._links.kick()

    async def aclose(self) -> None:
        self._stop()
        self._channel.remove_close_listener(self._stop)
        self._channel.remove_reconnect_listener(self._kick)
