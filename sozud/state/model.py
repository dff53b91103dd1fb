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
import math
import ssl
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, MutableMapping, ValuesView
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


def _overlay_limit(size: int) -> int:
    """How many changed keys a state keeps over a shared mapping before a copy folds them in: about the
    square root of the state, so a copy costs O(sqrt n) and a fold, O(n), comes once every O(sqrt n)
    changes."""
    return max(256, 4 * math.isqrt(size))


class ConfigState(MutableMapping[ObjKey, Message]):
    """A sozu configuration: object key -> the add-request message that creates it.

    Copy-on-write: :meth:`shallow_copy` shares the mapping in O(changes kept), and each side then keeps
    its own changes over it. Point operations (``get``, ``in``, ``[]``, :meth:`put`, ``pop``, ``del``,
    ``len``) cost O(1) either way. Whole-state operations (iteration, ``items()``, :attr:`objects`,
    :meth:`same_as`, :meth:`digest`) first fold the changes into a mapping of this state's own, one O(n)
    copy, which a whole-state operation costs anyway. Incremental steps use point operations only.
    """

    __slots__ = ("_base", "_delta", "_over", "_shared", "version")

    def __init__(self, version: SozuVersion, objects: dict[ObjKey, Message] | None = None) -> None:
        self.version = version
        self._base: dict[ObjKey, Message] = {} if objects is None else objects  # the caller's, now ours
        # While ``_shared``, ``_base`` may be another state's too and is never written: changes go to
        # ``_over`` (None: removed). A state that is not shared has no ``_over`` and writes ``_base``.
        self._over: dict[ObjKey, Message | None] = {}
        self._delta = 0  # len(self) - len(self._base)
        self._shared = False

    @property
    def objects(self) -> dict[ObjKey, Message]:
        """The whole mapping as a dict this state alone holds (writes to it are writes to the state).
        Folds any kept changes first (O(n) then). Do not keep it across a :meth:`shallow_copy`."""
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
        if not self._shared:
            self._base[key] = value
            return
        if self.get(key) is None:
            self._delta += 1
        self._over[key] = value

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
        if self.pop(key, _ABSENT) is _ABSENT:
            raise KeyError(key)

    def pop(self, key: ObjKey, default: Any = _ABSENT) -> Any:
        """Remove ``key`` and return its value (``default`` when absent; KeyError without one)."""
        if not self._shared:
            value = self._base.pop(key, default)
        else:
            value = self.get(key)
            if value is None:
                value = default
            else:
                self._over[key] = None
                self._delta -= 1
        if value is _ABSENT:
            raise KeyError(key)
        return value

    # -- reading

    def get(self, key: ObjKey, default: Any = None) -> Any:
        over = self._over
        if over:
            value = over.get(key, _ABSENT)
            if value is not _ABSENT:
                return default if value is None else value
        return self._base.get(key, default)

    def __getitem__(self, key: ObjKey) -> Message:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        assert isinstance(value, Message)
        return value

    def __len__(self) -> int:
        return len(self._base) + self._delta

    def __iter__(self) -> Iterator[ObjKey]:
        return iter(self.objects)

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]  # any object may be asked about

    def keys(self) -> KeysView[ObjKey]:
        return self.objects.keys()

    def items(self) -> ItemsView[ObjKey, Message]:
        return self.objects.items()

    def values(self) -> ValuesView[Message]:
        return self.objects.values()

    def of_kind(self, kind: Kind) -> Iterable[tuple[ObjKey, Message]]:
        return ((k, v) for k, v in self.objects.items() if k[0] == kind)

    def same_as(self, other: ConfigState) -> bool:
        """Semantic equality: same keys, equal messages (record ids and order do not matter)."""
        if len(self) != len(other):
            return False
        mine, theirs = self.objects, other.objects
        if mine.keys() != theirs.keys():
            return False
        return all(v == theirs[k] for k, v in mine.items())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfigState):
            return NotImplemented
        return self.same_as(other)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"ConfigState({self.version}, {len(self)} objects)"

    def copy(self) -> ConfigState:
        out = ConfigState(self.version)
        for k, v in self.objects.items():
            c = type(v)()
            c.CopyFrom(v)
            out._base[k] = c
        return out

    def shallow_copy(self) -> ConfigState:
        """A state with the same objects that changes apart from this one, sharing the messages (for
        callers that add, replace or remove objects but never modify a message in place: sozud's own code
        changes an object by storing a new message, see :func:`apply_request`). O(changes kept) (class
        docstring); :meth:`copy` copies the messages too."""
        if len(self._over) > _overlay_limit(len(self)):
            self._fold()
        out = ConfigState(self.version, self._base)
        out._over, out._delta = dict(self._over), self._delta
        out._shared = self._shared = True
        return out

    def digest(self) -> str:
        """A content hash independent of order and record ids (sha-256 hex)."""
        objects = self.objects
        h = hashlib.sha256()
        for k in sorted(objects):
            h.update("\x1f".join(k).encode())
            h.update(b"\x1e")
            h.update(objects[k].SerializeToString(deterministic=True))
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


def add_request(key: ObjKey, value: Message) -> pb.Request:
    """The request that creates the object ``key`` with ``value`` (a copy of ``value``)."""
    field_name = LISTENER_ADD_REQUEST[key[1]] if key[0] == "listener" else _ADD_REQUEST_OF_KIND[key[0]]
    req = pb.Request()
    getattr(req, field_name).CopyFrom(value)
    return req


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


def apply_request(state: ConfigState, req: pb.Request, *, copy: bool = True) -> None:
    """Apply one configuration request to ``state`` the way sozu's main process does (§3.3, §7.2).

    Raises :class:`~sozud.errors.StateError` with sozu-like text when sozu's main state would refuse it
    (duplicate, missing object, or a request that is not a stored-configuration request: queries and
    runtime-only requests). ``state`` is unchanged on error. Known simplifications: ``add_certificate``
    with empty ``names`` stores the names as sent (1.x/2.x derive them from the certificate in an
    unspecified order), and ``replace_certificate`` on an address that has no certificate left is
    refused (sozu keeps an empty per-address table once an address has had one).

    ``copy=False`` lets the state keep the request's messages instead of copies (the caller must not
    use ``req`` afterwards; the state-file reader does this).
    """
    own = copy_message if copy else _same
    kind = req.WhichOneof("request_type")
    if kind is None:
        raise StateError("empty request (no request_type)")
    handler = _HANDLERS.get(kind)
    if handler is None:
        raise StateError(f"{kind} is not a configuration request (sozu's state cannot hold it)")
    handler(state, kind, getattr(req, kind), own)


Objects: TypeAlias = ConfigState
_Own: TypeAlias = Callable[[Message], Message]


def _listener_request(objects: Objects, kind: str, value: Any, own: _Own) -> None:
    if kind.startswith("add_"):
        lkind = kind[len("add_") : -len("_listener")]
        key = listener_key(lkind, value)
        if key in objects:
            raise StateError(f"{_LISTENER_NAME[lkind]} '{key[2]}' already exists")
        objects[key] = own(value)
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
    new = copy_message(objects[key])
    setattr(new, "active", kind == "activate_listener")  # noqa: B010 - every listener config has it
    objects[key] = new


def _cluster_request(objects: Objects, kind: str, value: Any, own: _Own) -> None:
    if kind == "add_cluster":
        objects[("cluster", value.cluster_id)] = own(value)
        return
    cid = value.cluster_id if kind == "set_health_check" else value
    ckey = ("cluster", cid)
    if ckey not in objects:
        raise StateError(f"Did not find Cluster with address or id '{cid}'")
    if kind == "remove_cluster":
        del objects[ckey]
        return
    cluster = copy_message(objects[ckey])
    assert isinstance(cluster, pb.Cluster)
    if kind == "set_health_check":
        cluster.health_check.CopyFrom(value.config)
    else:
        cluster.ClearField("health_check")
    objects[ckey] = cluster


def _http_frontend_request(objects: Objects, kind: str, value: Any, own: _Own) -> None:
    hkind = "http_frontend" if "https" not in kind else "https_frontend"
    key = (hkind, route_key(value))
    name = "HttpFrontend" if hkind == "http_frontend" else "HttpsFrontend"
    if kind.startswith("add_"):
        if key in objects:
            raise StateError(f"{name} '{key[1]}' already exists")
        objects[key] = own(value)
        return
    if key not in objects:
        raise StateError(f"Did not find {name} with address or id '{key[1]}'")
    del objects[key]


def _l4_frontend_request(objects: Objects, kind: str, value: Any, own: _Own) -> None:
    fkind: Kind = "tcp_frontend" if "tcp" in kind else "udp_frontend"
    name = "TcpFrontend" if fkind == "tcp_frontend" else "UdpFrontend"
    if kind.startswith("add_"):
        key = key_of(fkind, value)
        if key in objects:
            raise StateError(f"{name} already exists")
        objects[key] = own(value)
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


def _backend_request(objects: Objects, kind: str, value: Any, own: _Own) -> None:
    if kind == "add_backend":
        new = own(value)
        objects[key_of("backend", new)] = new
        return
    key = ("backend", value.cluster_id, value.backend_id, address_text(value.address))
    if key not in objects:
        raise StateError("dispatching this request did not bring any change to the state")
    del objects[key]


def _certificate_request(objects: Objects, kind: str, value: Any, own: _Own) -> None:
    if kind == "add_certificate":
        try:
            key = key_of("certificate", value)
        except ValueError as e:
            raise StateError(f"Could not add certificate: {e}") from None
        if key not in objects:
            new = own(value)
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


_Handler: TypeAlias = Callable[[Objects, str, Any, _Own], None]
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


def _same(value: Message) -> Message:
    return value


_LISTENER_NAME = {"http": "HttpListener", "https": "HttpsListener", "tcp": "TcpListener", "udp": "UdpListener"}


def _patched_listener(current: Message, patch: Message) -> Message:
    """sozu's in-place listener patch: every field set in ``patch`` overwrites the stored one."""
    new = copy_message(current)
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
