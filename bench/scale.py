"""How one change's cost grows with the routing state: one node, one remote change, states of 100 to
100,000 clusters (issue 10: one change should cost O(change), not O(state)).

    uv run python bench/scale.py [--sizes 100,10000,100000] [--changes 3] [--settle 1] [--no-shared-dir]

Two sozud engines (nodes a and b), each over its own SIMULATED sozu 2.1.0 (``sozud.testing.fake_sozu``),
share one in-memory OpenSVC object (sharded layout). Both start in sync on a state of N clusters (one
backend and one HTTP frontend each). Then, per change: an operator changes one backend's weight on b's
sozu; b syncs (reads it, pushes); a syncs (the step measured: from its trigger to the change applied on
its sozu); then b reads its own push back (the step that moves its base). Printed per N: a's sync time
(p50), b's push sync time and read-back sync time (p50), requests a sent to its sozu (mutations and
reads), bytes b wrote to OpenSVC, the process's max RSS, how many of a's measured steps and of b's
read-backs took the incremental path (docs/sync.md, "Incremental steps"), and the ratio of a's time between the
largest and the smallest size, all measured in the same run, and how many shards the layout holds.
``--profile FILE`` writes a cProfile of a's measured steps.

``--settle S`` (default 1 s) passes between b's push and a's step. On a real fleet they are two machines and
the agent takes seconds to replicate; here they share one machine, and right after b's push step at 100,000
clusters (a 45 MB SaveState file written, gigabytes freed) a's first request to its sozu took 6-10 ms instead
of 0.4-1 ms, which is b's cost, not a's. ``--settle 0`` measures it that way anyway.

What the time includes: sozud's own work, and the SIMULATED sozu's (a SaveState of the whole state
per live read with the shared directory, written by Python where real sozu writes it natively): the
simulator's share is printed separately (``sim s``), and ``sozud s`` is the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from sozud._om.memory import MemoryTransport
from sozud.adapters import SozuAdapter
from sozud.layout import OpenSVCShared
from sozud.log import configure_logging
from sozud.main import tune_gc
from sozud.om_api import OMClient, OMSettings
from sozud.persist import BaseStore
from sozud.proto import command_pb2 as pb
from sozud.socket_proto import SozuChannel
from sozud.state.codec import MAX_STATE_BYTES, write_state_file
from sozud.sync import EngineSettings, SyncEngine
from sozud.testing import builders as build
from sozud.testing.fake_sozu import FakeSozu
from sozud.versions import SozuVersion

OBJ = "igw/sec/sozu"
VERSION = SozuVersion(2, 1, 0)
INCREMENTAL = True  # as the daemon by default; --full: every step full (`incremental = false`, docs/sync.md)
PROFILE: cProfile.Profile | None = None  # --profile: a's measured syncs only
SETTLE_S = 1.0  # --settle
MUTATIONS = {"add_backend", "remove_backend", "add_cluster", "remove_cluster", "add_http_frontend"}


class Node:
    def __init__(self, name: str, root: Path, transport: MemoryTransport, shared_dir: bool) -> None:
        self.dir = root / name
        self.dir.mkdir()
        self.sozu = FakeSozu(str(self.dir / "s.sock"), str(VERSION))
        self.channel = SozuChannel(str(self.dir / "s.sock"), version=VERSION, request_timeout_s=300.0)
        self.adapter = SozuAdapter(self.channel, shared_dir=str(self.dir) if shared_dir else None)
        self.adapter.keep_read_after_apply = INCREMENTAL
        self.shared = OpenSVCShared(
            OMClient(transport, OMSettings(retry_attempts=1, request_timeout_s=300.0)),
            OBJ,
            "state.json",
            "state.json.meta",
            max_state_bytes=MAX_STATE_BYTES,
        )
        settings = EngineSettings(node=name, object=OBJ, max_removal_ratio=1.0, incremental=INCREMENTAL)
        self.engine = SyncEngine(self.adapter, self.shared, BaseStore(self.dir / "state"), settings)

    def sim_seconds(self) -> float:
        return self.sozu.busy_s


async def measure(clusters: int, changes: int, shared_dir: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="szscale"))
    transport = MemoryTransport(carries_text=True)
    transport.create_object(OBJ)
    a, b = Node("a", root, transport, shared_dir), Node("b", root, transport, shared_dir)
    data = write_state_file(build.fleet_state(clusters, listener="127.0.0.1:18080"))
    for n in (a, b):
        n.sozu.state.load_state_file(data, source="bench")
        await n.sozu.start()
    try:
        for n in (a, b, a, b):  # a bootstraps, b reads it back, both take their base
            await n.engine.sync_once("setup")
        a_times, a_sozud, b_times, b_back, requests, written = [], [], [], [], [], []
        b_back_incremental: list[bool] = []
        incremental: list[bool] = []
        for i in range(changes):
            cid = f"app-{(clusters // 2 + i) % clusters:06d}"
            weight = 7 + i
            index = int(cid.split("-")[1])
            addr = f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}:8000"  # as fleet_state builds it
            old = build.backend(cid, f"{cid}-0", addr, weight=100 + i - 1 if i else 100)
            remove = pb.RemoveBackend(cluster_id=cid, backend_id=f"{cid}-0", address=old.address)
            assert b.sozu.state.dispatch(pb.Request(remove_backend=remove)) is None
            new = build.backend(cid, f"{cid}-0", addr, weight=weight)
            assert b.sozu.state.dispatch(pb.Request(add_backend=new)) is None
            before_written = b.shared.bytes_written
            started = time.perf_counter()
            await b.engine.sync_once("bench")
            b_times.append(time.perf_counter() - started)
            written.append(b.shared.bytes_written - before_written)
            await asyncio.sleep(SETTLE_S)  # the agent's replication, between two machines (module docstring)
            sent = len(a.sozu.requests)
            sim = a.sim_seconds()
            started = time.perf_counter()
            if PROFILE is not None:
                PROFILE.enable()
            report = await a.engine.sync_once("bench")
            if PROFILE is not None:
                PROFILE.disable()
            elapsed = time.perf_counter() - started
            a_times.append(elapsed)
            incremental.append(report.incremental)
            a_sozud.append(elapsed - (a.sim_seconds() - sim))
            requests.append(len(a.sozu.requests) - sent)
            assert report.requests_sent >= 1, f"a applied nothing for change {i}: {report}"
            started = time.perf_counter()
            back = await b.engine.sync_once("bench")  # b reads its own push back: its base moves
            b_back.append(time.perf_counter() - started)
            b_back_incremental.append(back.incremental)
        return {
            "a_s": statistics.median(a_times),
            "a_sozud_s": statistics.median(a_sozud),
            "b_s": statistics.median(b_times),
            "b_back_s": statistics.median(b_back),
            "b_back_incremental": f"{sum(b_back_incremental)}/{len(b_back_incremental)}",
            "requests": statistics.median(requests),
            "written": statistics.median(written),
            "incremental": f"{sum(incremental)}/{len(incremental)}",
            "shards": len(msgspec.json.decode(transport.objects[OBJ]["state.json.manifest"])["shards"]),
        }
    finally:
        for n in (a, b):
            await n.channel.aclose()
            await n.sozu.stop()


def main() -> None:
    global PROFILE, INCREMENTAL, SETTLE_S
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,10000,100000")
    parser.add_argument("--changes", type=int, default=3)
    parser.add_argument("--no-shared-dir", action="store_true", help="live reads by queries, not SaveState")
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of a's measured syncs to FILE")
    parser.add_argument("--full", action="store_true", help="every step full (the daemon with incremental = false)")
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds between b's push and a's step (module docstring)"
    )
    args = parser.parse_args()
    INCREMENTAL = not args.full
    SETTLE_S = args.settle
    if args.profile:
        PROFILE = cProfile.Profile()
    configure_logging("error")
    tune_gc()  # as the daemon does (sozud run)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        "| clusters | a: sync s (p50) | of it sozud s | b: push sync s | b: read-back sync s | requests to a's sozu "
        "| bytes to OpenSVC | shards | max RSS MB | a's incremental steps | b's incremental read-backs |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = {}
    for n in sizes:
        r = asyncio.run(measure(n, args.changes, not args.no_shared_dir))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        results[n] = r
        print(
            f"| {n:,} | {r['a_s']:.3f} | {r['a_sozud_s']:.3f} | {r['b_s']:.3f} | {r['b_back_s']:.3f} "
            f"| {r['requests']:.0f} | {r['written']:,.0f} | {r['shards']} | {rss:.0f} | {r['incremental']} "
            f"| {r['b_back_incremental']} |",
            flush=True,
        )
    first, last = sizes[0], sizes[-1]
    ratio = results[last]["a_sozud_s"] / max(results[first]["a_sozud_s"], 1e-9)
    if PROFILE is not None:
        PROFILE.dump_stats(args.profile)
    print(
        f"\nratio {last:,}/{first:,} of a's sozud time: {ratio:.1f} (goal <= 3); settle {SETTLE_S:g} s; "
        f"pid {os.getpid()}"
    )


if __name__ == "__main__":
    main()
