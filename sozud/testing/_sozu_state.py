"""The main-process configuration state of the sozu simulator (pure, synchronous, no I/O).

``SozuMainState`` reproduces what sozu's ``ConfigState`` does with each request, for the three
protocol families (docs/sozu-command-protocol.md §3.3, §5, §6, §7.2, §11.3 and §12; checked against the
captures in shared/fixtures). It is the independent referee that sozud's planner is tested against, so
it keeps its own bookkeeping and does not reuse ``sozud.state.model.ConfigState``.

What it reproduces:

- identity keys: listeners by (type, address); clusters by id (upsert); HTTP/HTTPS frontends by route
  key (duplicate = error); TCP/UDP frontends by (cluster, address, tags) for the duplicate check and by
  (cluster, address) for removal (all frontends of the cluster at that address go); backends by
  (cluster, backend_id, address) (upsert); certificates by (address, fingerprint);
- no referential checks and no cascade (orphans stay);
- sozu's error texts (without the ``could not dispatch request on the main process state: `` prefix);
- certificate names derived from CN + DNS SANs when sent empty (1.x/2.x) or kept as sent (0.15), never
  any ``expired_at``; ``replace_certificate`` stores the new certificate as sent;
- request counters (sozu's counter starts each name at 2: it inserts 1 then increments);
- ``save_state`` bytes (record order of §6.3) and ``load_state`` parsing.

Where sozu's own order is a hash-map order (certificates, TCP frontends by cluster), insertion order
is used here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID
from google.protobuf.message import Message

from sozud.errors import StateParseError
from sozud.proto import command_pb2 as pb
from sozud.serde import address_sort_key, address_text, from_json, to_json
from sozud.versions import STORED_REQUESTS, Family, SozuVersion

NO_CHANGE = "dispatching this request did not bring any change to the state"
LISTENER_KIND: dict[int, str] = {
    pb.HTTP: "HttpListener",
    pb.HTTPS: "HttpsListener",
    pb.TCP: "TcpListener",
    pb.UDP: "UdpListener",
}
_LISTENER_REQUEST = {
    "add_http_listener": pb.HTTP,
    "add_https_listener": pb.HTTPS,
    "add_tcp_listener": pb.TCP,
    "add_udp_listener": pb.UDP,
}
_UPDATE_REQUEST = {
    "update_http_listener": pb.HTTP,
    "update_https_listener": pb.HTTPS,
    "update_tcp_listener": pb.TCP,
    "update_udp_listener": pb.UDP,
}
_PATH_PREFIX = {pb.PREFIX: "P", pb.REGEX: "R", pb.EQUALS: "="}
# Requests the main state stores (or refuses); other requests never reach ConfigState::dispatch.
# Worker-bound requests that pass the main state without being stored.
PASS_THROUGH_REQUESTS = frozenset({"configure_metrics", "Logging", "set_max_connections_per_ip", "set_metric_detail"})
_RECORD_SEPARATOR = b"\n\x00"


def request_name(kind: str) -> str:
    """sozu's name of a request type in ``count_requests`` (``add_cluster`` -> ``AddCluster``)."""
    return "".join(part[:1].upper() + part[1:] for part in kind.split("_"))


def route_key(front: pb.RequestHttpFrontend) -> str:
    """``<ip:port>;<hostname>;<P|R|=><path>[;<method>]`` (sozu's key and error text)."""
    key = f"{address_text(front.address)};{front.hostname};{_PATH_PREFIX.get(front.path.kind, 'P')}{front.path.value}"
    if front.HasField("method"):
        key += f";{front.method}"
    return key


def rust_debug_str(text: str) -> str:
    """A string as Rust's ``{:?}`` prints it (quoted, escaped)."""
    out = ['"']
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\0":
            out.append("\\0")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _debug_tags(tags: Any) -> str:
    return "{" + ", ".join(f"{rust_debug_str(k)}: {rust_debug_str(tags[k])}" for k in sorted(tags)) + "}"


def _debug_socket_address(addr: pb.SocketAddress) -> str:
    inner = addr.ip.WhichOneof("inner")
    if inner == "v6":
        ip = f"Some(V6(Uint128 {{ low: {addr.ip.v6.low}, high: {addr.ip.v6.high} }}))"
    elif inner == "v4":
        ip = f"Some(V4({addr.ip.v4}))"
    else:
        ip = "None"
    return f"SocketAddress {{ ip: IpAddress {{ inner: {ip} }}, port: {addr.port} }}"


# --- certificates ----------------------------------------------------------------------------------

_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


class CertificateProblem(Exception):
    """A certificate that sozu's PEM or X509 parser refuses; ``str()`` is sozu's error text."""


def pem_der(certificate: str) -> bytes:
    """DER bytes of the first PEM block (sozu's ``parse_x509_pem``); raises ``CertificateProblem``."""
    data = certificate.encode()
    m = _PEM_BEGIN.search(data)
    if m is None:
        raise CertificateProblem("Could not parse PEM certificate from bytes: Parsing Error: MissingHeader")
    end_marker = b"-----END " + m.group(1) + b"-----"
    end = data.find(end_marker, m.end())
    if end < 0:
        raise CertificateProblem("Could not parse PEM certificate from bytes: Parsing Error: MissingFooter")
    body = b"".join(data[m.end() : end].split())
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise CertificateProblem(
            "Could not parse PEM certificate from bytes: Parsing Error: Base64DecodeError"
        ) from None


def fingerprint_of(certificate: str) -> str:
    """Lowercase hex SHA-256 of the first PEM block's DER (no X509 parsing, as sozu)."""
    return hashlib.sha256(pem_der(certificate)).hexdigest()


def parse_x509(certificate: str) -> x509.Certificate:
    der = pem_der(certificate)
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise CertificateProblem("Could not parse X509 certificate from bytes: Parsing Error: NomError(Eof)") from None


def certificate_names(certificate: str) -> list[str]:
    """CN values then DNS SANs, consecutive duplicates dropped (sozu's ``get_cn_and_san_attributes``)."""
    cert = parse_x509(certificate)
    names: list[str] = []
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value
        names.append(value if isinstance(value, str) else bytes(value).decode("utf-8", "replace"))
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        san = None
    if isinstance(san, x509.SubjectAlternativeName):
        names.extend(san.get_values_for_type(x509.DNSName))
    deduped: list[str] = []
    for name in names:
        if not deduped or deduped[-1] != name:
            deduped.append(name)
    return deduped


def certificate_not_after(certificate: str) -> float:
    try:
        return parse_x509(certificate).not_valid_after_utc.timestamp()
    except CertificateProblem:
        return 0.0


def _hex_error(text: str) -> str | None:
    """The ``hex`` crate's error for a string that is not hex, or None."""
    for i, ch in enumerate(text):
        if ch not in "0123456789abcdefABCDEF":
            return f"Invalid character {ch!r} at position {i}"
    if len(text) % 2:
        return "Odd number of digits"
    return None


# --- the state -----------------------------------------------------------------------------------


@dataclass
class DispatchResult:
    """What one request did to the main state (``error`` None = accepted)."""

    error: str | None = None
    removed_backends: list[tuple[str, pb.SocketAddress]] = field(default_factory=list)
    worker_error: str | None = None  # what workers would answer (missing listener, bad certificate)


def _copy(msg: Message) -> Any:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def _backend_sort_key(b: pb.AddBackend) -> tuple[Any, ...]:
    return (
        b.backend_id,
        (1, b.sticky_id) if b.HasField("sticky_id") else (0, ""),
        (1, b.load_balancing_parameters.weight) if b.HasField("load_balancing_parameters") else (0, 0),
        (1, int(b.backup)) if b.HasField("backup") else (0, 0),
        address_sort_key(b.address),
    )


def _hash_of(info: pb.ClusterInformation | None) -> int:
    data = b"" if info is None else info.SerializeToString(deterministic=True)
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


class SozuMainState:
    """sozu's main-process ``ConfigState`` for one version; ``dispatch`` applies one request."""

    def __init__(self, version: SozuVersion) -> None:
        self.version = version
        self.listeners: dict[int, dict[str, Any]] = {pb.HTTP: {}, pb.HTTPS: {}, pb.TCP: {}, pb.UDP: {}}
        self.clusters: dict[str, pb.Cluster] = {}
        self.http_fronts: dict[str, pb.RequestHttpFrontend] = {}
        self.https_fronts: dict[str, pb.RequestHttpFrontend] = {}
        self.tcp_fronts: dict[str, list[pb.RequestTcpFrontend]] = {}
        self.udp_fronts: dict[str, list[pb.RequestUdpFrontend]] = {}
        # address text -> fingerprint -> stored certificate (insertion order stands for sozu's hash order)
        self.certificates: dict[str, dict[str, pb.CertificateAndKey]] = {}
        self.certificate_addresses: dict[str, pb.SocketAddress] = {}
        self.backends: dict[str, list[pb.AddBackend]] = {}
        self.request_counts: dict[str, int] = {}
        self._generation = 0
        self._hashes: tuple[int, dict[str, int]] | None = None
        self._infos: tuple[int, dict[str, pb.ClusterInformation]] | None = None
        self._encoded: dict[bytes, bytes] = {}  # request (protobuf) -> its JSON, from the last state file
        self._encoded_version: SozuVersion | None = None

    # -- small helpers

    @property
    def _is_015(self) -> bool:
        return self.version.family is Family.V0_15

    def _address_key(self, text: str, addr: pb.SocketAddress) -> Any:
        return text if self._is_015 else address_sort_key(addr)

    def _count(self, kind: str) -> None:
        name = request_name(kind)
        self.request_counts[name] = self.request_counts.get(name, 1) + 1

    # -- dispatch

    def dispatch(self, req: pb.Request) -> str | None:
        """Apply ``req``; None when accepted, else sozu's main-state error text (no prefix)."""
        return self.apply(req).error

    def apply(self, req: pb.Request) -> DispatchResult:
        """``dispatch`` with the details the simulated workers need."""
        kind = req.WhichOneof("request_type")
        if kind is None:
            return DispatchResult("Request came in empty")
        if kind not in STORED_REQUESTS and kind not in PASS_THROUGH_REQUESTS:
            return DispatchResult("State can not handle this request")
        self._count(kind)
        if kind in PASS_THROUGH_REQUESTS:
            return DispatchResult()
        handler = getattr(self, f"_do_{kind}")
        result: DispatchResult = handler(getattr(req, kind))
        self._generation += 1  # cached views (cluster hashes) are recomputed on next use
        return result

    # clusters

    def _do_add_cluster(self, cluster: pb.Cluster) -> DispatchResult:
        self.clusters[cluster.cluster_id] = _copy(cluster)
        return DispatchResult()

    def _do_remove_cluster(self, cluster_id: str) -> DispatchResult:
        if self.clusters.pop(cluster_id, None) is None:
            return DispatchResult(f"Did not find Cluster with address or id '{cluster_id}'")
        return DispatchResult()

    def _do_set_health_check(self, req: pb.SetHealthCheck) -> DispatchResult:
        cluster = self.clusters.get(req.cluster_id)
        if cluster is None:
            return DispatchResult(f"Did not find Cluster with address or id '{req.cluster_id}'")
        cluster.health_check.CopyFrom(req.config)
        return DispatchResult()

    def _do_remove_health_check(self, cluster_id: str) -> DispatchResult:
        cluster = self.clusters.get(cluster_id)
        if cluster is None:
            return DispatchResult(f"Did not find Cluster with address or id '{cluster_id}'")
        if not cluster.HasField("health_check"):
            return DispatchResult(NO_CHANGE)
        cluster.ClearField("health_check")
        return DispatchResult()

    # listeners

    def _add_listener(self, ltype: int, config: Any) -> DispatchResult:
        text = address_text(config.address)
        table = self.listeners[ltype]
        if text in table:
            return DispatchResult(f"{LISTENER_KIND[ltype]} '{text}' already exists")
        table[text] = _copy(config)
        return DispatchResult()

    def _do_add_http_listener(self, c: pb.HttpListenerConfig) -> DispatchResult:
        return self._add_listener(pb.HTTP, c)

    def _do_add_https_listener(self, c: pb.HttpsListenerConfig) -> DispatchResult:
        return self._add_listener(pb.HTTPS, c)

    def _do_add_tcp_listener(self, c: pb.TcpListenerConfig) -> DispatchResult:
        return self._add_listener(pb.TCP, c)

    def _do_add_udp_listener(self, c: pb.UdpListenerConfig) -> DispatchResult:
        return self._add_listener(pb.UDP, c)

    def _update_listener(self, ltype: int, patch: Any) -> DispatchResult:
        text = address_text(patch.address)
        stored = self.listeners[ltype].get(text)
        if stored is None:
            return DispatchResult(f"Did not find {LISTENER_KIND[ltype]} with address or id '{text}'")
        for fd, value in patch.ListFields():
            name = fd.name
            if name == "address":
                continue
            if name.startswith("h2_") and value == 0:
                return DispatchResult(f"Invalid value for field '{name}': must be greater than 0")
            if name == "http_answers":
                stored.http_answers.MergeFrom(value)
            elif name == "answers":
                for k, v in value.items():
                    if v:
                        stored.answers[k] = v
            elif name == "alpn_protocols":
                del stored.alpn_protocols[:]
                stored.alpn_protocols.extend(list(value.values) or ["h2", "http/1.1"])
            elif name == "hsts":
                stored.hsts.CopyFrom(value)
            elif fd.message_type is not None:
                getattr(stored, name).CopyFrom(value)
            else:
                setattr(stored, name, value)
        return DispatchResult()

    def _do_update_http_listener(self, p: pb.UpdateHttpListenerConfig) -> DispatchResult:
        return self._update_listener(pb.HTTP, p)

    def _do_update_https_listener(self, p: pb.UpdateHttpsListenerConfig) -> DispatchResult:
        return self._update_listener(pb.HTTPS, p)

    def _do_update_tcp_listener(self, p: pb.UpdateTcpListenerConfig) -> DispatchResult:
        return self._update_listener(pb.TCP, p)

    def _do_update_udp_listener(self, p: pb.UpdateUdpListenerConfig) -> DispatchResult:
        return self._update_listener(pb.UDP, p)

    def _do_remove_listener(self, req: pb.RemoveListener) -> DispatchResult:
        table = self.listeners.get(req.proxy)
        if table is None or table.pop(address_text(req.address), None) is None:
            return DispatchResult(NO_CHANGE)
        return DispatchResult()

    def _set_active(self, ltype: int, addr: pb.SocketAddress, active: bool) -> DispatchResult:
        text = address_text(addr)
        table = self.listeners.get(ltype)
        stored = None if table is None else table.get(text)
        if stored is None:
            kind = LISTENER_KIND.get(ltype, "HttpListener")
            return DispatchResult(f"Did not find {kind} with address or id '{text}'")
        stored.active = active
        return DispatchResult()

    def _do_activate_listener(self, req: pb.ActivateListener) -> DispatchResult:
        return self._set_active(req.proxy, req.address, True)

    def _do_deactivate_listener(self, req: pb.DeactivateListener) -> DispatchResult:
        return self._set_active(req.proxy, req.address, False)

    # HTTP / HTTPS frontends

    def _add_front(
        self, table: dict[str, pb.RequestHttpFrontend], kind: str, front: pb.RequestHttpFrontend
    ) -> DispatchResult:
        key = route_key(front)
        if key in table:
            return DispatchResult(f"{kind} '{key}' already exists")
        table[key] = _copy(front)
        return DispatchResult(
            worker_error=self._missing_listener(pb.HTTP if kind == "HttpFrontend" else pb.HTTPS, front.address)
        )

    def _remove_front(
        self, table: dict[str, pb.RequestHttpFrontend], kind: str, front: pb.RequestHttpFrontend
    ) -> DispatchResult:
        key = route_key(front)
        if table.pop(key, None) is None:
            return DispatchResult(f"Did not find {kind} with address or id '{key}'")
        return DispatchResult()

    def _do_add_http_frontend(self, f: pb.RequestHttpFrontend) -> DispatchResult:
        return self._add_front(self.http_fronts, "HttpFrontend", f)

    def _do_add_https_frontend(self, f: pb.RequestHttpFrontend) -> DispatchResult:
        return self._add_front(self.https_fronts, "HttpsFrontend", f)

    def _do_remove_http_frontend(self, f: pb.RequestHttpFrontend) -> DispatchResult:
        return self._remove_front(self.http_fronts, "HttpFrontend", f)

    def _do_remove_https_frontend(self, f: pb.RequestHttpFrontend) -> DispatchResult:
        return self._remove_front(self.https_fronts, "HttpsFrontend", f)

    # TCP / UDP frontends

    def _debug_front(self, name: str, front: pb.RequestTcpFrontend | pb.RequestUdpFrontend, internal: bool) -> str:
        if internal:
            addr = address_text(front.address)
        elif self._is_015:
            addr = rust_debug_str(address_text(front.address))
        else:
            addr = _debug_socket_address(front.address)
        cluster = rust_debug_str(front.cluster_id)
        return f"{name} {{ cluster_id: {cluster}, address: {addr}, tags: {_debug_tags(front.tags)} }}"

    def _add_l4_front(self, table: dict[str, Any], name: str, ltype: int, front: Any) -> DispatchResult:
        fronts = table.setdefault(front.cluster_id, [])
        text = address_text(front.address)
        for existing in fronts:
            if address_text(existing.address) == text and dict(existing.tags) == dict(front.tags):
                return DispatchResult(f"{name} '{self._debug_front(name, front, True)}' already exists")
        fronts.append(_copy(front))
        return DispatchResult(worker_error=self._missing_listener(ltype, front.address))

    def _remove_l4_front(self, table: dict[str, Any], name: str, front: Any) -> DispatchResult:
        fronts = table.get(front.cluster_id)
        if fronts is None:
            request = "RequestTcpFrontend" if name == "TcpFrontend" else "RequestUdpFrontend"
            return DispatchResult(
                f"Did not find {name} with address or id '{self._debug_front(request, front, False)}'"
            )
        text = address_text(front.address)
        kept = [f for f in fronts if address_text(f.address) != text]
        if len(kept) == len(fronts):
            return DispatchResult(NO_CHANGE)
        table[front.cluster_id] = kept
        return DispatchResult()

    def _do_add_tcp_frontend(self, f: pb.RequestTcpFrontend) -> DispatchResult:
        return self._add_l4_front(self.tcp_fronts, "TcpFrontend", pb.TCP, f)

    def _do_remove_tcp_frontend(self, f: pb.RequestTcpFrontend) -> DispatchResult:
        return self._remove_l4_front(self.tcp_fronts, "TcpFrontend", f)

    def _do_add_udp_frontend(self, f: pb.RequestUdpFrontend) -> DispatchResult:
        return self._add_l4_front(self.udp_fronts, "UdpFrontend", pb.UDP, f)

    def _do_remove_udp_frontend(self, f: pb.RequestUdpFrontend) -> DispatchResult:
        return self._remove_l4_front(self.udp_fronts, "UdpFrontend", f)

    # certificates

    def _cert_table(self, addr: pb.SocketAddress) -> dict[str, pb.CertificateAndKey]:
        text = address_text(addr)
        self.certificate_addresses.setdefault(text, _copy(addr))
        return self.certificates.setdefault(text, {})

    def _do_add_certificate(self, add: pb.AddCertificate) -> DispatchResult:
        try:
            fingerprint = fingerprint_of(add.certificate.certificate)
        except CertificateProblem as e:
            # 0.15 wraps the parser's error in the same prefix twice
            detail = f"Could not parse PEM certificate from bytes: {e}" if self._is_015 else str(e)
            return DispatchResult(f"Could not add certificate: {detail}")
        table = self._cert_table(add.address)  # sozu creates the address entry before reading names
        stored = _copy(add.certificate)
        worker_error = None
        if not self._is_015 and not stored.names:
            try:
                stored.names.extend(certificate_names(stored.certificate))
            except CertificateProblem as e:
                return DispatchResult(f"Could not add certificate: {e}")
        if self._is_015:
            try:
                parse_x509(stored.certificate)
            except CertificateProblem:
                worker_error = (
                    "could not add certificate: failed to handle certificate request, got a resolver error, "
                    "certificate error: Could not parse PEM certificate from bytes: Parsing Error: NomError(Eof)"
                )
        missing = self._missing_listener(pb.HTTPS, add.address)
        if fingerprint not in table:
            table[fingerprint] = stored
        return DispatchResult(worker_error=missing or worker_error)

    def _do_remove_certificate(self, remove: pb.RemoveCertificate) -> DispatchResult:
        problem = _hex_error(remove.fingerprint)
        if problem is not None:
            return DispatchResult(f"Could not remove certificate: {problem}")
        table = self.certificates.get(address_text(remove.address))
        if table is not None:
            table.pop(remove.fingerprint.lower(), None)
        return DispatchResult()

    def _do_replace_certificate(self, replace: pb.ReplaceCertificate) -> DispatchResult:
        problem = _hex_error(replace.old_fingerprint)
        if problem is not None:
            return DispatchResult(f"Could not remove certificate: {problem}")
        text = address_text(replace.address)
        table = self.certificates.get(text)
        if table is None:
            return DispatchResult(f"Did not find Certificate with address or id '{text}'")
        table.pop(replace.old_fingerprint.lower(), None)  # removed even if the new one is refused
        try:
            fingerprint = fingerprint_of(replace.new_certificate.certificate)
        except CertificateProblem as e:
            return DispatchResult(f"Could not replace certificate: {e}")
        table[fingerprint] = _copy(replace.new_certificate)
        return DispatchResult(worker_error=self._missing_listener(pb.HTTPS, replace.address))

    # backends

    def _do_add_backend(self, add: pb.AddBackend) -> DispatchResult:
        backends = self.backends.setdefault(add.cluster_id, [])
        text = address_text(add.address)
        replaced = [
            (b.backend_id, _copy(b.address))
            for b in backends
            if b.backend_id == add.backend_id and address_text(b.address) == text
        ]
        kept = [b for b in backends if not (b.backend_id == add.backend_id and address_text(b.address) == text)]
        kept.append(_copy(add))
        kept.sort(key=_backend_sort_key)
        self.backends[add.cluster_id] = kept
        return DispatchResult(removed_backends=replaced)

    def _do_remove_backend(self, remove: pb.RemoveBackend) -> DispatchResult:
        backends = self.backends.get(remove.cluster_id)
        if backends is None:
            return DispatchResult(f"Did not find Backend with address or id '{remove.backend_id}'")
        text = address_text(remove.address)
        kept = [b for b in backends if not (b.backend_id == remove.backend_id and address_text(b.address) == text)]
        if len(kept) == len(backends):
            return DispatchResult(NO_CHANGE)
        self.backends[remove.cluster_id] = kept
        return DispatchResult(removed_backends=[(remove.backend_id, _copy(remove.address))])

    # -- what the workers would say

    def _missing_listener(self, ltype: int, addr: pb.SocketAddress) -> str | None:
        text = address_text(addr)
        if text in self.listeners[ltype]:
            return None
        return f"found no listener with address {text}"

    # -- state file

    def generate_requests(self) -> list[pb.Request]:
        """The requests that rebuild this state, in sozu's record order (§6.3)."""
        out: list[pb.Request] = []
        for ltype, field_name in (
            (pb.HTTP, "add_http_listener"),
            (pb.HTTPS, "add_https_listener"),
            (pb.TCP, "add_tcp_listener"),
            (pb.UDP, "add_udp_listener"),
        ):
            table = self.listeners[ltype]
            for text in sorted(table, key=lambda t, tb=table: self._address_key(t, tb[t].address)):  # type: ignore[misc]
                config = table[text]
                req = pb.Request()
                getattr(req, field_name).CopyFrom(config)
                out.append(req)
                if config.active:
                    act = pb.Request()
                    act.activate_listener.address.CopyFrom(config.address)
                    act.activate_listener.proxy = ltype
                    act.activate_listener.from_scm = False
                    out.append(act)
        for cluster_id in sorted(self.clusters):
            out.append(pb.Request(add_cluster=self.clusters[cluster_id]))
        for key in sorted(self.http_fronts):
            out.append(pb.Request(add_http_frontend=self.http_fronts[key]))
        for text, certs in self.certificates.items():
            for cert in certs.values():
                add = pb.AddCertificate(address=self.certificate_addresses[text], certificate=cert)
                out.append(pb.Request(add_certificate=add))
        for key in sorted(self.https_fronts):
            out.append(pb.Request(add_https_frontend=self.https_fronts[key]))
        for tcp_list in self.tcp_fronts.values():
            for tcp in tcp_list:
                out.append(pb.Request(add_tcp_frontend=tcp))
        for udp_list in self.udp_fronts.values():
            for udp in udp_list:
                out.append(pb.Request(add_udp_frontend=udp))
        for cluster_id in sorted(self.backends):
            for backend in self.backends[cluster_id]:
                out.append(pb.Request(add_backend=backend))
        return out

    def generate_state_file(self) -> bytes:
        """Exactly the bytes sozu's ``save_state`` writes for this state.

        Each request's JSON is remembered (by its protobuf bytes) until the next call: a simulator that
        saves a large state at every live read then costs what the requests that changed cost, closer
        to real sozu's native writer than re-encoding everything in Python."""
        encoder = msgspec.json.Encoder()
        parts: list[bytes] = []
        seen = self._encoded if self._encoded_version == self.version else {}
        encoded: dict[bytes, bytes] = {}
        for i, req in enumerate(self.generate_requests()):
            wire = req.SerializeToString(deterministic=True)
            content = seen.get(wire)
            if content is None:
                content = encoder.encode(to_json(req, self.version))
            encoded[wire] = content
            parts.append(b'{"id":"SAVE-%d","content":%s}' % (i, content) + _RECORD_SEPARATOR)
        self._encoded, self._encoded_version = encoded, self.version
        return b"".join(parts)

    def load_state_file(self, data: bytes, *, source: str = "<state file>") -> tuple[int, int]:
        """Apply every record of ``data``; ``(accepted, refused)`` by the main state.

        Raises ``StateParseError`` at the first record that does not parse (the records before it
        stay applied, as in sozu).
        """
        accepted = refused = 0
        for req in iter_state_records(data, self.version, source=source):
            if self.dispatch(req) is None:
                accepted += 1
            else:
                refused += 1
        return accepted, refused

    # -- read accessors (also used by the server for queries)

    def listener(self, ltype: int, address: str) -> Any | None:
        return self.listeners[ltype].get(address)

    def all_frontends(self) -> Iterator[tuple[str, Message]]:
        for key in sorted(self.http_fronts):
            yield "http", self.http_fronts[key]
        for key in sorted(self.https_fronts):
            yield "https", self.https_fronts[key]
        for tl in self.tcp_fronts.values():
            for t in tl:
                yield "tcp", t
        for ul in self.udp_fronts.values():
            for u in ul:
                yield "udp", u

    def certificate_entries(self) -> Iterator[tuple[pb.SocketAddress, str, pb.CertificateAndKey]]:
        for text, certs in self.certificates.items():
            for fingerprint, cert in certs.items():
                yield self.certificate_addresses[text], fingerprint, cert

    def cluster_information(self, cluster_id: str) -> pb.ClusterInformation | None:
        return self._cluster_infos().get(cluster_id)

    def cluster_hash(self, cluster_id: str) -> int:
        """A deterministic u64 of the cluster's content (sozu's SipHash cannot be reproduced, §8)."""
        return self.cluster_hashes().get(cluster_id, _hash_of(None))

    def cluster_hashes(self) -> dict[str, int]:
        """Every cluster's hash, kept until the state changes."""
        if self._hashes is None or self._hashes[0] != self._generation:
            self._hashes = (self._generation, {cid: _hash_of(i) for cid, i in self._cluster_infos().items()})
        return self._hashes[1]

    def _cluster_infos(self) -> dict[str, pb.ClusterInformation]:
        """Each cluster with its frontends (in route-key order) and backends, built in one pass over the
        state and kept until the state changes: real sozu answers cluster queries in a fraction of a
        millisecond whatever the size (§11.9), so the simulator must not rescan the state per cluster."""
        if self._infos is not None and self._infos[0] == self._generation:
            return self._infos[1]
        infos = {cid: pb.ClusterInformation(configuration=c) for cid, c in self.clusters.items()}
        for table, field_name in ((self.http_fronts, "http_frontends"), (self.https_fronts, "https_frontends")):
            for key in sorted(table):
                front = table[key]
                if front.HasField("cluster_id") and front.cluster_id in infos:
                    getattr(infos[front.cluster_id], field_name).append(front)
        udp = self.version.knows_field("ClusterInformation", "udp_frontends")
        for cid, info in infos.items():
            info.tcp_frontends.extend(self.tcp_fronts.get(cid, []))
            if udp:
                info.udp_frontends.extend(self.udp_fronts.get(cid, []))
            info.backends.extend(self.backends.get(cid, []))
        self._infos = (self._generation, infos)
        return infos

    def clusters_for_domain(self, hostname: str, path: str | None) -> list[str]:
        ids: set[str] = set()
        for table in (self.http_fronts, self.https_fronts):
            for front in table.values():
                if front.hostname != hostname or not front.HasField("cluster_id"):
                    continue
                if path is not None and front.path.value != path:
                    continue
                ids.add(front.cluster_id)
        return sorted(ids)

    def summary(self) -> dict[str, int]:
        """Object counts, for test messages."""
        return {
            "listeners": sum(len(t) for t in self.listeners.values()),
            "clusters": len(self.clusters),
            "http_frontends": len(self.http_fronts),
            "https_frontends": len(self.https_fronts),
            "tcp_frontends": sum(len(v) for v in self.tcp_fronts.values()),
            "certificates": sum(len(v) for v in self.certificates.values()),
            "backends": sum(len(v) for v in self.backends.values()),
        }


def iter_state_records(data: bytes, version: SozuVersion, *, source: str = "<state file>") -> Iterable[pb.Request]:
    """Records of a state file (``\\0``-terminated JSON ``WorkerRequest``s), parsed lazily in order.

    Raises ``StateParseError`` (naming the record) at the first record that is not valid, and for
    bytes after the last ``\\0``.
    """
    pos = 0
    index = 0
    while pos < len(data):
        end = data.find(b"\x00", pos)
        if end < 0:
            if data[pos:].strip():
                raise StateParseError("record without its terminating NUL byte", source=source, record=index)
            return
        chunk = data[pos:end]
        pos = end + 1
        if not chunk.strip():
            raise StateParseError("empty record", source=source, record=index)
        try:
            value = json.loads(chunk)
        except (ValueError, UnicodeDecodeError) as e:
            raise StateParseError(f"not JSON: {e}", source=source, record=index) from None
        if not isinstance(value, dict) or "content" not in value or not isinstance(value.get("id"), str):
            raise StateParseError('not a {"id":...,"content":...} record', source=source, record=index)
        yield from_json(pb.Request, value["content"], version, source=source, record=index, path="content")
        index += 1
