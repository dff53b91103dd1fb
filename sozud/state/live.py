"""Reading the live configuration of a running sozu, and a cheap probe that says whether it changed.

Two ways to read (docs/sozu-command-protocol.md §7):

**With a shared directory** (``shared_dir``: a directory that sozu's main process can write and sozud
can read, e.g. ``/run/sozu``): one ``save_state`` to a fresh file there, parsed with the state-file
codec, then deleted. One request whatever the size, and exact: orphan backends (of removed clusters),
every certificate with its listener address, every listener setting.

**Without it**, with queries (``1 + 1 + N + 1 + 1 + 1`` requests for ``N`` clusters):

==================================  ================================================================
``list_listeners``                  every listener with its settings and ``active`` flag
``query_clusters_hashes``           the cluster ids (``"main"`` entry)
``query_cluster_by_id`` x N         each cluster's configuration and backends (``"main"`` entry)
``list_frontends`` (no filter)      every frontend, deny routes and frontends of removed clusters
                                    included (1.0.0-1.0.4 answer FAILURE: frontends then come from
                                    the per-cluster replies, and deny routes and frontends of removed
                                    clusters cannot be seen)
``query_certificates_from_the_state``  PEM, chain, key, names, keyed by fingerprint (no address)
``query_certificates_from_workers``    which HTTPS listener holds which fingerprint (sent only when
                                    the state holds certificates)
==================================  ================================================================

What the query path cannot see (:class:`LiveRead` says so, :meth:`LiveRead.hides` tells per object):

- backends whose cluster was removed (sozu lists backends only per existing cluster);
- the listener address of a certificate that no worker serves: certificates on an address without an
  HTTPS listener (the main state accepted them, the workers refused them) and certificates *shadowed*
  on a listener by another one for the same names (workers report only the certificate each name
  resolves to). They are reported in :attr:`LiveRead.unresolved_certificates`; a certificate served
  at one address and shadowed at another is seen at the first only;
- when one fingerprint is installed at several addresses with different keys or names, the state
  query returns one of them, used for every address;
- on 0.15 the certificates query returns the names derived from the certificate (CN and DNS SANs),
  not the stored list (0.15 stores what was sent, normally ``[]``, which is what its CLI sends):
  names equal to the derived ones are reported as ``[]``; certificates that 0.15 cannot parse (its
  main state accepts some) are left out of the query and cannot be seen;
- the read is not atomic: a change between two of its requests can give a mix. Take :func:`probe`
  *before* reading: such a change then shows in the next probe.

2.x closes the connection on a reply above ``max_command_buffer_size`` (2 MB by default): with many
certificates, the certificates query can exceed it; use a shared directory there. 0.15.19 never answers
a cluster query whose per-worker answer exceeds its worker message size (§12, e.g. 150 backends with a
16 kB ``command_buffer_size``): a timeout there may be that bug; a shared directory avoids the queries.

The save_state file: sozud creates it empty, mode 0600, under a random name (it will hold private keys;
nobody can plant a symlink at a random name), then asks sozu to write it; sozu truncates and writes in
place, so the mode stays. sozu must be able to write a file that sozud created (root, or the same user).
``shared_dir_sozu_path`` is the directory as sozu's main process sees it when that differs (container).
The file is deleted after parsing, also on errors.

The probe (:func:`probe`) costs two requests: ``count_requests`` (per-request-type counters of the
main state, bumped by every configuration request it dispatches, backends included, whichever client
sent it; never decreasing while sozu runs) and ``query_clusters_hashes`` (a hash per cluster over its
configuration, backends and frontends). It also carries the channel's connection epoch, so a sozu
restart (which resets the counters) reads as a change even when the counters happen to match.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID
from google.protobuf.message import Message

from sozud.errors import SozuProtocolError, SozuRequestError, StateError
from sozud.log import get_logger
from sozud.proto import command_pb2 as pb
from sozud.serde import address_text
from sozud.state.model import ConfigState, Kind, ObjKey
from sozud.versions import Family, SozuVersion

if TYPE_CHECKING:
    from sozud.state.codec import RecordCache

__all__ = [
    "Fingerprint",
    "LiveRead",
    "SozuRequester",
    "derived_names",
    "probe",
    "read_live",
    "read_live_report",
]

_LIST_FRONTENDS_BROKEN = (SozuVersion(1, 0, 0), SozuVersion(1, 0, 4))
_FRONTEND_KINDS: tuple[Kind, ...] = ("http_frontend", "https_frontend", "tcp_frontend", "udp_frontend")


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


# --- probe --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """A comparable summary of a live sozu: equal fingerprints mean nothing configured changed.

    ``epoch`` is the channel's connection counter (a reconnect may be a restart), ``request_counts``
    the main state's per-request-type counters, ``cluster_hashes`` the main process's hash per cluster.
    """

    epoch: int
    request_counts: tuple[tuple[str, int], ...]
    cluster_hashes: tuple[tuple[str, int], ...]


async def probe(ch: SozuRequester) -> Fingerprint:
    """Two cheap requests; compare the result with the one taken before the last full read.

    It cannot miss a change: every configuration request the main state dispatches (backends
    included, which 2.x reports with no event) bumps a counter, counters never go down while sozu
    runs, and a restart changes the epoch. It can report a change that changed nothing (a refused
    request is counted on 1.x/2.x; a request that re-adds an identical object too).
    """
    for _ in range(3):
        counts = await _ask(ch, pb.Request(count_requests=pb.CountRequests()), "request_counts")
        epoch = ch.epoch  # of the connection that answered (a request may reconnect first)
        hashes = await _main_entry(ch, pb.Request(query_clusters_hashes=pb.QueryClustersHashes()), "cluster_hashes")
        if ch.epoch == epoch:
            break
        # A reconnection between the two requests: the counts may come from a sozu that has since
        # restarted. Labelled with the new epoch they would hide that restart; ask again.
    return Fingerprint(
        epoch=ch.epoch,
        request_counts=tuple(sorted(counts.request_counts.map.items())),
        cluster_hashes=tuple(sorted(hashes.cluster_hashes.map.items())),
    )


# --- full read ----------------------------------------------------------------------------------------


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

    def hides(self, key: ObjKey, value: Message) -> bool:
        """Whether this read could not have seen ``key`` (with ``value``) even if sozu holds it."""
        if self.exact or key in self.state.objects:
            return False
        kind = key[0]
        if kind == "backend":
            assert isinstance(value, pb.AddBackend)
            return ("cluster", value.cluster_id) not in self.state.objects
        if kind in _FRONTEND_KINDS and not self.frontends_listed:
            cluster_id = getattr(value, "cluster_id", "")
            has = value.HasField("cluster_id") if isinstance(value, pb.RequestHttpFrontend) else True
            return not has or ("cluster", cluster_id) not in self.state.objects
        if kind == "certificate":
            if key[2] in self.state_fingerprints:
                return True
            # 0.15 leaves out of its certificates query the ones it cannot parse
            assert isinstance(value, pb.AddCertificate)
            return self.state.version.family is Family.V0_15 and derived_names(value.certificate.certificate) is None
        return False

    def visible(self, state: ConfigState) -> ConfigState:
        """``state`` without the objects this read could not see (what a read would show of it)."""
        out = ConfigState(state.version)
        for k, v in state.objects.items():
            if not self.hides(k, v):
                out.objects[k] = v
        return out


async def read_live(
    ch: SozuRequester,
    *,
    shared_dir: str | None = None,
    shared_dir_sozu_path: str | None = None,
) -> ConfigState:
    """The live configuration of the sozu behind ``ch`` (see the module docstring for the method)."""
    return (await read_live_report(ch, shared_dir=shared_dir, shared_dir_sozu_path=shared_dir_sozu_path)).state


async def read_live_report(
    ch: SozuRequester,
    *,
    shared_dir: str | None = None,
    shared_dir_sozu_path: str | None = None,
    records: RecordCache | None = None,
) -> LiveRead:
    """Like :func:`read_live`, with how it was read and what could not be seen.

    ``shared_dir`` is the directory as sozud sees it; ``shared_dir_sozu_path`` the same directory as
    sozu's main process sees it (a container mount), default ``shared_dir``. ``records``: the SaveState
    records of the last read, so that this one decodes only the records that changed.
    """
    started = time.monotonic()
    if shared_dir is not None:
        read = await _read_by_save_state(ch, shared_dir, shared_dir_sozu_path or shared_dir, records)
    else:
        read = await _read_by_queries(ch)
    read.duration_s = time.monotonic() - started
    get_logger().debug(
        "sozu.live_read",
        method=read.method,
        requests=read.requests,
        objects=len(read.state),
        unresolved_certificates=len(read.unresolved_certificates),
        duration_ms=round(read.duration_s * 1000, 2),
    )
    return read


async def _read_by_save_state(
    ch: SozuRequester, shared_dir: str, sozu_dir: str, records: RecordCache | None = None
) -> LiveRead:
    from sozud.state.codec import parse_state_file  # another module of the package, imported late

    version = _version(ch)
    name = f".sozud-live-{os.getpid()}-{secrets.token_hex(8)}.state"
    local_path = os.path.join(shared_dir, name)
    sozu_path = os.path.join(sozu_dir, name)
    # The file holds private keys: create it ourselves, private, before sozu truncates and fills it in
    # place (sozu keeps the inode, so the mode stays). A random name: nobody can plant a symlink there.
    try:
        fd = os.open(local_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except OSError as e:
        raise StateError(f"cannot create the live-read file {local_path} in the shared directory: {e}") from e
    try:
        await _ask(ch, pb.Request(save_state=sozu_path), None)
        try:
            data = await asyncio.to_thread(_read_bytes, local_path)
        except OSError as e:
            raise StateError(
                f"sozu saved its state to {sozu_path} but it cannot be read at {local_path}: {e} "
                "(is shared_dir the same directory as sozu's shared_dir_sozu_path?)"
            ) from e
        # sozu answered after writing the whole file: an empty file is an empty sozu, not a partial one
        # what sozu itself holds is read whatever its size: a plan can then remove it
        state = parse_state_file(
            data,
            version,
            source=f"save_state {sozu_path}",
            allow_empty=True,
            max_record_bytes=None,
            max_state_bytes=None,
            cache=records,
        )
    finally:
        try:
            os.unlink(local_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            get_logger().warning("sozu.live_read_cleanup_failed", path=local_path, error=str(e))
    return LiveRead(state=state, method="save_state", requests=1)


async def _read_by_queries(ch: SozuRequester) -> LiveRead:
    version = _version(ch)
    state = ConfigState(version)
    read = LiveRead(state=state, method="queries", requests=0)
    counter = _Counter(ch)
    await _read_listeners(counter, state)
    per_cluster_frontends = await _read_clusters(counter, state)
    await _read_frontends(counter, read, per_cluster_frontends)
    await _read_certificates(counter, read)
    read.notes.append(
        "backends of removed clusters cannot be seen without a shared directory (sozu lists backends per cluster)"
    )
    read.requests = counter.count
    for note in read.notes:
        get_logger().info("sozu.live_read_limited", note=note)
    return read


async def _read_listeners(counter: _Counter, state: ConfigState) -> None:
    listeners = await counter.ask(pb.Request(list_listeners=pb.ListListeners()), "listeners_list")
    ll = listeners.listeners_list
    for kind, configs in (
        ("http", ll.http_listeners),
        ("https", ll.https_listeners),
        ("tcp", ll.tcp_listeners),
        ("udp", ll.udp_listeners),
    ):
        for _addr, cfg in sorted(configs.items()):
            state.add_listener(kind, cfg)


async def _read_clusters(counter: _Counter, state: ConfigState) -> list[tuple[Kind, Message]]:
    """Clusters and their backends into ``state``; returns their frontends (used when list_frontends is
    unavailable)."""
    hashes = await counter.main_entry(pb.Request(query_clusters_hashes=pb.QueryClustersHashes()), "cluster_hashes")
    per_cluster_frontends: list[tuple[Kind, Message]] = []
    for cluster_id in sorted(hashes.cluster_hashes.map):
        info = await counter.main_entry(pb.Request(query_cluster_by_id=cluster_id), "clusters")
        for ci in info.clusters.vec:
            if ci.HasField("configuration"):
                state.add("cluster", ci.configuration)
            for b in ci.backends:
                state.add("backend", b)
            per_cluster_frontends.extend(_frontends_of(ci.http_frontends, ci.https_frontends, ci.tcp_frontends))
            per_cluster_frontends.extend(("udp_frontend", f) for f in ci.udp_frontends)
    return per_cluster_frontends


async def _read_frontends(counter: _Counter, read: LiveRead, per_cluster: list[tuple[Kind, Message]]) -> None:
    """Every frontend (list_frontends), or the clusters' frontends when sozu cannot list them."""
    version = read.state.version
    frontends: list[tuple[Kind, Message]] | None = None
    lo, hi = _LIST_FRONTENDS_BROKEN
    if lo <= version <= hi:
        read.notes.append(
            f"sozu {version} cannot list frontends (fixed in 1.0.5): deny routes and frontends of "
            "removed clusters are not visible"
        )
    else:
        try:
            listed = await counter.ask(
                pb.Request(list_frontends=pb.FrontendFilters(http=False, https=False, tcp=False)),
                "frontend_list",
            )
        except SozuRequestError as e:
            read.notes.append(
                f"list_frontends refused ({e.sozu_message}): deny routes and frontends of removed "
                "clusters are not visible"
            )
        else:
            fl = listed.frontend_list
            frontends = list(_frontends_of(fl.http_frontends, fl.https_frontends, fl.tcp_frontends))
            frontends.extend(("udp_frontend", f) for f in fl.udp_frontends)
    if frontends is None:
        read.frontends_listed = False
        frontends = per_cluster
    for kind, front in frontends:
        read.state.add(kind, front)


async def _read_certificates(counter: _Counter, read: LiveRead) -> None:
    """Certificates from the main state, placed at the addresses the workers serve them on."""
    state = read.state
    certs = await counter.ask(
        pb.Request(query_certificates_from_the_state=pb.QueryCertificatesFilters()),
        "certificates_with_fingerprints",
    )
    by_fp = dict(certs.certificates_with_fingerprints.certs)
    read.state_fingerprints = frozenset(fp.lower() for fp in by_fp)
    if not by_fp:
        return
    placed = await _certificate_addresses(counter)
    for fp in sorted(by_fp):
        cert = pb.CertificateAndKey()
        cert.CopyFrom(by_fp[fp])
        if state.version.family is Family.V0_15 and set(cert.names) == set(derived_names(cert.certificate) or ()):
            del cert.names[:]  # 0.15 answers derived names, stores what was sent (see module doc)
        addresses = placed.get(fp.lower())
        if not addresses:
            read.unresolved_certificates[fp.lower()] = cert
            continue
        for _text, address in sorted(addresses.items()):
            add = pb.AddCertificate(address=address, certificate=cert)
            try:
                state.add("certificate", add)
            except ValueError:  # a PEM that sozu accepted but we cannot decode: keep sozu's fingerprint
                state.put(("certificate", address_text(address), fp.lower()), add)
    if read.unresolved_certificates:
        read.notes.append(
            f"{len(read.unresolved_certificates)} certificate(s) in sozu's state are served by no worker "
            "listener (address without an HTTPS listener, or shadowed by another certificate for the same "
            "names): their addresses cannot be read without a shared directory"
        )


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


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _frontends_of(
    http: Iterable[pb.RequestHttpFrontend],
    https: Iterable[pb.RequestHttpFrontend],
    tcp: Iterable[pb.RequestTcpFrontend],
) -> Iterable[tuple[Kind, Message]]:
    for h in http:
        yield "http_frontend", h
    for s in https:
        yield "https_frontend", s
    for t in tcp:
        yield "tcp_frontend", t


async def _certificate_addresses(counter: _Counter) -> dict[str, dict[str, pb.SocketAddress]]:
    """fingerprint -> {address text: address} over every worker's HTTPS listeners."""
    reply = await counter.ask(
        pb.Request(query_certificates_from_workers=pb.QueryCertificatesFilters()), "worker_responses"
    )
    out: dict[str, dict[str, pb.SocketAddress]] = {}
    for _worker, content in sorted(reply.worker_responses.map.items()):
        if content.WhichOneof("content_type") != "certificates_by_address":
            continue  # a worker that answered with an error or nothing: the others still tell
        for by_address in content.certificates_by_address.certificates:
            text = address_text(by_address.address)
            for summary in by_address.certificate_summaries:
                out.setdefault(summary.fingerprint.lower(), {})[text] = by_address.address
    return out


# --- requests -----------------------------------------------------------------------------------------


class _Counter:
    """Sends requests and counts them."""

    def __init__(self, ch: SozuRequester) -> None:
        self.ch = ch
        self.count = 0

    async def ask(self, req: pb.Request, content: str | None) -> pb.ResponseContent:
        self.count += 1
        return await _ask(self.ch, req, content)

    async def main_entry(self, req: pb.Request, content: str) -> pb.ResponseContent:
        self.count += 1
        return await _main_entry(self.ch, req, content)


def _where(ch: SozuRequester) -> str | None:
    path = getattr(ch, "socket_path", None)
    return str(path) if path is not None else None


def _version(ch: SozuRequester) -> SozuVersion:
    version = ch.version
    if version is None:
        raise SozuProtocolError("the channel's sozu version is unknown (connect first)", socket_path=_where(ch))
    return version


async def _ask(ch: SozuRequester, req: pb.Request, content: str | None) -> pb.ResponseContent:
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
            socket_path=_where(ch),
        )
    return response.content


async def _main_entry(ch: SozuRequester, req: pb.Request, content: str) -> pb.ResponseContent:
    """The ``"main"`` entry of a main+workers query, checking it is ``content``."""
    outer = await _ask(ch, req, "worker_responses")
    kind = req.WhichOneof("request_type")
    entries = outer.worker_responses.map
    if "main" not in entries:
        raise SozuProtocolError(f"{kind} answer has no 'main' entry (got {sorted(entries)})", socket_path=_where(ch))
    main = entries["main"]
    which = main.WhichOneof("content_type")
    if which != content:
        raise SozuProtocolError(
            f"{kind} answer's 'main' entry holds {which or 'nothing'}, expected {content}", socket_path=_where(ch)
        )
    return main
