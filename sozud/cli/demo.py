"""``sozud demo``: two SIMULATED nodes on this machine, and a change replicating between them.

For a newcomer with no sozu and no OpenSVC agent at hand. Everything runs in this process, in a
temporary directory: a simulated sozu and a simulated OpenSVC agent per node, and the real sozud daemon
code between them. Nothing outside the temporary directory is touched.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from sozud.exitcodes import ExitCode
from sozud.proto import command_pb2 as pb
from sozud.testing import builders as build

BANNER = "=== sozud DEMO: simulated sozu and simulated OpenSVC agents; no real proxy or agent is involved ==="


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a local demo on two SIMULATED nodes (no sozu, no OpenSVC agent needed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sozu-version", default="2.1.0", help="simulated sozu version (2.1.0, 1.1.1, 0.15)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (sockets, state) afterwards")
    p.set_defaults(func=run_demo)


def _say(text: str) -> None:
    print(text, flush=True)


def _counts(file_bytes: bytes) -> str:
    kinds: dict[str, int] = {}
    for rec in file_bytes.split(b"\0"):
        for kind in ("ADD_CLUSTER", "ADD_BACKEND", "ADD_HTTP_FRONTEND", "ADD_HTTP_LISTENER"):
            if f'"{kind}"'.encode() in rec:
                kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{v} {k.lower()[4:]}" for k, v in sorted(kinds.items())) or "empty"


async def _demo(version: str, root: Path) -> int:
    from sozud.testing.cluster import SimCluster, mutation_count, wait_until

    _say(BANNER)
    _say(f"working directory: {root}")
    cluster = await SimCluster.create(["node-a", "node-b"], version=version, root=root)
    a, b = cluster.node("node-a"), cluster.node("node-b")
    listener = build.http_listener("127.0.0.1:8080", version=cluster.version)
    try:
        _say("\n1. node-a's sozu has one HTTP listener; both sozud daemons start.")
        await a.request(pb.Request(add_http_listener=listener))
        await cluster.start()
        await wait_until(lambda: b.live_file() == a.live_file(), what="node-b to receive node-a's listener")
        _say(f"   node-a bootstrapped the shared state; node-b now runs: {_counts(b.live_file())}")

        _say("\n2. An operator adds a cluster, a backend and a frontend on node-a's sozu only.")
        before = mutation_count(b.sozu)
        await a.request(pb.Request(add_cluster=build.cluster("shop")))
        await a.request(pb.Request(add_backend=build.backend("shop", "shop-0", "10.0.0.2:8000")))
        await a.request(pb.Request(add_http_frontend=build.http_frontend("shop", "127.0.0.1:8080", "shop.example.com")))
        await wait_until(lambda: b.live_file() == a.live_file(), what="node-b to receive the new cluster")
        _say(f"   node-b now runs: {_counts(b.live_file())}")
        _say(f"   requests sozud sent to node-b's sozu for this change: {mutation_count(b.sozu) - before}")

        _say("\n3. The operator removes the backend on node-a (the old `state load` never propagated removals).")
        before = mutation_count(b.sozu)
        await a.request(pb.Request(remove_backend=build.remove_backend("shop", "shop-0", "10.0.0.2:8000")))
        await wait_until(lambda: b.live_file() == a.live_file(), what="node-b to drop the backend")
        _say(f"   node-b now runs: {_counts(b.live_file())}")
        _say(f"   requests sent to node-b's sozu for the removal: {mutation_count(b.sozu) - before}")
        _say("\nBoth nodes are in sync. What `sozud status` shows on node-b:\n")
        from sozud.main import format_status
        from sozud.persist import Status, StatusFile

        status = StatusFile(b.config.sync.state_dir).read() or Status()
        _say("   " + format_status(status).replace("\n", "\n   "))
        return ExitCode.OK
    finally:
        await cluster.stop()


def run_demo(args: argparse.Namespace) -> int:
    from sozud.log import configure_logging

    configure_logging("warning", json=False)
    root = Path(tempfile.mkdtemp(prefix="sozud-demo-"))
    try:
        return asyncio.run(_demo(args.sozu_version, root))
    except AssertionError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return ExitCode.ERROR
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
