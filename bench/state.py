"""Benchmark of sozud's state handling: parse, live read, plan, apply (one by one and in batch).

    uv run python bench/state.py [--sizes 1000,10000,100000] [--apply-sizes 1000,10000]
                                 [--version 2.1.0] [--socket PATH --shared-dir DIR [--shared-dir-sozu-path DIR]]

For every size N (objects: N/4 clusters, N/2 backends, N/4 HTTP frontends, plus two listeners, the
mix of docs/sozu-command-protocol.md §11.10) it prints, in one table:

- parse time of the state file next to a plain msgspec.json.decode of its records (the baseline; once
  as is, once with the garbage collector off, which the baseline's growing list of values keeps busy), a
  re-parse after a one-backend change with the record cache, and plan time from an empty state,
- the requests of a live read without and with a shared directory (SaveState), and their times,
- the requests sozud sends for a one-object change (a backend's weight) next to what a full replay
  sends (one request per record, the old way), and their ratio,
- peak memory of the size's steps (tracemalloc peak, Python allocations), the peak RSS of a fresh process
  that only parses the file (and the bytes per object it adds), the peak RSS of a fresh process running one
  sozud engine for three syncs against the simulator (a node holding the state: live, shared and base
  states, caches, shards; simulator only) and its RSS once they are done, and this process's max RSS.

Then, for every apply size: the time to apply the state to an empty sozu one request at a time and in
batch mode (LoadState chunks through the shared directory), with the requests counted; the ratio is
against one-by-one, measured in the same run.

By default everything runs against the in-process simulator (``sozud.testing.fake_sozu``); with
``--socket`` the live reads and applies go to a real sozu (which must start empty of these objects and
is left holding them; ``--shared-dir`` is needed for the SaveState and batch rows).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgspec

from sozud.log import configure_logging
from sozud.proto import command_pb2 as pb
from sozud.socket_proto import SozuChannel
from sozud.state.apply import apply_plan
from sozud.state.codec import RecordCache, parse_state_file, write_state_file
from sozud.state.live import read_live_report
from sozud.state.model import ConfigState
from sozud.state.plan import plan
from sozud.testing import builders as build
from sozud.versions import SozuVersion

T = TypeVar("T")

HTTP_LISTENER = "127.0.0.1:28080"
HTTPS_LISTENER = "127.0.0.1:28443"


# --- generated states --------------------------------------------------------------------------------


def generate_state(n: int, version: SozuVersion) -> ConfigState:
    """N objects: N/4 clusters, N/2 backends (2 per cluster), N/4 HTTP frontends, and 2 listeners."""
    state = ConfigState(version)
    http = build.http_listener(HTTP_LISTENER, version=version, active=True)
    https = build.https_listener(HTTPS_LISTENER, version=version, active=True)
    state.add_listener("http", http)
    state.add_listener("https", https)
    clusters = max(1, n // 4)
    for c in range(clusters):
        cid = f"app{c:06d}"
        state.add("cluster", build.cluster(cid))
        for b in range(2):
            addr = f"10.{(c >> 8) & 255}.{c & 255}.{b + 1}:8080"
            state.add("backend", build.backend(cid, f"{cid}-b{b}", addr))
        state.add("http_frontend", build.http_frontend(cid, HTTP_LISTENER, f"{cid}.example.test"))
    return state


def one_backend_changed(state: ConfigState) -> ConfigState:
    out = state.copy()
    key = next(k for k in out if k[0] == "backend")
    value = out[key]
    assert isinstance(value, pb.AddBackend)
    value.load_balancing_parameters.weight = 42
    out[key] = value
    return out


# --- measuring ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    what: str
    size: int
    value: str
    baseline: str = ""
    ratio: str = ""


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


async def atimed(fn: Callable[[], Awaitable[T]]) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = await fn()
    return out, time.perf_counter() - t0


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def ratio(a: float, b: float) -> str:
    if b <= 0:
        return "-"
    r = a / b
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Target:
    """A sozu to talk to: a fresh simulator per use, or a real socket."""

    def __init__(self, args: argparse.Namespace, version: SozuVersion) -> None:
        self.args = args
        self.version = version
        self.tmp = tempfile.mkdtemp(prefix="szb")
        self.fake: Any = None

    @property
    def shared_dir(self) -> str | None:
        return self.args.shared_dir if self.args.socket else self.tmp

    @property
    def shared_dir_sozu_path(self) -> str | None:
        return self.args.shared_dir_sozu_path if self.args.socket else None

    async def open(self) -> tuple[SozuChannel, Callable[[], int]]:
        """A connected channel, and a function giving the number of requests sozu has processed."""
        if self.args.socket:
            ch = SozuChannel(self.args.socket, request_timeout_s=300.0)
            await ch.connect()
            return ch, lambda: -1
        from sozud.testing.fake_sozu import FakeSozu

        path = os.path.join(self.tmp, f"s{time.monotonic_ns() % 10**9}.sock")
        self.fake = FakeSozu(path, self.version)
        await self.fake.start()
        ch = SozuChannel(path, version=self.version, request_timeout_s=300.0)
        await ch.connect()
        fake = self.fake
        return ch, lambda: len(fake.requests)

    async def close(self, ch: SozuChannel) -> None:
        await ch.aclose()
        if self.fake is not None:
            await self.fake.stop()
            self.fake = None

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


async def bench_size(n: int, target: Target, rows: list[Row]) -> None:
    version = target.version
    gc.collect()
    state = generate_state(n, version)
    data, t_encode = timed(lambda: write_state_file(state))
    parsed, t_parse = timed(lambda: parse_state_file(data, version, source="bench"))
    assert parsed.same_as(state), "the codec does not round-trip the generated state"
    rows.append(Row("state file size", n, f"{len(data) / 1e6:.2f} MB"))
    rows.append(Row("parse state file", n, ms(t_parse), f"encode {ms(t_encode)}", ratio(t_parse, t_encode)))
    records = data.split(b"\0")[:-1]
    _, t_msgspec = timed(lambda: [msgspec.json.decode(r) for r in records])
    rows.append(
        Row(
            "parse state file (full)", n, ms(t_parse), f"msgspec.json.decode {ms(t_msgspec)}", ratio(t_parse, t_msgspec)
        )
    )
    # the same baseline without the garbage collector's passes over the growing list of decoded values
    gc.disable()
    try:
        _, t_msgspec_nogc = timed(lambda: [msgspec.json.decode(r) for r in records])
    finally:
        gc.enable()
    rows.append(
        Row(
            "parse state file (full), baseline without GC",
            n,
            ms(t_parse),
            f"msgspec.json.decode, GC off {ms(t_msgspec_nogc)}",
            ratio(t_parse, t_msgspec_nogc),
        )
    )
    cache = RecordCache()
    parse_state_file(data, version, source="bench", cache=cache)
    changed_data = write_state_file(one_backend_changed(state))
    again, t_again = timed(lambda: parse_state_file(changed_data, version, source="bench", cache=cache))
    assert again.same_as(one_backend_changed(state))
    rows.append(
        Row(
            "re-parse, one backend changed (record cache)",
            n,
            ms(t_again),
            f"msgspec.json.decode {ms(t_msgspec)}",
            ratio(t_again, t_msgspec),
        )
    )
    empty = ConfigState(version)
    p, t_plan = timed(lambda: plan(empty, state, force=True))
    rows.append(
        Row(
            "plan from empty", n, f"{ms(t_plan)} ({len(p.steps)} steps)", f"parse {ms(t_parse)}", ratio(t_plan, t_parse)
        )
    )
    changed = one_backend_changed(state)
    p1, t_plan1 = timed(lambda: plan(state, changed))
    rows.append(
        Row(
            "plan, one backend changed",
            n,
            f"{ms(t_plan1)} ({len(p1.steps)} steps)",
            f"from empty {ms(t_plan)}",
            ratio(t_plan1, t_plan),
        )
    )
    scope = [k for k, v in changed.items() if v != state.get(k)]  # (the engine knows it)
    p2, t_plan2 = timed(lambda: plan(state, changed, scope=scope))
    assert p2.digest() == p1.digest()
    rows.append(
        Row(
            "plan, one backend changed, scoped (incremental)",
            n,
            f"{ms(t_plan2)} ({len(p2.steps)} steps)",
            f"full {ms(t_plan1)}",
            ratio(t_plan2, t_plan1),
        )
    )
    del p, p1, p2, parsed
    # peak memory, in a separate pass (tracemalloc slows Python down: never time under it)
    gc.collect()
    tracemalloc.start()
    parsed = parse_state_file(data, version, source="bench")
    _, peak_parse = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    plan(empty, parsed, force=True)
    _, peak_plan = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del parsed
    rows.append(
        Row("peak python memory: parse / plan from empty", n, f"{peak_parse / 1e6:.1f} MB / {peak_plan / 1e6:.1f} MB")
    )
    rows.append(Row("parse peak memory per object", n, f"{peak_parse / max(len(state), 1):.0f} bytes"))
    before, after = parse_rss_alone(data, version)
    rows.append(
        Row(
            "max RSS of a process that parses the file",
            n,
            f"{after:.0f} MB",
            f"after imports {before:.0f} MB",
            f"{(after - before) * 2**20 / max(len(state), 1):.0f} B/object",
        )
    )

    # live reads: load the state into a sozu first
    ch, _processed = await target.open()
    try:
        if target.args.socket is None:
            target.fake.state.load_state_file(data, source="bench")  # load the simulator directly
        t_q = 0.0
        if target.args.socket or n <= target.args.max_query_read:
            r_q, t_q = await atimed(lambda: read_live_report(ch))
            rows.append(Row("live read, queries", n, f"{r_q.requests} requests, {ms(t_q)}"))
        else:
            # the simulator answers each cluster query in O(N) (it sorts every frontend): not run here
            expected = 4 + sum(1 for k in state if k[0] == "cluster")
            rows.append(Row("live read, queries", n, f"{expected} requests (not run: simulator too slow)"))
        if target.shared_dir is not None:
            r_s, t_s = await atimed(
                lambda: read_live_report(
                    ch, shared_dir=target.shared_dir, shared_dir_sozu_path=target.shared_dir_sozu_path
                )
            )
            rows.append(
                Row(
                    "live read, shared dir (SaveState)",
                    n,
                    f"{r_s.requests} requests, {ms(t_s)}",
                    f"queries {ms(t_q)}" if t_q else "",
                    ratio(t_s, t_q) if t_q else "",
                )
            )
        # one-object change: what sozud sends vs a full replay of every record
        replay = len(data.split(b"\n\0")) - 1
        report = await apply_plan(
            ch, changed, shared_dir=target.shared_dir, shared_dir_sozu_path=target.shared_dir_sozu_path
        )
        mutations = sum(v for k, v in report.requests_by_type.items() if not _is_read(k))
        rows.append(
            Row(
                "one-object change: mutations sent",
                n,
                f"{mutations} (+{report.requests_sent - mutations} reads)",
                f"full replay {replay}",
                ratio(report.requests_sent, replay),
            )
        )
        if target.args.socket is None:
            before, after, kept = await node_rss_alone(target.fake.socket_path, target.tmp, version)
            rows.append(
                Row(
                    "max RSS of a node holding the state (3 syncs)",
                    n,
                    f"{after:.0f} MB",
                    f"after imports {before:.0f} MB",
                    f"{(after - before) * 2**20 / max(len(state), 1):.0f} B/object",
                )
            )
            rows.append(
                Row(
                    "RSS of that node once its syncs are done",
                    n,
                    f"{kept:.0f} MB",
                    f"after imports {before:.0f} MB",
                    f"{(kept - before) * 2**20 / max(len(state), 1):.0f} B/object",
                )
            )
    finally:
        await target.close(ch)
    rows.append(Row("max RSS so far", n, f"{max_rss_mb():.0f} MB"))


_PARSE_ALONE = """
import sys
from sozud.state.codec import parse_state_file
from sozud.versions import SozuVersion
def hwm():  # peak RSS in MB; unlike ru_maxrss, reset by exec (not inherited from the benchmark's heap)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
data = open(sys.argv[1], "rb").read()
before = hwm()
state = parse_state_file(data, SozuVersion.parse(sys.argv[2]), source="bench")
print(before, hwm())
"""


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NODE_ALONE = """
import asyncio, gc, sys, tempfile
from sozud._om.memory import MemoryTransport
from sozud.adapters import SozuAdapter
from sozud.layout import OpenSVCShared
from sozud.main import tune_gc
from sozud.om_api import OMClient, OMSettings
from sozud.persist import BaseStore
from sozud.socket_proto import SozuChannel
from sozud.state.codec import MAX_STATE_BYTES
from sozud.sync import EngineSettings, SyncEngine
from sozud.versions import SozuVersion
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
async def main(sock, shared_dir, version):
    obj = "igw/sec/sozu"
    ch = SozuChannel(sock, version=version, request_timeout_s=600.0)
    adapter = SozuAdapter(ch, shared_dir=shared_dir)
    adapter.keep_read_after_apply = True
    transport = MemoryTransport(carries_text=True)
    transport.create_object(obj)
    client = OMClient(transport, OMSettings(retry_attempts=1, request_timeout_s=600.0))
    shared = OpenSVCShared(client, obj, "state.json", "state.json.meta", max_state_bytes=MAX_STATE_BYTES)
    settings = EngineSettings(node="n", object=obj, incremental=True)
    with tempfile.TemporaryDirectory() as state_dir:
        engine = SyncEngine(adapter, shared, BaseStore(state_dir), settings)
        before = hwm()
        for _ in range(3):  # bootstrap (reads sozu, pushes), reads its push back, a settled step
            await engine.sync_once("bench")
        gc.collect()
        print(before, hwm(), rss())
    await ch.aclose()
tune_gc()
asyncio.run(main(sys.argv[1], sys.argv[2], SozuVersion.parse(sys.argv[3])))
"""


async def node_rss_alone(socket_path: str, shared_dir: str, version: SozuVersion) -> tuple[float, float, float]:
    """Peak RSS (MB) of a fresh process running one sozud engine against the simulator serving
    ``socket_path`` (in this process), with an in-memory OpenSVC object: after its imports, and after three
    syncs (it then holds the live, shared and base states, its caches and the shards), and its RSS once they
    are done (what it keeps). Linux only."""
    root = _ROOT
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _NODE_ALONE,
        socket_path,
        shared_dir,
        str(version),
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the node process failed: {err.decode(errors='replace')[-2000:]}")
    before, after, kept = out.split()[-3:]
    return float(before), float(after), float(kept)


def parse_rss_alone(data: bytes, version: SozuVersion) -> tuple[float, float]:
    """Peak RSS (MB) of a fresh process after its imports and reading the file, and after parsing it: what a
    daemon holding this state costs, without this benchmark's other data in the same heap (Linux only)."""
    with tempfile.NamedTemporaryFile(suffix=".state") as f:
        f.write(data)
        f.flush()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(
            [sys.executable, "-c", _PARSE_ALONE, f.name, str(version)],
            check=True,
            capture_output=True,
            text=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": root},
        ).stdout.split()
    return float(out[0]), float(out[1])


def _is_read(kind: str) -> bool:
    return kind.startswith(("query_", "list_", "count_")) or kind == "save_state"


async def bench_apply(n: int, target: Target, rows: list[Row]) -> None:
    state = generate_state(n, target.version)
    results: dict[str, tuple[float, int]] = {}
    # Both modes read the live state the same way (SaveState when a shared directory is known), so the
    # ratio measures how the plan is sent: one request per step, or LoadState chunks.
    modes = [("one by one", False)]
    if target.shared_dir is not None:
        modes.append(("batch (LoadState)", True))
    for label, batch in modes:
        ch, _processed = await target.open()
        try:
            t0 = time.perf_counter()
            report = await apply_plan(
                ch,
                state,
                shared_dir=target.shared_dir,
                shared_dir_sozu_path=target.shared_dir_sozu_path,
                force=True,
                batch_threshold=200 if batch else 10**12,
            )
            t = time.perf_counter() - t0
            assert report.converged
            results[label] = (t, report.requests_sent)
        finally:
            await target.close(ch)
    base_t, base_n = results["one by one"]
    for label, (t, count) in results.items():
        rows.append(
            Row(
                f"apply to empty sozu, {label}",
                n,
                f"{ms(t)} ({count} requests)",
                f"one by one {ms(base_t)} ({base_n})",
                ratio(t, base_t),
            )
        )


def print_table(rows: list[Row]) -> None:
    heads = ("measure", "objects", "value", "baseline (same run)", "ratio")
    table = [heads] + [(r.what, str(r.size), r.value, r.baseline, r.ratio) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(heads))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


async def main_async(args: argparse.Namespace) -> None:
    configure_logging("error", json=True)  # log lines to stderr, errors only: stdout is the table
    version = SozuVersion.parse(args.version)
    target = Target(args, version)
    rows: list[Row] = []
    try:
        for n in [int(s) for s in args.sizes.split(",") if s]:
            print(f"# size {n} ...", file=sys.stderr)
            await bench_size(n, target, rows)
        for n in [int(s) for s in args.apply_sizes.split(",") if s]:
            print(f"# apply {n} ...", file=sys.stderr)
            await bench_apply(n, target, rows)
    finally:
        target.cleanup()
    print(f"sozud state bench, sozu {version}, {'socket ' + args.socket if args.socket else 'simulator'}")
    print_table(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", default="1000,10000,100000", help="state sizes (objects), comma-separated")
    ap.add_argument("--apply-sizes", default="1000,10000", help="apply sizes (objects), comma-separated")
    ap.add_argument(
        "--max-query-read",
        type=int,
        default=20000,
        help="simulator only: largest size whose live read by queries is run (the simulator is O(N^2) there)",
    )
    ap.add_argument("--version", default="2.1.0", help="sozu version to simulate (default 2.1.0)")
    ap.add_argument("--socket", help="a real sozu command socket (default: the simulator)")
    ap.add_argument("--shared-dir", help="with --socket: directory shared with sozu's main process")
    ap.add_argument("--shared-dir-sozu-path", help="with --socket: the shared directory as sozu sees it")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
