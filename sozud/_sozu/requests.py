"""What a request is, before it is sent: its summary for errors and logs (never a private key), and
whether the connected sozu version can take it (type and every field set, §3.2, §11.2)."""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf.message import Message

from sozud import serde
from sozud.errors import SozuUnsupportedError
from sozud.proto import command_pb2 as pb
from sozud.redact import redact_text
from sozud.versions import SozuVersion

__all__ = ["check_known", "check_sendable", "request_summary"]

# Request types sozu never answers with a final frame (§3.2, §11.2): refused before sending.
_NEVER_ANSWERED = {
    "launch_worker": "sozu never answers launch_worker",
    "return_listen_sockets": "sozu never answers return_listen_sockets",
    "subscribe_events": "subscriptions never get a final answer; use SozuChannel.subscribe_events()",
}


def check_sendable(req: pb.Request, socket_path: str) -> str:
    """The request's kind; ``SozuUnsupportedError`` for an empty request or a type sozu never answers."""
    kind = req.WhichOneof("request_type")
    if kind is None:
        raise SozuUnsupportedError(
            "refusing to send an empty request (no request type): sozu 1.x/2.x never answer it",
            socket_path=socket_path,
        )
    if kind in _NEVER_ANSWERED:
        raise SozuUnsupportedError(f"refusing to send {kind}: {_NEVER_ANSWERED[kind]}", socket_path=socket_path)
    return kind


def check_known(req: pb.Request, kind: str, version: SozuVersion, socket_path: str) -> None:
    """``SozuUnsupportedError`` unless ``version`` knows the request type and every field set in it."""
    if not version.knows_request(kind):
        raise SozuUnsupportedError(
            f"refusing to send {kind}: sozu {version} does not know this request type and would never answer it",
            socket_path=socket_path,
        )
    # sozu 1.x/2.x would skip a field they do not know without a word (0.15 would fail to parse the
    # request and close the connection): refuse rather than lose it
    body = getattr(req, kind)
    unknown = _unknown_field(body, version) if isinstance(body, Message) else None
    if unknown is not None:
        raise SozuUnsupportedError(
            f"refusing to send {kind}: {kind}.{unknown} is set but sozu {version} has no such field",
            socket_path=socket_path,
        )


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
