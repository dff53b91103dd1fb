"""Sync latency and traffic across a 3-node SIMULATED cluster (simulated sozu + simulated OpenSVC agents,
the real sozud daemon on each node).

Prints:
- trigger-to-applied latency (p50, p99) of a one-object change made on node a's sozu, until both peers'
  sozu run it, in a state of ``--clusters`` clusters (each with one backend and one HTTP frontend);
- mutation requests sent to sozu and pushes to OpenSVC per change, summed over the cluster, next to what
  the old watch-script approach sends for the same change (full `sozu state load` replays, echoed back by
  every peer).

    uv run python bench/sync.py [--clusters 10000] [--changes 20] [--no-shared-dir]
    uv run python bench/sync.py --wake-comparison [--clusters 100] [--changes 5]

The simulated v2 agents replicate an API write at their monitor's next loop (``--monitor-interval-s``,
15 s like the real agent) unless sozud wakes the monitor after its push; ``--wake-comparison`` measures
change -> applied on the other nodes with and without that wake.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sozud.log import configure_logging
from sozud.proto import command_pb2 as pb
from sozud.state.codec import write_state_file
from sozud.state.model import ConfigState
from sozud.testing import builders as build
from sozud.testing.cluster import SimCluster, mutation_count, wait_until
from sozud.versions import SozuVersion


def generated_state(version: SozuVersion, clusters: int) -> ConfigState:
    state = ConfigState(version)
    state.add_listener("http", build.http_listener("127.0.0.1:18080"))
    for i in range(clusters):
        cid = f"app-{i:05d}"
        state.add("cluster", build.cluster(cid))
        addr = f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8000"
        state.add("backend", build.backend(cid, f"{cid}-0", addr))
        state.add("http_frontend", build.http_frontend(cid, "127.0.0.1:18080", f"{cid}.example.com"))
    return state


def writes(cluster: SimCluster) -> int:
    keys = (cluster.key, cluster.key + ".manifest")  # one manifest write per push (sharded layout)
    return sum(1 for n in cluster.nodes for r in n.agent.requests if r.key in keys and r.action == "POST key")


async def run(
    clusters: int, changes: int, shared_dir: bool, *, wake: bool = True, monitor_interval_s: float = 15.0
) -> tuple[float, float]:
    if not wake:
        from sozud.om_api import OMClient

        async def no_wake(self: OMClient, obj: str, reason: str) -> bool:
            return False

        OMClient.wake_monitor = no_wake  # type: ignore[method-assign]
    version = SozuVersion(2, 1, 0)
    state = generated_state(version, clusters)
    data = write_state_file(state)
    settings = {"poll_interval_s": 0.02, "opensvc_poll_interval_s": 0.05, "request_timeout_s": 60.0}
    cluster = await SimCluster.create(
        ["a", "b", "c"], version=str(version), settings=settings, monitor_interval_s=monitor_interval_s
    )
    if shared_dir:
        for n in cluster.nodes:
            n.config.sozu.shared_dir = str(n.dir)
    for n in cluster.nodes:
        n.sozu.state.load_state_file(data, source="bench")
    cluster.opensvc.set_value("a", cluster.obj, cluster.key, data)
    await cluster.opensvc.settle()
    t0 = time.perf_counter()
    await cluster.start()
    latencies: list[float] = []
    try:
        for n in cluster.nodes:
            d = n.daemon
            assert d is not None
            await wait_until(lambda d=d: d.last_report is not None, timeout_s=600, what="first sync")
        startup_s = time.perf_counter() - t0
        mutations0 = sum(mutation_count(n.sozu) for n in cluster.nodes)
        writes0 = writes(cluster)
        a, b, c = cluster.nodes
        for i in range(changes):
            cid = f"bench-{i}"
            start = time.perf_counter()
            err = a.sozu.state.dispatch(pb.Request(add_cluster=build.cluster(cid)))
            assert err is None, err
            await wait_until(
                lambda cid=cid: cid in b.sozu.state.clusters and cid in c.sozu.state.clusters,
                timeout_s=120,
                what=f"change {i} to reach b and c",
            )
            latencies.append(time.perf_counter() - start)
        # let every echo happen (or not): one more sync on every node
        marks = {n.name: n.daemon.syncs_attempted for n in cluster.nodes if n.daemon}
        for n in cluster.nodes:
            assert n.daemon is not None
            n.daemon.trigger("bench")
        for n in cluster.nodes:
            d = n.daemon
            assert d is not None
            await wait_until(lambda d=d, m=marks[n.name]: d.syncs_attempted > m, timeout_s=120, what="final sync")
        mutations = sum(mutation_count(n.sozu) for n in cluster.nodes) - mutations0
        pushes = writes(cluster) - writes0
    finally:
        await cluster.stop()

    records = data.count(b"\0")
    nodes = len(cluster.nodes)
    # The old way: the origin pushes the whole file; every peer replays it with `sozu state load`
    # (one request per record), and each peer's watcher pushes its rewritten file back (an echo), which
    # every other node replays again: N pushes and N*(N-1) full replays per change.
    old_pushes = nodes
    old_requests = nodes * (nodes - 1) * (records + 1)
    lat = sorted(latencies)
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    print(f"state: {clusters} clusters, {len(state)} objects, {records} records, {len(data) / 1e6:.1f} MB")
    print(f"live reads: {'one SaveState via --shared-dir' if shared_dir else 'one query per cluster'}")
    print(f"startup (3 nodes, first sync each): {startup_s:.2f} s")
    print()
    print(f"| {'one-object change, 3 nodes':40} | {'sozud':>12} | {'old full replay':>16} | {'ratio':>8} |")
    print(f"|{'-' * 42}|{'-' * 14}|{'-' * 18}|{'-' * 10}|")
    print(f"| {'trigger-to-applied p50 (s)':40} | {p50:>12.3f} | {'n/a':>16} | {'':>8} |")
    print(f"| {'trigger-to-applied p99 (s)':40} | {p99:>12.3f} | {'n/a':>16} | {'':>8} |")
    req_per_change = mutations / changes
    push_per_change = pushes / changes
    print(
        f"| {'mutation requests to sozu per change':40} | {req_per_change:>12.1f} | {old_requests:>16} | "
        f"{old_requests / max(req_per_change, 1e-9):>7.0f}x |"
    )
    print(
        f"| {'pushes to OpenSVC per change':40} | {push_per_change:>12.1f} | {old_pushes:>16} | "
        f"{old_pushes / max(push_per_change, 1e-9):>7.1f}x |"
    )
    print(f"\n{changes} changes measured; latency includes the probe interval (0.02 s) and debounce (10 ms).")
    print(
        "The three nodes, their simulated sozu and simulated agents share ONE Python process and event loop: every"
        " state parse and SaveState of every node runs one after the other, so the latency here is an upper"
        " bound; per-node costs (parse, plan, live read) are in bench/state.py."
    )
    return p50, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--no-shared-dir", action="store_true", help="read the live state with one query per cluster")
    parser.add_argument("--monitor-interval-s", type=float, default=15.0, help="the simulated agents' monitor loop")
    parser.add_argument("--no-wake", action="store_true", help="do not wake the agent's monitor after a push")
    parser.add_argument("--wake-comparison", action="store_true", help="measure with and without the wake")
    args = parser.parse_args()
    configure_logging("error", json=False)
    shared_dir = not args.no_shared_dir
    if not args.wake_comparison:
        asyncio.run(
            run(
                args.clusters,
                args.changes,
                shared_dir,
                wake=not args.no_wake,
                monitor_interval_s=args.monitor_interval_s,
            )
        )
        return
    woken = asyncio.run(run(args.clusters, args.changes, shared_dir, monitor_interval_s=args.monitor_interval_s))
    print()
    plain = asyncio.run(
        run(args.clusters, args.changes, shared_dir, wake=False, monitor_interval_s=args.monitor_interval_s)
    )
    title = f"change -> applied on b and c ({args.monitor_interval_s:g} s monitor loop)"
    print(f"\n| {title:50} | {'p50 (s)':>8} | {'p99 (s)':>8} |")
    print(f"|{'-' * 52}|{'-' * 10}|{'-' * 10}|")
    print(f"| {'sozud wakes the monitor after its push':50} | {woken[0]:>8.3f} | {woken[1]:>8.3f} |")
    print(f"| {'no wake (replicated at the next monitor loop)':50} | {plain[0]:>8.3f} | {plain[1]:>8.3f} |")


if __name__ == "__main__":
    main()
