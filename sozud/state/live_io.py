"""What reading a live sozu rests on: the channel it needs (:class:`SozuRequester`), one request with its
answer checked (:func:`ask`, :func:`main_entry`), the record of one read (:class:`LiveRead`: the state and
what the read could not see), and the names a certificate derives (:func:`derived_names`). Used by the
probe and the SaveState read (:mod:`sozud.state.live`) and the query read (:mod:`sozud.state.live_queries`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID
from google.protobuf.message import Message

from sozud.errors import SozuProtocolError
from sozud.proto import command_pb2 as pb
from sozud.state.model import ConfigState, Kind, ObjKey, decode_value
from sozud.versions import Family, SozuVersion

FRONTEND_KINDS: tuple[Kind, ...] = ("http_frontend", "https_frontend", "tcp_frontend", "udp_frontend")


class _Reply(Protocol):
    @property
    def response(self) -> pb.Response: ...


class SozuRequester(Protocol):
    """What this module needs from a sozu command channel (``sozud.socket_proto.SozuChannel``)."""

    @property
    def version(self) -> SozuVersion | None: ...

    @property
    def epoch(self) -> int: ...

    async def request(self, req: pb.Request, *, timeout_s: float | None = None) -> Any: ...


@dataclass
class LiveRead:
    """One live read: the state and what the read could not see."""

    state: ConfigState
    method: Literal["save_state", "queries"]
    requests: int
    notes: list[str] = field(default_factory=list)
    # certificates in the main state served at no worker listener: fingerprint -> certificate
    unresolved_certificates: dict[str, pb.CertificateAndKey] = field(default_factory=dict, repr=False)
    # every fingerprint in the main state (queries only)
    state_fingerprints: frozenset[str] = frozenset()
    frontends_listed: bool = True
    duration_s: float = 0.0

    @property
    def exact(self) -> bool:
        """True when the read saw everything (a parsed save_state)."""
        return self.method == "save_state"

    def hides(self, key: ObjKey, value: Message | bytes) -> bool:
        """Whether this read could not have seen ``key`` (with ``value``, a message or its canonical bytes)
        even if sozu holds it."""
        if self.exact or key in self.state:
            return False
        if isinstance(value, bytes):
            value = decode_value(key, value)
        kind = key[0]
        if kind == "backend":
            assert isinstance(value, pb.AddBackend)
            return ("cluster", value.cluster_id) not in self.state
        if kind in FRONTEND_KINDS and not self.frontends_listed:
            cluster_id = getattr(value, "cluster_id", "")
            has = value.HasField("cluster_id") if isinstance(value, pb.RequestHttpFrontend) else True
            return not has or ("cluster", cluster_id) not in self.state
        if kind == "certificate":
            if key[2] in self.state_fingerprints:
                return True
            # 0.15 leaves out of its certificates query the ones it cannot parse
            assert isinstance(value, pb.AddCertificate)
            return self.state.version.family is Family.V0_15 and derived_names(value.certificate.certificate) is None
        return False

    def visible(self, state: ConfigState) -> ConfigState:
        """``state`` without the objects this read could not see (what a read would show of it)."""
        return ConfigState.from_raw(state.version, {k: v for k, v in state.raw_items() if not self.hides(k, v)})


def derived_names(pem: str) -> list[str] | None:
    """CN then DNS SANs of a PEM certificate (what sozu derives), None when it does not parse."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return None
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        san = None
    if isinstance(san, x509.SubjectAlternativeName):
        names.extend(san.get_values_for_type(x509.DNSName))
    out: list[str] = []
    for name in names:  # consecutive duplicates dropped (a CN repeated as the first SAN)
        if not out or out[-1] != name:
            out.append(name)
    return out


class RequestCounter:
    """Sends requests and counts them."""

    def __init__(self, ch: SozuRequester) -> None:
        self.ch = ch
        self.count = 0

    async def ask(self, req: pb.Request, content: str | None) -> pb.ResponseContent:
        self.count += 1
        return await ask(self.ch, req, content)

    async def main_entry(self, req: pb.Request, content: str) -> pb.ResponseContent:
        self.count += 1
        return await main_entry(self.ch, req, content)


def where(ch: SozuRequester) -> str | None:
    path = getattr(ch, "socket_path", None)
    return str(path) if path is not None else None


def version_of(ch: SozuRequester) -> SozuVersion:
    version = ch.version
    if version is None:
        raise SozuProtocolError("the channel's sozu version is unknown (connect first)", socket_path=where(ch))
    return version


async def ask(ch: SozuRequester, req: pb.Request, content: str | None) -> pb.ResponseContent:
    """Send ``req``; return the final response's content, checking it is ``content`` (when given)."""
    reply = await ch.request(req)
    response: pb.Response = reply.response
    if content is None:
        return response.content
    which = response.content.WhichOneof("content_type") if response.HasField("content") else None
    if which != content:
        kind = req.WhichOneof("request_type")
        raise SozuProtocolError(
            f"{kind} answered {pb.ResponseStatus.Name(response.status)} with content {which or 'none'}, "
            f"expected {content}",
            socket_path=where(ch),
        )
    return response.content


async def main_entry(ch: SozuRequester, req: pb.Request, content: str) -> pb.ResponseContent:
    """The ``"main"`` entry of a main+workers query, checking it is ``content``."""
    outer = await ask(ch, req, "worker_responses")
    kind = req.WhichOneof("request_type")
    entries = outer.worker_responses.map
    if "main" not in entries:
        raise SozuProtocolError(f"{kind} answer has no 'main' entry (got {sorted(entries)})", socket_path=where(ch))
    main = entries["main"]
    which = main.WhichOneof("content_type")
    if which != content:
        raise SozuProtocolError(
            f"{kind} answer's 'main' entry holds {which or 'nothing'}, expected {content}", socket_path=where(ch)
        )
    return main
