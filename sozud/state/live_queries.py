"""Reading a live sozu with queries, when no shared directory is set (:mod:`sozud.state.live` explains
the requests and what this path cannot see).

A read costs one ``query_cluster_by_id`` per cluster. With a :class:`ClusterReplies` from the previous read,
only the clusters whose hash in ``query_clusters_hashes`` changed, or that are new, are queried again: sozu's
hash of a cluster covers its configuration, backends and frontends (docs/sozu-command-protocol.md §8), so an
unchanged hash from the same running sozu means an unchanged answer. The hashes cannot be computed here
(§8), only compared, so the replies are trusted only from the same connection (a reconnection may be a
restarted sozu: everything is queried again); a ``fresh`` read queries every cluster.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf.message import Message

from sozud.errors import SozuRequestError
from sozud.log import get_logger
from sozud.proto import command_pb2 as pb
from sozud.serde import address_text
from sozud.state.live_io import (
    LiveRead,
    RequestCounter,
    SozuRequester,
    derived_names,
    version_of,
)
from sozud.state.model import ConfigState, Kind
from sozud.versions import Family, SozuVersion

_LIST_FRONTENDS_BROKEN = (SozuVersion(1, 0, 0), SozuVersion(1, 0, 4))


@dataclass
class ClusterReplies:
    """The last query read's clusters: by cluster id, its hash then and what ``query_cluster_by_id``
    answered; with the connection epoch and the sozu version they were read from."""

    epoch: int = -1
    version: SozuVersion | None = None
    by_id: dict[str, tuple[int, list[pb.ClusterInformation]]] = field(default_factory=dict)
    queried: int = 0  # clusters queried, all reads together (the others were reused): tests and benchmarks

    def forget(self) -> None:
        self.by_id = {}


async def read_by_queries(ch: SozuRequester, clusters: ClusterReplies | None = None) -> LiveRead:
    """Read sozu with queries; ``clusters``: the replies of the previous read, updated (see the module doc)."""
    version = version_of(ch)
    state = ConfigState(version)
    read = LiveRead(state=state, method="queries", requests=0)
    counter = RequestCounter(ch)
    await _read_listeners(counter, state)
    per_cluster_frontends = await _read_clusters(counter, state, clusters)
    await _read_frontends(counter, read, per_cluster_frontends)
    await _read_certificates(counter, read)
    read.notes.append(
        "backends of removed clusters cannot be seen without a shared directory (sozu lists backends per cluster)"
    )
    read.requests = counter.count
    for note in read.notes:
        get_logger().info("sozu.live_read_limited", note=note)
    return read


async def _read_listeners(counter: RequestCounter, state: ConfigState) -> None:
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


async def _read_clusters(
    counter: RequestCounter, state: ConfigState, replies: ClusterReplies | None
) -> list[tuple[Kind, Message]]:
    """Clusters and their backends into ``state``; returns their frontends (used when list_frontends is
    unavailable). ``replies``: reused where a cluster's hash did not change, then replaced by this read's."""
    hashes = await counter.main_entry(pb.Request(query_clusters_hashes=pb.QueryClustersHashes()), "cluster_hashes")
    epoch = counter.ch.epoch  # of the connection that answered
    known = replies.by_id if replies is not None and (replies.epoch, replies.version) == (epoch, state.version) else {}
    kept: dict[str, tuple[int, list[pb.ClusterInformation]]] = {}
    per_cluster_frontends: list[tuple[Kind, Message]] = []
    by_hash = hashes.cluster_hashes.map
    for cluster_id in sorted(by_hash):
        cluster_hash = by_hash[cluster_id]
        seen = known.get(cluster_id)
        if seen is not None and seen[0] == cluster_hash:
            infos = seen[1]
        else:
            info = await counter.main_entry(pb.Request(query_cluster_by_id=cluster_id), "clusters")
            infos = list(info.clusters.vec)
            if replies is not None:
                replies.queried += 1
        kept[cluster_id] = (cluster_hash, infos)
        for ci in infos:
            if ci.HasField("configuration"):
                state.add("cluster", ci.configuration)
            for b in ci.backends:
                state.add("backend", b)
            per_cluster_frontends.extend(_frontends_of(ci.http_frontends, ci.https_frontends, ci.tcp_frontends))
            per_cluster_frontends.extend(("udp_frontend", f) for f in ci.udp_frontends)
    if replies is not None:
        replies.epoch, replies.version, replies.by_id = epoch, state.version, kept
    return per_cluster_frontends


async def _read_frontends(counter: RequestCounter, read: LiveRead, per_cluster: list[tuple[Kind, Message]]) -> None:
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


async def _read_certificates(counter: RequestCounter, read: LiveRead) -> None:
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


async def _certificate_addresses(counter: RequestCounter) -> dict[str, dict[str, pb.SocketAddress]]:
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
