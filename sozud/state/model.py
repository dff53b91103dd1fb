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
keys with equal values.

Inside, a value is held as its canonical bytes (its deterministic protobuf encoding, :func:`encode_value`)
under its decoded identity (the key): a compact, immutable value that compares as bytes. A message is built
from it only where one is needed (a request to send, a field to read), and each read gives a new one.
"""

from __future__ import annotations

import hashlib
import math
import ssl
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, MutableMapping
from typing import Any, Literal, TypeAlias

from google.protobuf.message import Message

from sozud.errors import StateError
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


_ABSENT: Any = object()

# The message type of each kind's value (listeners: of each listener kind).
_VALUE_TYPE: dict[str, type[Message]] = {
    "cluster": pb.Cluster,
    "http_frontend": pb.RequestHttpFrontend,
    "https_frontend": pb.RequestHttpFrontend,
    "tcp_frontend": pb.RequestTcpFrontend,
    "udp_frontend": pb.RequestUdpFrontend,
    "backend": pb.AddBackend,
    "certificate": pb.AddCertificate,
}
_LISTENER_TYPE: dict[str, type[Message]] = {
    "http": pb.HttpListenerConfig,
    "https": pb.HttpsListenerConfig,
    "tcp": pb.TcpListenerConfig,
    "udp": pb.UdpListenerConfig,
}


def value_type(key: ObjKey) -> type[Message]:
    """The message type of the value of the object ``key``."""
    try:
        return _LISTENER_TYPE[key[1]] if key[0] == "listener" else _VALUE_TYPE[key[0]]
    except (KeyError, IndexError):
        raise ValueError(f"not an object key: {key!r}") from None


def encode_value(value: Message) -> bytes:
    """A value's canonical bytes: its deterministic protobuf encoding (equal values, equal bytes)."""
    return value.SerializeToString(deterministic=True)


def decode_value(key: ObjKey, raw: bytes) -> Message:
    """The message of the object ``key`` whose canonical bytes are ``raw`` (a new message each call)."""
    return value_type(key).FromString(raw)


def _overlay_limit(size: int) -> int:
    """How many changed keys a state keeps over a shared mapping before a copy folds them in: about the
    square root of the state, so a copy costs O(sqrt n) and a fold, O(n), comes once every O(sqrt n)
    changes."""
    return max(256, 4 * math.isqrt(size))


class ConfigState(MutableMapping[ObjKey, Message]):
    """A sozu configuration: object key -> the add-request message that creates it.

    Values are held as their canonical bytes (:func:`encode_value`, about 40 bytes for a backend, where a
    message costs about 1 kB), keyed by their decoded identity (the key). Reading a value (``get``, ``[]``,
    ``items()``) decodes a new message each time: changing it changes nothing in the state; storing it
    (``put``, ``[]=``) encodes it. Comparisons, digests and the state-file writer work on the bytes
    (:meth:`raw`, :meth:`raw_items`) and decode only what they send or write anew.

    Copy-on-write: :meth:`shallow_copy` shares the mapping in O(changes kept), and each side then keeps
    its own changes over it. Point operations (``get``, ``in``, ``[]``, :meth:`put`, ``pop``, ``del``,
    ``len``) cost O(1) either way. Whole-state operations (iteration, ``items()``, :meth:`raw_items`,
    :meth:`same_as`, :meth:`digest`) first fold the changes into a mapping of this state's own, one O(n)
    copy, which a whole-state operation costs anyway. Incremental steps use point operations only.
    """

    __slots__ = ("_base", "_delta", "_over", "_shared", "version")

    def __init__(self, version: SozuVersion, objects: Mapping[ObjKey, Message] | None = None) -> None:
        self.version = version
        self._base: dict[ObjKey, bytes] = {} if objects is None else {k: encode_value(v) for k, v in objects.items()}
        # While ``_shared``, ``_base`` may be another state's too and is never written: changes go to
        # ``_over`` (None: removed). A state that is not shared has no ``_over`` and writes ``_base``.
        self._over: dict[ObjKey, bytes | None] = {}
        self._delta = 0  # len(self) - len(self._base)
        self._shared = False

    @classmethod
    def from_raw(cls, version: SozuVersion, objects: dict[ObjKey, bytes]) -> ConfigState:
        """A state holding ``objects`` (key -> canonical bytes); the dict becomes the state's own."""
        out = cls(version)
        out._base = objects
        return out

    def _own(self) -> dict[ObjKey, bytes]:
        """The whole mapping as a dict this state alone holds (folds any kept changes first: O(n) then)."""
        if self._shared:
            self._fold()
        return self._base

    def _fold(self) -> None:
        base = self._base.copy()
        for k, v in self._over.items():
            if v is None:
                base.pop(k, None)
            else:
                base[k] = v
        self._base, self._over, self._delta, self._shared = base, {}, 0, False

    # -- building

    def put(self, key: ObjKey, value: Message) -> None:
        self.put_raw(key, encode_value(value))

    def put_raw(self, key: ObjKey, raw: bytes) -> None:
        """Store the value whose canonical bytes are ``raw`` (:func:`encode_value`)."""
        if not self._shared:
            self._base[key] = raw
            return
        if self.raw(key) is None:
            self._delta += 1
        self._over[key] = raw

    def add_listener(self, kind: str, config: Message) -> ObjKey:
        key = listener_key(kind, config)
        self.put(key, config)
        return key

    def add(self, kind: Kind, value: Message) -> ObjKey:
        key = key_of(kind, value)
        self.put(key, value)
        return key

    def __setitem__(self, key: ObjKey, value: Message) -> None:
        self.put(key, value)

    def __delitem__(self, key: ObjKey) -> None:
        if self.pop_raw(key) is None:
            raise KeyError(key)

    def pop_raw(self, key: ObjKey) -> bytes | None:
        """Remove ``key``; its canonical bytes (None: it was absent)."""
        if not self._shared:
            return self._base.pop(key, None)
        raw = self.raw(key)
        if raw is not None:
            self._over[key] = None
            self._delta -= 1
        return raw

    def pop(self, key: ObjKey, default: Any = _ABSENT) -> Any:
        """Remove ``key`` and return its value (``default`` when absent; KeyError without one)."""
        raw = self.pop_raw(key)
        if raw is not None:
            return decode_value(key, raw)
        if default is _ABSENT:
            raise KeyError(key)
        return default

    # -- reading

    def raw(self, key: ObjKey) -> bytes | None:
        """The canonical bytes of ``key``'s value (None: absent)."""
        over = self._over
        if over:
            raw = over.get(key, _ABSENT)
            if raw is not _ABSENT:
                return raw  # type: ignore[no-any-return]  # bytes, or None for a removal
        return self._base.get(key)

    def get(self, key: ObjKey, default: Any = None) -> Any:
        raw = self.raw(key)
        return default if raw is None else decode_value(key, raw)

    def __getitem__(self, key: ObjKey) -> Message:
        raw = self.raw(key)
        if raw is None:
            raise KeyError(key)
        return decode_value(key, raw)

    def __len__(self) -> int:
        return len(self._base) + self._delta

    def __iter__(self) -> Iterator[ObjKey]:
        return iter(self._own())

    def __contains__(self, key: object) -> bool:
        return self.raw(key) is not None  # type: ignore[arg-type]  # any object may be asked about

    def keys(self) -> KeysView[ObjKey]:
        return self._own().keys()

    def raw_map(self) -> Mapping[ObjKey, bytes]:
        """The whole mapping, key -> canonical bytes, for reading (folds kept changes first: O(n) then).
        It is this state's own: it changes with the state."""
        return self._own()

    def raw_items(self) -> ItemsView[ObjKey, bytes]:
        """Every (key, canonical bytes), in the order the keys were first stored."""
        return self._own().items()

    def newest(self) -> ObjKey:
        """The key last added to a state that was never copied (the state-file reader's record cache)."""
        assert not self._shared, "newest() of a copied state"
        return next(reversed(self._base))

    def of_kind(self, kind: Kind) -> Iterable[tuple[ObjKey, Message]]:
        return ((k, decode_value(k, v)) for k, v in self._own().items() if k[0] == kind)

    def same_as(self, other: ConfigState) -> bool:
        """Semantic equality: same keys, equal values (record ids and order do not matter)."""
        return len(self) == len(other) and self._own() == other._own()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfigState):
            return NotImplemented
        return self.same_as(other)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"ConfigState({self.version}, {len(self)} objects)"

    def copy(self) -> ConfigState:
        """A state with the same objects and a mapping of its own (values are immutable bytes)."""
        return ConfigState.from_raw(self.version, dict(self._own()))

    def shallow_copy(self) -> ConfigState:
        """A state with the same objects that changes apart from this one. O(changes kept) (class
        docstring); :meth:`copy` copies the whole mapping."""
        if len(self._over) > _overlay_limit(len(self)):
            self._fold()
        out = ConfigState.from_raw(self.version, self._base)
        out._over, out._delta = dict(self._over), self._delta
        out._shared = self._shared = True
        return out

    def digest(self) -> str:
        """A content hash independent of order and record ids (sha-256 hex)."""
        objects = self._own()
        h = hashlib.sha256()
        for k in sorted(objects):
            h.update("\x1f".join(k).encode())
            h.update(b"\x1e")
            h.update(objects[k])
            h.update(b"\x1d")
        return h.hexdigest()

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in self._own():
            out[k[0]] = out.get(k[0], 0) + 1
        return out


def value_digest(value: Message | bytes) -> str:
    """Deterministic content hash of one object's value, a message or its canonical bytes (used by the
    merge's tie-break)."""
    return hashlib.sha256(value if isinstance(value, bytes) else encode_value(value)).hexdigest()


# --- listener helpers ----------------------------------------------------------------------------------

LISTENER_KIND_OF_TYPE: dict[int, str] = {v: k for k, v in LISTENER_TYPES.items()}
LISTENER_ADD_REQUEST: dict[str, str] = {
    "http": "add_http_listener",
    "https": "add_https_listener",
    "tcp": "add_tcp_listener",
    "udp": "add_udp_listener",
}
LISTENER_UPDATE_REQUEST: dict[str, str] = {
    "http": "update_http_listener",
    "https": "update_https_listener",
    "tcp": "update_tcp_listener",
    "udp": "update_udp_listener",
}
# The frontend kind that lives on a listener of each kind.
FRONTEND_KIND_OF_LISTENER: dict[str, Kind] = {
    "http": "http_frontend",
    "https": "https_frontend",
    "tcp": "tcp_frontend",
    "udp": "udp_frontend",
}
_ADD_REQUEST_OF_KIND: dict[str, str] = {
    "cluster": "add_cluster",
    "http_frontend": "add_http_frontend",
    "https_frontend": "add_https_frontend",
    "tcp_frontend": "add_tcp_frontend",
    "udp_frontend": "add_udp_frontend",
    "backend": "add_backend",
    "certificate": "add_certificate",
}


def add_request(key: ObjKey, value: Message | bytes) -> pb.Request:
    """The request that creates the object ``key`` with ``value`` (a message, copied, or its canonical
    bytes, parsed into the request's field)."""
    req = pb.Request()
    field = getattr(req, add_request_field(key))
    if isinstance(value, bytes):
        field.SetInParent()  # the field is set even when every value of the object is a default
        field.MergeFromString(value)
    else:
        field.CopyFrom(value)
    return req


def add_request_field(key: ObjKey) -> str:
    """The field of ``Request`` that adds the object ``key``."""
    return LISTENER_ADD_REQUEST[key[1]] if key[0] == "listener" else _ADD_REQUEST_OF_KIND[key[0]]


def object_address(key: ObjKey) -> str | None:
    """The ``ip:port`` a listener, frontend or certificate key refers to (None for clusters, backends)."""
    kind = key[0]
    if kind == "listener":
        return key[2]
    if kind == "certificate":
        return key[1]
    if kind in ("tcp_frontend", "udp_frontend"):
        return key[2]
    if kind in ("http_frontend", "https_frontend"):
        return key[1].split(";", 1)[0]
    return None


def describe(key: ObjKey) -> str:
    """A short human text for an object key (never contains secrets)."""
    kind = key[0]
    if kind == "listener":
        return f"{key[1]} listener {key[2]}"
    if kind == "cluster":
        return f"cluster {key[1]}"
    if kind in ("http_frontend", "https_frontend"):
        return f"{kind.replace('_', ' ')} {key[1]}"
    if kind in ("tcp_frontend", "udp_frontend"):
        tags = f" tags {{{key[3]}}}" if len(key) > 3 and key[3] else ""
        return f"{kind.replace('_', ' ')} {key[1]} @ {key[2]}{tags}"
    if kind == "backend":
        return f"backend {key[1]}/{key[2]} @ {key[3]}"
    if kind == "certificate":
        return f"certificate {key[1]} sha256:{key[2][:16]}"
    return " ".join(key)


def copy_message(value: Message) -> Message:
    out = type(value)()
    out.CopyFrom(value)
    return out


# --- sozu main-state semantics ---------------------------------------------------------------------------


def apply_request(state: ConfigState, req: pb.Request) -> None:
    """Apply one configuration request to ``state`` the way sozu's main process does (§3.3, §7.2).

    Raises :class:`~sozud.errors.StateError` with sozu-like text when sozu's main state would refuse it
    (duplicate, missing object, or a request that is not a stored-configuration request: queries and
    runtime-only requests). ``state`` is unchanged on error. Known simplifications: ``add_certificate``
    with empty ``names`` stores the names as sent (1.x/2.x derive them from the certificate in an
    unspecified order), and ``replace_certificate`` on an address that has no certificate left is
    refused (sozu keeps an empty per-address table once an address has had one). The state stores
    what it is given as bytes: ``req`` stays the caller's.
    """
    kind = req.WhichOneof("request_type")
    if kind is None:
        raise StateError("empty request (no request_type)")
    handler = _HANDLERS.get(kind)
    if handler is None:
        raise StateError(f"{kind} is not a configuration request (sozu's state cannot hold it)")
    handler(state, kind, getattr(req, kind))


Objects: TypeAlias = ConfigState


def _listener_request(objects: Objects, kind: str, value: Any) -> None:
    if kind.startswith("add_"):
        lkind = kind[len("add_") : -len("_listener")]
        key = listener_key(lkind, value)
        if key in objects:
            raise StateError(f"{_LISTENER_NAME[lkind]} '{key[2]}' already exists")
        objects[key] = value
        return
    if kind.startswith("update_"):
        lkind = kind[len("update_") : -len("_listener")]
    else:
        found = LISTENER_KIND_OF_TYPE.get(value.proxy)
        if found is None:
            raise StateError(f"{kind}: unknown listener type {value.proxy}")
        lkind = found
    key = ("listener", lkind, address_text(value.address))
    if kind == "remove_listener":
        if key not in objects:
            raise StateError("dispatching this request did not bring any change to the state")
        del objects[key]
        return
    if key not in objects:
        raise StateError(f"Did not find {_LISTENER_NAME[lkind]} with address or id '{key[2]}'")
    if kind.startswith("update_"):
        objects[key] = _patched_listener(objects[key], value)
        return
    new = objects[key]  # a message of its own (ConfigState decodes a new one per read)
    setattr(new, "active", kind == "activate_listener")  # noqa: B010 - every listener config has it
    objects[key] = new


def _cluster_request(objects: Objects, kind: str, value: Any) -> None:
    if kind == "add_cluster":
        objects[("cluster", value.cluster_id)] = value
        return
    cid = value.cluster_id if kind == "set_health_check" else value
    ckey = ("cluster", cid)
    if ckey not in objects:
        raise StateError(f"Did not find Cluster with address or id '{cid}'")
    if kind == "remove_cluster":
        del objects[ckey]
        return
    cluster = objects[ckey]
    assert isinstance(cluster, pb.Cluster)
    if kind == "set_health_check":
        cluster.health_check.CopyFrom(value.config)
    else:
        cluster.ClearField("health_check")
    objects[ckey] = cluster


def _http_frontend_request(objects: Objects, kind: str, value: Any) -> None:
    hkind = "http_frontend" if "https" not in kind else "https_frontend"
    key = (hkind, route_key(value))
    name = "HttpFrontend" if hkind == "http_frontend" else "HttpsFrontend"
    if kind.startswith("add_"):
        if key in objects:
            raise StateError(f"{name} '{key[1]}' already exists")
        objects[key] = value
        return
    if key not in objects:
        raise StateError(f"Did not find {name} with address or id '{key[1]}'")
    del objects[key]


def _l4_frontend_request(objects: Objects, kind: str, value: Any) -> None:
    fkind: Kind = "tcp_frontend" if "tcp" in kind else "udp_frontend"
    name = "TcpFrontend" if fkind == "tcp_frontend" else "UdpFrontend"
    if kind.startswith("add_"):
        key = key_of(fkind, value)
        if key in objects:
            raise StateError(f"{name} already exists")
        objects[key] = value
        return
    addr = address_text(value.address)
    same_cluster = [k for k in objects if k[0] == fkind and k[1] == value.cluster_id]
    if not same_cluster:
        raise StateError(f"Did not find {name}")
    doomed = [k for k in same_cluster if k[2] == addr]
    if not doomed:
        raise StateError("dispatching this request did not bring any change to the state")
    for k in doomed:
        del objects[k]


def _backend_request(objects: Objects, kind: str, value: Any) -> None:
    if kind == "add_backend":
        objects[key_of("backend", value)] = value
        return
    key = ("backend", value.cluster_id, value.backend_id, address_text(value.address))
    if key not in objects:
        raise StateError("dispatching this request did not bring any change to the state")
    del objects[key]


def _certificate_request(objects: Objects, kind: str, value: Any) -> None:
    if kind == "add_certificate":
        try:
            key = key_of("certificate", value)
        except ValueError as e:
            raise StateError(f"Could not add certificate: {e}") from None
        if key not in objects:
            new = copy_message(value)
            new.ClearField("expired_at")
            objects[key] = new
        return
    addr = address_text(value.address)
    if kind == "remove_certificate":
        objects.pop(("certificate", addr, value.fingerprint.lower()), None)
        return
    old_key = ("certificate", addr, value.old_fingerprint.lower())
    if old_key not in objects and not any(k[0] == "certificate" and k[1] == addr for k in objects):
        raise StateError(f"Did not find Certificate with address or id '{addr}'")
    try:
        new_fp = certificate_fingerprint(value.new_certificate)
    except ValueError as e:
        raise StateError(f"Could not replace certificate: {e}") from None
    objects.pop(old_key, None)
    objects[("certificate", addr, new_fp)] = pb.AddCertificate(address=value.address, certificate=value.new_certificate)


_Handler: TypeAlias = Callable[[Objects, str, Any], None]
_HANDLERS: dict[str, _Handler] = {
    **dict.fromkeys(
        ("add_http_listener", "add_https_listener", "add_tcp_listener", "add_udp_listener"), _listener_request
    ),
    **dict.fromkeys(("remove_listener", "activate_listener", "deactivate_listener"), _listener_request),
    **dict.fromkeys(LISTENER_UPDATE_REQUEST.values(), _listener_request),
    **dict.fromkeys(("add_cluster", "remove_cluster", "set_health_check", "remove_health_check"), _cluster_request),
    **dict.fromkeys(
        ("add_http_frontend", "add_https_frontend", "remove_http_frontend", "remove_https_frontend"),
        _http_frontend_request,
    ),
    **dict.fromkeys(
        ("add_tcp_frontend", "add_udp_frontend", "remove_tcp_frontend", "remove_udp_frontend"), _l4_frontend_request
    ),
    **dict.fromkeys(("add_backend", "remove_backend"), _backend_request),
    **dict.fromkeys(("add_certificate", "remove_certificate", "replace_certificate"), _certificate_request),
}


_LISTENER_NAME = {"http": "HttpListener", "https": "HttpsListener", "tcp": "TcpListener", "udp": "UdpListener"}


def _patched_listener(current: Message, patch: Message) -> Message:
    """sozu's in-place listener patch: every field set in ``patch`` overwrites the stored one (``current``
    is changed and returned)."""
    new = current
    for fd, val in patch.ListFields():
        name = fd.name
        if name == "address":
            continue
        if name == "http_answers":
            answers = getattr(new, "http_answers")  # noqa: B009
            answers.SetInParent()
            for afd, aval in val.ListFields():
                setattr(answers, afd.name, aval)
        elif name == "alpn_protocols":
            target = getattr(new, "alpn_protocols")  # noqa: B009
            del target[:]
            target.extend(val.values)
        elif name == "answers":
            target_map = getattr(new, "answers")  # noqa: B009
            for k, v in val.items():
                if v:
                    target_map[k] = v
        elif fd.message_type is not None:
            getattr(new, name).CopyFrom(val)
        else:
            setattr(new, name, val)
    return new
