"""The command channel to one sozu main process: one request at a time on one connection, deadlines.

sozu has no request id and 1.x/2.x silently drop all but the last of several frames read together, so
exactly one request is in flight on the connection (an ``asyncio.Lock``), and every request has a
timeout. After a timeout, a bad frame, an EOF or a cancellation the stream's position is unknown: the
connection is dropped and the next request reconnects, so a late answer is never attributed to the
next request. The connection's life cycle is a ``Reconnector`` (``sozud.reconnect``); connecting never
holds the request lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from sozud._sozu.detect import DETECT_PROBE_TIMEOUT_S, detect
from sozud._sozu.events import EventSubscription
from sozud._sozu.framing import make_framing
from sozud._sozu.link import Dialer, Link, bare_error, exchange
from sozud._sozu.requests import check_known, check_sendable, request_summary
from sozud.backoff import Backoff
from sozud.errors import (
    ConfigError,
    SozuConnectionError,
    SozuProtocolError,
    SozuRequestError,
    SozuTimeoutError,
)
from sozud.log import get_logger
from sozud.proto import command_pb2 as pb
from sozud.reconnect import LinkState, Reconnector
from sozud.redact import redact_text
from sozud.versions import SozuVersion

__all__ = ["CONNECT_BACKOFF_INITIAL_S", "CONNECT_BACKOFF_MAX_S", "Reply", "SozuChannel"]

# Waits between failed connection attempts: a ceiling from 0.1 s, doubling, never over 30 s (full jitter).
CONNECT_BACKOFF_INITIAL_S = 0.1
CONNECT_BACKOFF_MAX_S = 30.0


@dataclass
class Reply:
    """The final ``OK`` frame of one request, and the ``PROCESSING`` frames that came before it."""

    response: pb.Response
    processing: list[pb.Response] = field(default_factory=list)


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
        kind = check_sendable(req, self.socket_path)
        checked = self._version
        if checked is not None:  # refuse before waiting for the connection when we can
            check_known(req, kind, checked, self.socket_path)
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        deadline = asyncio.get_running_loop().time() + timeout
        link = await self._acquire(req, kind, deadline, timeout)
        try:
            if self.version != checked:  # detected just now, or changed at a reconnection
                check_known(req, kind, self.version, self.socket_path)
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
        link = await self._dialer().open(framing, deadline)
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
                return await exchange(link, frame)
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

    def _dialer(self) -> Dialer:
        return Dialer(self.socket_path, self.max_frame_bytes, self.connect_timeout_s)

    async def _open_and_detect(self, deadline: float | None) -> Link:
        """A new connection, with the version it speaks (and how it was decided, if it was detected)."""
        if self._fixed_version is not None:
            framing = make_framing(
                self._fixed_version, socket_path=self.socket_path, max_frame_bytes=self.max_frame_bytes
            )
            link = await self._dialer().open(framing, deadline)
            link.version = self._fixed_version
            return link
        link, link.version, link.how = await detect(self._dialer(), deadline, self.probe_timeout_s)
        return link
