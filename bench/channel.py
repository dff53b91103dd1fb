"""Requests per second through ``SozuChannel``: 1 000 sequential ``add_backend`` then their ``remove_backend``.

Modes, measured in the same run:
- ``raw frames (baseline)``: pre-encoded frames written and read on one stream with the channel's
  framing functions only (no lock, no validation, no timeout): what the socket itself allows;
- ``channel, one connection``: ``SozuChannel.request`` on one persistent connection (how sozud talks);
- ``channel, connection per request``: a new ``SozuChannel`` (version given, no detection) per request,
  as sozu's own CLI does.

Without ``--socket`` the sozu SIMULATOR (``sozud.testing.fake_sozu``) runs in this process, so its own
work is part of the numbers. With ``--socket PATH`` the same requests go to a real sozu:

- the backends belong to a dedicated cluster id (``--cluster-id``, default ``sozud-bench``) that is
  never created, have TEST-NET-1 addresses (192.0.2.1, no traffic is ever routed to them: the cluster
  has no frontend), and every one of them is removed at the end of each mode;
- leftovers of an interrupted earlier run in that cluster are removed first (read back with
  ``query_cluster_by_id``).

    uv run python bench/channel.py [--requests 1000] [--socket PATH] [--sozu-version V] [--cluster-id ID]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sozud.errors import SozudError
from sozud.log import configure_logging
from sozud.proto import command_pb2 as pb
from sozud.serde import address_text, parse_address
from sozud.socket_proto import SozuChannel, make_framing
from sozud.versions import SozuVersion

BASE_PORT = 20000


def add_backend(cluster_id: str, i: int) -> pb.Request:
    return pb.Request(
        add_backend=pb.AddBackend(
            cluster_id=cluster_id,
            backend_id=f"{cluster_id}-{i}",
            address=parse_address(f"192.0.2.1:{BASE_PORT + i}"),
            load_balancing_parameters=pb.LoadBalancingParams(weight=100),
        )
    )


def remove_backend(cluster_id: str, backend_id: str, address: pb.SocketAddress) -> pb.Request:
    req = pb.Request(remove_backend=pb.RemoveBackend(cluster_id=cluster_id, backend_id=backend_id))
    req.remove_backend.address.CopyFrom(address)
    return req


def removals(cluster_id: str, n: int) -> list[pb.Request]:
    return [
        remove_backend(cluster_id, f"{cluster_id}-{i}", parse_address(f"192.0.2.1:{BASE_PORT + i}")) for i in range(n)
    ]


class Timed:
    def __init__(self) -> None:
        self.latencies_s: list[float] = []
        self.total_s = 0.0

    async def run(self, requests: list[pb.Request], send: Callable[[pb.Request], Awaitable[None]]) -> None:
        start = time.perf_counter()
        for req in requests:
            t0 = time.perf_counter()
            await send(req)
            self.latencies_s.append(time.perf_counter() - t0)
        self.total_s = time.perf_counter() - start

    def row(self, mode: str, what: str) -> list[str]:
        lat = sorted(self.latencies_s)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return [
            mode,
            what,
            str(len(lat)),
            f"{self.total_s:.3f}",
            f"{len(lat) / self.total_s:,.0f}",
            f"{statistics.median(lat) * 1000:.3f}",
            f"{p99 * 1000:.3f}",
        ]


async def cleanup(ch: SozuChannel, cluster_id: str) -> int:
    """Remove every backend of the bench cluster (leftovers of an interrupted run). Returns the count."""
    reply = await ch.request(pb.Request(query_cluster_by_id=cluster_id))
    main = reply.response.content.worker_responses.map.get("main")
    if main is None or not main.clusters.vec:
        return 0
    backends = list(main.clusters.vec[0].backends)
    for b in backends:
        await ch.request(remove_backend(cluster_id, b.backend_id, b.address))
    return len(backends)


async def raw_mode(socket_path: str, version: SozuVersion, requests: list[pb.Request]) -> Timed:
    framing = make_framing(version, socket_path=socket_path, max_frame_bytes=2_000_000)
    reader, writer = await asyncio.open_unix_connection(socket_path, limit=2_000_001)
    frames = {id(r): framing.encode(r) for r in requests}

    async def send(req: pb.Request) -> None:
        writer.write(frames[id(req)])
        while True:
            resp = await framing.read(reader)
            if resp.status == pb.FAILURE:
                raise SystemExit(f"bench: {req.WhichOneof('request_type')} failed: {resp.message}")
            if resp.status == pb.OK:
                return

    timed = Timed()
    try:
        await timed.run(requests, send)
    finally:
        writer.close()
        await writer.wait_closed()
    return timed


async def channel_mode(ch: SozuChannel, requests: list[pb.Request]) -> Timed:
    async def send(req: pb.Request) -> None:
        await ch.request(req)

    timed = Timed()
    await timed.run(requests, send)
    return timed


async def per_request_mode(socket_path: str, version: SozuVersion, requests: list[pb.Request]) -> Timed:
    async def send(req: pb.Request) -> None:
        async with SozuChannel(socket_path, version=version, max_connect_attempts=1) as ch:
            await ch.request(req)

    timed = Timed()
    await timed.run(requests, send)
    return timed


def table(rows: list[list[str]]) -> str:
    head = ["mode", "request", "n", "seconds", "req/s", "p50 ms", "p99 ms"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


async def bench(socket_path: str, version: SozuVersion | None, n: int, cluster_id: str) -> None:
    rows: list[list[str]] = []
    rates: dict[str, float] = {}
    adds = [add_backend(cluster_id, i) for i in range(n)]
    async with SozuChannel(socket_path, version=version, max_connect_attempts=3) as ch:
        await ch.connect()
        detected = ch.version
        left = await cleanup(ch, cluster_id)
        if left:
            print(f"removed {left} leftover backend(s) of cluster {cluster_id} first")
        print(
            f"sozu {detected} at {socket_path}: {n} add_backend then {n} remove_backend per mode (cluster {cluster_id})"
        )
        warm = min(n, 100)  # warm-up, not measured: first-use costs would favour the modes that run later
        await channel_mode(ch, adds[:warm])
        await channel_mode(ch, removals(cluster_id, warm))

        modes: list[tuple[str, Callable[[list[pb.Request]], Awaitable[Timed]]]] = [
            ("raw frames (baseline)", lambda reqs: raw_mode(socket_path, detected, reqs)),
            ("channel, one connection", lambda reqs: channel_mode(ch, reqs)),
            ("channel, connection per request", lambda reqs: per_request_mode(socket_path, detected, reqs)),
        ]
        try:
            for mode, run in modes:
                added = await run(adds)
                removed = await run(removals(cluster_id, n))
                rows += [added.row(mode, "add_backend"), removed.row(mode, "remove_backend")]
                rates[mode] = n / added.total_s
        finally:
            await cleanup(ch, cluster_id)  # nothing of ours stays in sozu, even after an error
    print(table(rows))
    base = rates["raw frames (baseline)"]
    for mode, rate in rates.items():
        print(f"add_backend rate, {mode}: {rate / base:.2f} x baseline")
    first = adds[0].add_backend
    print(f"(backends {first.backend_id}.. at {address_text(first.address)}.., all removed)")


async def main_async(args: argparse.Namespace) -> int:
    version = SozuVersion.parse(args.sozu_version) if args.sozu_version else None
    if args.socket:
        await bench(args.socket, version, args.requests, args.cluster_id)
        return 0
    from sozud.testing.fake_sozu import FakeSozu

    with tempfile.TemporaryDirectory(prefix="sz") as tmp:
        path = str(Path(tmp) / "sozu.sock")
        async with FakeSozu(path, version or SozuVersion.parse("2.1.0")):
            print("against the in-process sozu SIMULATOR (sozud.testing.fake_sozu), not a real sozu")
            await bench(path, version, args.requests, args.cluster_id)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--requests", type=int, default=1000, help="add_backend requests per mode (default 1000)")
    parser.add_argument("--socket", help="a real sozu command socket (default: in-process simulator)")
    parser.add_argument("--sozu-version", help="sozu version (default: detected; simulator default 2.1.0)")
    parser.add_argument("--cluster-id", default="sozud-bench", help="dedicated cluster id (default sozud-bench)")
    args = parser.parse_args()
    configure_logging("error", json=False)
    try:
        return asyncio.run(main_async(args))
    except SozudError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
