"""Which sozu family answers on the socket (docs §12), when the configuration says ``auto``.

The first frame is a protobuf ``list_listeners`` (main-only, answered by every version; ``status``
would wait on the workers). A 0.15 main process splits its input on NUL, cannot parse the first chunk
and closes the connection: the connection is opened again in JSON mode and a JSON ``list_listeners``
confirms. Among protobuf versions, 2.x listeners carry fields 1.x does not have (HTTP/HTTPS
``elide_x_real_ip``/``send_x_real_ip``, HTTPS ``alpn_protocols``); when the listeners say nothing
(none, or TCP only), a ``query_health_checks`` probe on a throw-away connection decides: 2.x answers
it, 1.x never does (an unknown request type gets no answer). The exact patch version cannot be known:
the family's representative (0.15.19, 1.1.1 or 2.1.0) is used.
"""

from __future__ import annotations

import asyncio

from sozud._sozu.framing import JsonFraming, ProtobufFraming
from sozud._sozu.link import Dialer, Link, exchange
from sozud.errors import SozuConnectionError, SozuProtocolError, SozuTimeoutError
from sozud.proto import command_pb2 as pb
from sozud.redact import redact_text
from sozud.versions import V0_15_19, V1_1_1, V2_1_0, SozuVersion

__all__ = ["DETECT_PROBE_TIMEOUT_S", "detect"]

# How long the throw-away ``query_health_checks`` probe waits before concluding "1.x" (1.x never answers).
DETECT_PROBE_TIMEOUT_S = 1.0

_STATUS_NAMES = {pb.OK: "OK", pb.PROCESSING: "PROCESSING", pb.FAILURE: "FAILURE"}
_LIST_LISTENERS = pb.Request(list_listeners=pb.ListListeners())


async def detect(dialer: Dialer, deadline: float | None, probe_timeout_s: float) -> tuple[Link, SozuVersion, str]:
    """A new connection, the version it speaks, and how that was decided."""
    proto = ProtobufFraming(socket_path=dialer.socket_path, max_frame_bytes=dialer.max_frame_bytes)
    link = await dialer.open(proto, deadline)
    try:
        final = await _ask_listeners(dialer, link, deadline)
    except SozuConnectionError:
        # 0.15 splits on NUL, cannot parse the protobuf frame and closes: retry in JSON mode
        return await _detect_json(dialer, deadline)
    if final.status == pb.OK and final.content.HasField("listeners_list"):
        marker = _v2_listener_marker(final.content.listeners_list)
        if marker is not None:
            return link, V2_1_0, f"list_listeners shows a 2.x-only field ({marker})"
    try:
        answered = await _probe_health_checks(dialer, deadline, probe_timeout_s)
    except BaseException:
        link.close()
        raise
    if answered:
        return link, V2_1_0, "query_health_checks probe answered (2.x)"
    return link, V1_1_1, f"query_health_checks probe unanswered within {probe_timeout_s:g} s (1.x)"


async def _detect_json(dialer: Dialer, deadline: float | None) -> tuple[Link, SozuVersion, str]:
    json_framing = JsonFraming(socket_path=dialer.socket_path, max_frame_bytes=dialer.max_frame_bytes)
    link = await dialer.open(json_framing, deadline)
    final = await _ask_listeners(dialer, link, deadline)
    if final.status != pb.OK:
        link.close()
        raise SozuProtocolError(
            f"version detection: JSON list_listeners answered {_STATUS_NAMES.get(final.status)}: "
            f"{redact_text(final.message)}",
            socket_path=dialer.socket_path,
        )
    return link, V0_15_19, "protobuf frame closed the connection, JSON list_listeners answered (0.15)"


async def _ask_listeners(dialer: Dialer, link: Link, deadline: float | None) -> pb.Response:
    """The answer to ``list_listeners`` on ``link``, which is closed on any error."""
    try:
        return await _timed_exchange(dialer, link, link.framing.encode(_LIST_LISTENERS), deadline)
    except BaseException:
        link.close()
        raise


async def _probe_health_checks(dialer: Dialer, deadline: float | None, probe_timeout_s: float) -> bool:
    """On a throw-away connection: does sozu answer ``query_health_checks`` (2.x) or not (1.x)?"""
    proto = ProtobufFraming(socket_path=dialer.socket_path, max_frame_bytes=dialer.max_frame_bytes)
    link = await dialer.open(proto, deadline)
    try:
        await link.send(pb.Request(query_health_checks=pb.QueryHealthChecks()))
        try:
            async with asyncio.timeout(min(probe_timeout_s, dialer.step_timeout_s(deadline))):
                await link.receive()
        except TimeoutError:
            return False
        return True
    finally:
        link.close()


async def _timed_exchange(dialer: Dialer, link: Link, frame: bytes, deadline: float | None) -> pb.Response:
    try:
        async with asyncio.timeout(dialer.step_timeout_s(deadline)):
            final, _ = await exchange(link, frame)
            return final
    except TimeoutError:
        raise SozuTimeoutError(
            "version detection: no answer to list_listeners", socket_path=dialer.socket_path
        ) from None


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
