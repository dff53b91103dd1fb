"""``ConfigState``: what a sozu main process holds, keyed the way sozu itself keys it.

One flat mapping from an object key to the *add request* that creates that object (the message sozu
stores and writes back in its state file). Keys (docs/sozu-command-protocol.md §7.2):

==================  ====================================================  ============================
kind                identity tuple after the kind                         value (message)
==================  ====================================================  ============================
``listener``        (``http``/``https``/``tcp``/``udp``, ``ip:port``)       ``*ListenerConfig``
``cluster``         (cluster_id,)                                         ``Cluster``
``http_frontend``   (route key,)                                          ``RequestHttpFrontend``
``https_frontend``  (route key,)                                          ``RequestHttpFrontend``
``tcp_frontend``    (cluster_id, ``ip:port``, sorted tags)                ``RequestTcpFrontend``
``udp_frontend``    (cluster_id, ``ip:port``, sorted tags)                ``RequestUdpFrontend``
``backend``         (cluster_id, backend_id, ``ip:port``)                 ``AddBackend``
``certificate``     (``ip:port``, sha-256 fingerprint)                    ``AddCertificate`` (expired_at unset)
==================  ====================================================  ============================

The route key of an HTTP(S) frontend is sozu's own: ``"<ip:port>;<hostname>;<P|R|=><path>"`` plus
``";<method>"`` when a method is set. Objects are independent, as in sozu: a removed cluster's
frontends and backends stay (orphans are state too). A listener's ``active`` flag is part of its
value. Equality ignores record ids and record order; two states are equal when they hold the same
keys with equal messages.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from google.protobuf.message import Message

from sozud.proto import command_pb2 as pb
from sozud.serde import address_text
from sozud.versions import SozuVersion

Kind: TypeAlias = Literal[
    "listener",
    "cluster",
    "http_frontend",
    "https_frontend",
    "tcp_frontend",
    "udp_frontend",
    "backend",
    "certificate",
]
ObjKey: TypeAlias = tuple[str, ...]  # (kind, *identity)

KINDS: tuple[Kind, ...] = (
    "listener",
    "cluster",
    "certificate",
    "backend",
    "http_frontend",
    "https_frontend",
    "tcp_frontend",
    "udp_frontend",
)

LISTENER_TYPES = {"http": pb.HTTP, "https": pb.HTTPS, "tcp": pb.TCP, "udp": pb.UDP}
_PATH_PREFIX = {pb.PREFIX: "P", pb.REGEX: "R", pb.EQUALS: "="}


# --- identities ---------------------------------------------------------------------------------------


def route_key(front: pb.RequestHttpFrontend) -> str:
    """sozu's route key of an HTTP/HTTPS frontend (also the text of its 'already exists' error)."""
    key = f"{address_text(front.address)};{front.hostname};{_PATH_PREFIX.get(front.path.kind, 'P')}{front.path.value}"
    if front.HasField("method"):
        key += f";{front.method}"
    return key


def tags_key(tags: Mapping[str, str]) -> str:
    """A stable text for a tags map (part of TCP/UDP frontend identity)."""
    return ",".join(f"{k}={tags[k]}" for k in sorted(tags))


def certificate_fingerprint(cert: pb.CertificateAndKey) -> str:
    """Lowercase hex SHA-256 of the DER of the first PEM block of ``certificate`` (as sozu computes it)."""
    text = cert.certificate
    begin = text.find("-----BEGIN CERTIFICATE-----")
    end_marker = "-----END CERTIFICATE-----"
    end = text.find(end_marker, begin)
    if begin < 0 or end < 0:
        raise ValueError("certificate is not a PEM certificate")
    der = ssl.PEM_cert_to_DER_cert(text[begin : end + len(end_marker)])
    return hashlib.sha256(der).hexdigest()


def listener_key(kind: str, config: Message) -> ObjKey:
    address = getattr(config, "address")  # noqa: B009 - every *ListenerConfig has it
    assert isinstance(address, pb.SocketAddress)
    return ("listener", kind, address_text(address))


def key_of(kind: Kind, value: Message) -> ObjKey:
    """The key of ``value`` for an object of ``kind`` (listeners: use :func:`listener_key`)."""
    if kind == "cluster":
        assert isinstance(value, pb.Cluster)
        return ("cluster", value.cluster_id)
    if kind in ("http_frontend", "https_frontend"):
        assert isinstance(value, pb.RequestHttpFrontend)
        return (kind, route_key(value))
    if kind in ("tcp_frontend", "udp_frontend"):
        assert isinstance(value, pb.RequestTcpFrontend | pb.RequestUdpFrontend)
        return (kind, value.cluster_id, address_text(value.address), tags_key(value.tags))
    if kind == "backend":
        assert isinstance(value, pb.AddBackend)
        return ("backend", value.cluster_id, value.backend_id, address_text(value.address))
    if kind == "certificate":
        assert isinstance(value, pb.AddCertificate)
        return ("certificate", address_text(value.address), certificate_fingerprint(value.certificate))
    raise ValueError(f"key_of: unsupported kind {kind!r}")


# --- the state ----------------------------------------------------------------------------------------


@dataclass
class ConfigState:
    """A sozu configuration: object key -> the add-request message that creates it."""

    version: SozuVersion
    objects: dict[ObjKey, Message] = field(default_factory=dict)

    # -- building

    def put(self, key: ObjKey, value: Message) -> None:
        self.objects[key] = value

    def add_listener(self, kind: str, config: Message) -> ObjKey:
        key = listener_key(kind, config)
        self.objects[key] = config
        return key

    def add(self, kind: Kind, value: Message) -> ObjKey:
        key = key_of(kind, value)
        self.objects[key] = value
        return key

    # -- reading

    def __len__(self) -> int:
        return len(self.objects)

    def __iter__(self) -> Iterator[ObjKey]:
        return iter(self.objects)

    def __contains__(self, key: object) -> bool:
        return key in self.objects

    def get(self, key: ObjKey) -> Message | None:
        return self.objects.get(key)

    def of_kind(self, kind: Kind) -> Iterable[tuple[ObjKey, Message]]:
        return ((k, v) for k, v in self.objects.items() if k[0] == kind)

    def same_as(self, other: ConfigState) -> bool:
        """Semantic equality: same keys, equal messages (record ids and order do not matter)."""
        if self.objects.keys() != other.objects.keys():
            return False
        return all(v == other.objects[k] for k, v in self.objects.items())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfigState):
            return NotImplemented
        return self.same_as(other)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def copy(self) -> ConfigState:
        out = ConfigState(self.version)
        for k, v in self.objects.items():
            c = type(v)()
            c.CopyFrom(v)
            out.objects[k] = c
        return out

    def digest(self) -> str:
        """A content hash independent of order and record ids (sha-256 hex)."""
        h = hashlib.sha256()
        for k in sorted(self.objects):
            h.update("\x1f".join(k).encode())
            h.update(b"\x1e")
            h.update(self.objects[k].SerializeToString(deterministic=True))
            h.update(b"\x1d")
        return h.hexdigest()

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in self.objects:
            out[k[0]] = out.get(k[0], 0) + 1
        return out


def value_digest(value: Message) -> str:
    """Deterministic content hash of one object's value (used by the merge's tie-break)."""
    return hashlib.sha256(value.SerializeToString(deterministic=True)).hexdigest()
