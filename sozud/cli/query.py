"""``sozud query``: print the live configuration of a sozu, read over its command socket.

    sozud query listeners|frontends|clusters|certificates|status [--json] [--socket PATH]
                [--sozu-version V] [--timeout-s S]

- ``listeners``: ``list_listeners`` (HTTP, HTTPS, TCP and, 2.1, UDP listeners with their settings);
- ``frontends``: ``list_frontends`` with no filter (every frontend, deny routes included);
- ``clusters``: ``query_clusters_hashes`` for the ids, then ``query_cluster_by_id`` for each, reading the
  main process's entry (``"main"``) of the answer: configuration, frontends and backends per cluster;
- ``certificates``: ``query_certificates_from_the_state`` (fingerprint, names, TLS versions, expiry);
- ``status``: the detected (or given) sozu version, and ``status`` (workers, pids, run states).

Output is a table, or JSON with ``--json``: one object ``{"socket", "sozu_version", "<what>": ...}``
whose content is protobuf's canonical JSON mapping of sozu's reply (``MessageToDict`` with the
``.proto`` field names: enums by name, 64-bit integers as strings, addresses as ``SocketAddress``
objects), the same shape as the ``request``/``content`` views of the captured fixtures, whatever the
sozu version (0.15 replies are converted to the same messages). Private keys (certificates' ``key``,
HTTPS listeners' default ``key``) are replaced by ``<redacted>`` in every output.

Errors print one line naming the socket and what failed, and exit with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import structlog
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from sozud.errors import SozuConnectionError, SozudError, SozuTimeoutError
from sozud.exitcodes import ExitCode
from sozud.log import configure_logging
from sozud.proto import command_pb2 as pb
from sozud.redact import REDACTED, redact_text
from sozud.serde import address_text
from sozud.socket_proto import SozuChannel
from sozud.versions import SozuVersion

__all__ = ["DEFAULT_SOCKET", "WHAT", "redact_message", "register", "run_query"]

DEFAULT_SOCKET = "/run/sozu/sozu.sock"
WHAT = ("listeners", "frontends", "clusters", "certificates", "status")


def register(subparsers: Any) -> None:
    """Add the ``query`` sub-command to an ``argparse`` sub-parsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "query",
        help="print the live configuration of a sozu (listeners, frontends, clusters, certificates, status)",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    _add_arguments(p)
    p.set_defaults(func=run_query)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=WHAT, help="what to print")
    p.add_argument("--json", action="store_true", help="print JSON (protobuf JSON mapping) instead of tables")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"sozu command socket (default {DEFAULT_SOCKET})")
    p.add_argument("--sozu-version", metavar="V", help="sozu version, e.g. 2.1.0 (default: detected)")
    p.add_argument(
        "--timeout-s", type=float, default=10.0, metavar="S", help="timeout of each request, seconds (default 10)"
    )


async def run_query(args: argparse.Namespace) -> int:
    """Run one query; 0 on success, 1 (after one line on stderr) on any error."""
    socket_path: str = args.socket
    if not structlog.is_configured():  # run outside sozud's main: keep stdout for the answer
        configure_logging("error", json=False)
    try:
        version = SozuVersion.parse(args.sozu_version) if args.sozu_version else None
        channel = SozuChannel(
            socket_path,
            version=version,
            request_timeout_s=args.timeout_s,
            connect_timeout_s=min(5.0, args.timeout_s),
            max_connect_attempts=1,
        )
        async with channel:
            data = await _QUERIES[args.what](channel)
            sozu_version = str(channel.version)
    except SozudError as e:
        hint = ""
        if isinstance(e, SozuConnectionError | SozuTimeoutError) and args.sozu_version:
            hint = f" (is --sozu-version {args.sozu_version} right? leave it out to detect the version)"
        print(f"sozud query {args.what}: {redact_text(str(e))}{hint}", file=sys.stderr)
        return ExitCode.ERROR
    if args.json:
        doc = {"socket": socket_path, "sozu_version": sozu_version, args.what: _json_view(data)}
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        print(_RENDER[args.what](data, sozu_version))
    return ExitCode.OK


# --- reading ------------------------------------------------------------------------------------------------


async def _listeners(ch: SozuChannel) -> pb.ListenersList:
    reply = await ch.request(pb.Request(list_listeners=pb.ListListeners()))
    return redact_message(reply.response.content.listeners_list)


async def _frontends(ch: SozuChannel) -> pb.ListedFrontends:
    filters = pb.FrontendFilters(http=False, https=False, tcp=False)
    reply = await ch.request(pb.Request(list_frontends=filters))
    return reply.response.content.frontend_list


async def _clusters(ch: SozuChannel) -> list[tuple[str, pb.ClusterInformation | None]]:
    reply = await ch.request(pb.Request(query_clusters_hashes=pb.QueryClustersHashes()))
    main = reply.response.content.worker_responses.map.get("main")
    ids = sorted(main.cluster_hashes.map) if main is not None else []
    out: list[tuple[str, pb.ClusterInformation | None]] = []
    for cluster_id in ids:
        reply = await ch.request(pb.Request(query_cluster_by_id=cluster_id))
        entry = reply.response.content.worker_responses.map.get("main")
        infos = list(entry.clusters.vec) if entry is not None else []
        out.append((cluster_id, redact_message(infos[0]) if infos else None))
    return out


async def _certificates(ch: SozuChannel) -> pb.CertificatesWithFingerprints:
    reply = await ch.request(pb.Request(query_certificates_from_the_state=pb.QueryCertificatesFilters()))
    return redact_message(reply.response.content.certificates_with_fingerprints)


async def _status(ch: SozuChannel) -> pb.WorkerInfos:
    reply = await ch.request(pb.Request(status=pb.Status()))
    return reply.response.content.workers


_QUERIES: dict[str, Callable[[SozuChannel], Any]] = {
    "listeners": _listeners,
    "frontends": _frontends,
    "clusters": _clusters,
    "certificates": _certificates,
    "status": _status,
}


# --- secrets --------------------------------------------------------------------------------------------------

M = TypeVar("M", bound=Message)


def redact_message(msg: M) -> M:
    """A copy of ``msg`` in which every private key (certificates, HTTPS listeners) is ``<redacted>``."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    _redact_in_place(copy)
    return copy


def _redact_in_place(msg: Message) -> None:
    if isinstance(msg, pb.CertificateAndKey | pb.HttpsListenerConfig) and msg.HasField("key") and msg.key:
        msg.key = REDACTED
    for fd, value in msg.ListFields():
        if fd.type != fd.TYPE_MESSAGE or fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            if value_fd.type == value_fd.TYPE_MESSAGE:
                for item in value.values():
                    _redact_in_place(item)
        elif fd.is_repeated:
            for item in value:
                _redact_in_place(item)
        else:
            _redact_in_place(value)


def _json_view(data: Any) -> Any:
    if isinstance(data, Message):
        return _strings_redacted(MessageToDict(data, preserving_proto_field_name=True))
    if isinstance(data, list):
        return [
            {"cluster_id": cid, **(_json_view(info) if info is not None else {"missing": True})} for cid, info in data
        ]
    raise TypeError(type(data))


def _strings_redacted(value: Any) -> Any:
    """Belt and braces: a PEM private key in any string (a chain, an answer) is replaced too."""
    if isinstance(value, dict):
        return {k: _strings_redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strings_redacted(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


# --- tables ---------------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; ``(none)`` when there is no row."""
    if not rows:
        return "(none)"
    cells = [[redact_text(str(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _opt(msg: Message, name: str, fmt: Callable[[Any], str] = str) -> str:
    return fmt(getattr(msg, name)) if msg.HasField(name) else "-"


def _bool(value: bool) -> str:
    return "yes" if value else "no"


def _enum(enum_type: Any) -> Callable[[int], str]:
    def name(value: int) -> str:
        try:
            return str(enum_type.Name(value))
        except ValueError:
            return str(value)

    return name


def _path(rule: pb.PathRule) -> str:
    kind = {pb.PREFIX: "prefix", pb.REGEX: "regex", pb.EQUALS: "equals"}.get(rule.kind, str(rule.kind))
    return f"{kind}:{rule.value}"


def _tags(tags: Any) -> str:
    return ",".join(f"{k}={tags[k]}" for k in sorted(tags)) or "-"


def _render_listeners(data: pb.ListenersList, version: str) -> str:
    rows: list[list[str]] = []
    for proto, listeners in (
        ("http", data.http_listeners),
        ("https", data.https_listeners),
        ("tcp", data.tcp_listeners),
        ("udp", data.udp_listeners),
    ):
        for addr in sorted(listeners):
            lst = listeners[addr]
            timeouts = f"{lst.front_timeout}/{lst.back_timeout}"
            if not isinstance(lst, pb.UdpListenerConfig):
                timeouts += f"/{lst.connect_timeout}"
            if isinstance(lst, pb.HttpListenerConfig | pb.HttpsListenerConfig):
                timeouts += f"/{lst.request_timeout}"
            tls = "-"
            if isinstance(lst, pb.HttpsListenerConfig):
                tls = ",".join(_enum(pb.TlsVersion)(v) for v in lst.versions) or "-"
            sticky = lst.sticky_name if isinstance(lst, pb.HttpListenerConfig | pb.HttpsListenerConfig) else "-"
            expect = _bool(lst.expect_proxy) if not isinstance(lst, pb.UdpListenerConfig) else "-"
            rows.append(
                [
                    proto,
                    addr,
                    _bool(lst.active),
                    _opt(lst, "public_address", address_text),
                    expect,
                    sticky,
                    timeouts,
                    tls,
                ]
            )
    head = ["PROTO", "ADDRESS", "ACTIVE", "PUBLIC", "EXPECT_PROXY", "STICKY_NAME", "TIMEOUTS_S", "TLS"]
    note = "TIMEOUTS_S: front/back[/connect[/request]]"
    return f"sozu {version}: listeners\n{table(head, rows)}\n{note}"


def _frontend_rows(data: Any) -> list[list[str]]:
    rows: list[list[str]] = []
    for proto, frontends in (("http", data.http_frontends), ("https", data.https_frontends)):
        for fe in frontends:
            rows.append(
                [
                    proto,
                    address_text(fe.address),
                    fe.hostname,
                    _path(fe.path),
                    _opt(fe, "method"),
                    _enum(pb.RulePosition)(fe.position),
                    fe.cluster_id if fe.HasField("cluster_id") else "(deny)",
                    _tags(fe.tags),
                ]
            )
    for proto, frontends in (("tcp", data.tcp_frontends), ("udp", data.udp_frontends)):
        for tfe in frontends:
            rows.append([proto, address_text(tfe.address), "-", "-", "-", "-", tfe.cluster_id, _tags(tfe.tags)])
    rows.sort()
    return rows


_FRONTEND_HEAD = ["PROTO", "ADDRESS", "HOSTNAME", "PATH", "METHOD", "POSITION", "CLUSTER", "TAGS"]


def _render_frontends(data: pb.ListedFrontends, version: str) -> str:
    return f"sozu {version}: frontends\n{table(_FRONTEND_HEAD, _frontend_rows(data))}"


def _cluster_settings(cfg: pb.Cluster) -> str:
    parts = [
        f"load_balancing={_enum(pb.LoadBalancingAlgorithms)(cfg.load_balancing)}",
        f"sticky_session={_bool(cfg.sticky_session)}",
        f"https_redirect={_bool(cfg.https_redirect)}",
    ]
    for fd, value in cfg.ListFields():
        if fd.name in ("cluster_id", "load_balancing", "sticky_session", "https_redirect"):
            continue
        if fd.type == fd.TYPE_ENUM and fd.enum_type is not None:
            parts.append(f"{fd.name}={fd.enum_type.values_by_number[value].name}")
        elif fd.type == fd.TYPE_MESSAGE or fd.is_repeated:
            parts.append(f"{fd.name}=(set)")
        elif fd.type == fd.TYPE_STRING and ("\n" in value or len(value) > 40):
            parts.append(f"{fd.name}=({len(value)} chars)")
        else:
            parts.append(f"{fd.name}={value}")
    return " ".join(parts)


def _render_clusters(data: list[tuple[str, pb.ClusterInformation | None]], version: str) -> str:
    if not data:
        return f"sozu {version}: clusters\n(none)"
    out = [f"sozu {version}: {len(data)} cluster(s)"]
    for cluster_id, info in data:
        out.append("")
        out.append(f"cluster {cluster_id}")
        if info is None:
            out.append("  (listed by query_clusters_hashes but not returned by query_cluster_by_id)")
            continue
        if info.HasField("configuration"):
            out.append(f"  {_cluster_settings(info.configuration)}")
        else:
            out.append("  (no configuration: frontends or backends only)")
        out.append("  frontends:")
        out.extend("    " + line for line in table(_FRONTEND_HEAD, _frontend_rows(info)).splitlines())
        rows = [
            [
                b.backend_id,
                address_text(b.address),
                str(b.load_balancing_parameters.weight) if b.HasField("load_balancing_parameters") else "-",
                _opt(b, "sticky_id"),
                _opt(b, "backup", _bool),
            ]
            for b in sorted(info.backends, key=lambda b: (b.backend_id, address_text(b.address)))
        ]
        out.append("  backends:")
        backend_table = table(["BACKEND", "ADDRESS", "WEIGHT", "STICKY_ID", "BACKUP"], rows)
        out.extend("    " + line for line in backend_table.splitlines())
    return "\n".join(out)


def _not_after(pem: str) -> str:
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(pem.encode())
    except Exception:  # a certificate sozu accepted but we cannot parse: show what we can
        return "?"
    return cert.not_valid_after_utc.strftime("%Y-%m-%d")


def _render_certificates(data: pb.CertificatesWithFingerprints, version: str) -> str:
    rows = []
    for fp in sorted(data.certs):
        c = data.certs[fp]
        rows.append(
            [
                fp,
                ",".join(c.names) or "-",
                ",".join(_enum(pb.TlsVersion)(v) for v in c.versions) or "-",
                _not_after(c.certificate),
                str(len(c.certificate_chain)),
            ]
        )
    head = ["FINGERPRINT", "NAMES", "TLS", "NOT_AFTER", "CHAIN"]
    return f"sozu {version}: certificates (private keys not shown)\n{table(head, rows)}"


def _render_status(data: pb.WorkerInfos, version: str) -> str:
    rows = [[str(w.id), str(w.pid), _enum(pb.RunState)(w.run_state)] for w in sorted(data.vec, key=lambda w: w.id)]
    return f"sozu {version}: workers\n{table(['WORKER', 'PID', 'RUN_STATE'], rows)}"


_RENDER: dict[str, Callable[[Any, str], str]] = {
    "listeners": _render_listeners,
    "frontends": _render_frontends,
    "clusters": _render_clusters,
    "certificates": _render_certificates,
    "status": _render_status,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sozud.cli.query ...`` (the same as ``sozud query ...``)."""
    parser = argparse.ArgumentParser(prog="python -m sozud.cli.query", description=__doc__.split("\n\n", 1)[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run_query(args))
    except BrokenPipeError:  # stdout closed early (| head)
        return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
