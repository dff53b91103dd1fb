"""The asyncio client of sozu's command channel (docs/sozu-command-protocol.md §2, §3, §10-§12).

This module is the face of the ``sozud._sozu`` package: import the public names from here. One
concern per module, bottom up:

- ``_sozu/framing.py`` — bytes <-> ``pb.Request`` / ``pb.Response``: ``ProtobufFraming`` (1.x/2.x: an
  8-byte little-endian length that counts itself, then protobuf) and ``JsonFraming`` (0.15: serde JSON
  and one NUL). Bad frames become ``SozuProtocolError``, EOF ``SozuConnectionError``; never a hang.
- ``_sozu/requests.py`` — before sending: ``request_summary`` (ids, addresses, hostname, path; never a
  key), and whether the connected version knows the request type and every field set in it.
- ``_sozu/link.py`` — one connection (``Link``), how it is opened (``Dialer``), one exchange on it (a
  request, then frames until ``OK`` or ``FAILURE``, PROCESSING frames bounded).
- ``_sozu/detect.py`` — version detection (``version=None``): protobuf ``list_listeners``, JSON on a
  0.15 close, 2.x-only listener fields, else a ``query_health_checks`` probe (2.x answers, 1.x never).
  An auto-detected version is detected again after every reconnection (sozu may have been upgraded).
- ``_sozu/channel.py`` — ``SozuChannel``: one request in flight at a time on one connection, every
  request under a deadline; the connection's life cycle is a ``sozud.reconnect.Reconnector`` (epoch + 1
  per connection, listeners called on a *re*-connection), and connecting never holds the request lock.
  Its link API (``open_link``, ``closed``, ``known_version``, ``retry_backoff``, listeners) serves the
  users of connections of their own.
- ``_sozu/events.py`` — ``EventSubscription``: events on a connection of their own (sozu sends them as
  ``PROCESSING`` frames, §3.6), resubscribed through its own ``Reconnector`` after a loss.

One connection carries every request: several active connections make real sozu stall requests for
``worker_timeout`` (§11.5).
"""

from __future__ import annotations

from sozud._sozu.channel import CONNECT_BACKOFF_INITIAL_S, CONNECT_BACKOFF_MAX_S, Reply, SozuChannel
from sozud._sozu.detect import DETECT_PROBE_TIMEOUT_S
from sozud._sozu.events import EventSubscription
from sozud._sozu.framing import HEADER_BYTES, Framing, JsonFraming, ProtobufFraming, make_framing
from sozud._sozu.link import MAX_PROCESSING_FRAMES, MAX_PROCESSING_KEPT, Link
from sozud._sozu.requests import request_summary

__all__ = [
    "CONNECT_BACKOFF_INITIAL_S",
    "CONNECT_BACKOFF_MAX_S",
    "DETECT_PROBE_TIMEOUT_S",
    "HEADER_BYTES",
    "MAX_PROCESSING_FRAMES",
    "MAX_PROCESSING_KEPT",
    "EventSubscription",
    "Framing",
    "JsonFraming",
    "Link",
    "ProtobufFraming",
    "Reply",
    "SozuChannel",
    "make_framing",
    "request_summary",
]
