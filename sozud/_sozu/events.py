"""sozu events on a connection of their own (docs §3.6, §11.7), through the channel's link API."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sozud._sozu.link import Link, bare_error
from sozud.errors import SozuConnectionError, SozuError, SozuProtocolError, SozuRequestError
from sozud.log import get_logger
from sozud.proto import command_pb2 as pb
from sozud.reconnect import LinkState, Reconnector
from sozud.redact import redact_text

if TYPE_CHECKING:
    from sozud._sozu.channel import SozuChannel

__all__ = ["EventSubscription"]


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
