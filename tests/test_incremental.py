"""Incremental steps (issue 10): after a settled step, a step costs what changed, and gives exactly
what the full path gives.

Two worlds run the same random operations: in one the engines take the incremental path (and, with
``verify_incremental``, also compute the full decision at every such step and count any disagreement),
in the other every step is a full one. Each world is two nodes, each a simulated sozu 2.1.0 behind the
real adapter, sharing one OpenSVC object in the sharded layout. After every sync the two worlds must
have sent the same configuration requests to the same sozu, and hold the same live and shared states.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sozud._om.memory import MemoryTransport
from sozud.adapters import SozuAdapter
from sozud.layout import OpenSVCShared
from sozud.om_api import OMClient, OMSettings
from sozud.persist import BaseStore
from sozud.proto import command_pb2 as pb
from sozud.serde import request_kind
from sozud.socket_proto import SozuChannel
from sozud.state.codec import MAX_STATE_BYTES, parse_state_file, write_state_file
from sozud.state.model import ConfigState
from sozud.sync import EngineSettings, SyncEngine
from sozud.sync_model import SharedMeta
from sozud.testing import builders as build
from sozud.testing.fake_sozu import FakeSozu
from sozud.versions import SozuVersion

OBJ = "igw/sec/sozu"
V2 = SozuVersion(2, 1, 0)
LISTENER = "127.0.0.1:18080"
CLUSTERS = 12
READS = {"count_requests", "save_state", "query_clusters_hashes", "query_cluster_by_id", "list_listeners"}


class Node:
    def __init__(self, root: Path, name: str, transport: MemoryTransport, *, incremental: bool) -> None:
        d = root / name
        d.mkdir(parents=True)
        self.sozu = FakeSozu(str(d / "s.sock"), str(V2))
        self.channel = SozuChannel(str(d / "s.sock"), version=V2, request_timeout_s=30.0)
        self.adapter = SozuAdapter(self.channel, shared_dir=str(d))
        self.adapter.keep_read_after_apply = incremental
        self.shared = OpenSVCShared(
            OMClient(transport, OMSettings(retry_attempts=1, request_timeout_s=30.0)),
            OBJ,
            "state.json",
            "state.json.meta",
            max_state_bytes=MAX_STATE_BYTES,
        )
        settings = EngineSettings(
            node=name,
            object=OBJ,
            max_removal_ratio=1.0,
            incremental=incremental,
            verify_incremental=incremental,
        )
        self.engine = SyncEngine(self.adapter, self.shared, BaseStore(d / "state"), settings)
        self.seen = 0  # requests of sozu already compared

    def mutations(self) -> list[bytes]:
        """Configuration requests sozu received since the last call (reads left out: the incremental path
        reads less, which is the point)."""
        new = self.sozu.requests[self.seen :]
        self.seen = len(self.sozu.requests)
        return [r.SerializeToString(deterministic=True) for r in new if request_kind(r) not in READS]


@asynccontextmanager
async def world(incremental: bool) -> AsyncIterator[list[Node]]:
    root = Path(tempfile.mkdtemp(prefix="szinc"))
    transport = MemoryTransport(carries_text=True)
    transport.create_object(OBJ)
    nodes = [Node(root, name, transport, incremental=incremental) for name in ("a", "b")]
    data = write_state_file(build.fleet_state(CLUSTERS, listener=LISTENER))
    for n in nodes:
        n.sozu.state.load_state_file(data, source="test")
        await n.sozu.start()
    try:
        for n in (nodes[0], nodes[1], nodes[0], nodes[1]):
            await n.engine.sync_once("setup")
        for n in nodes:
            n.mutations()
        yield nodes
    finally:
        for n in nodes:
            await n.channel.aclose()
            await n.sozu.stop()


def _address(i: int) -> str:
    return f"10.0.{i // 256 % 256}.{i % 256}:8000"


def _remove(cid: str, b: pb.AddBackend) -> pb.Request:
    return pb.Request(remove_backend=pb.RemoveBackend(cluster_id=cid, backend_id=b.backend_id, address=b.address))


def operator(sozu: FakeSozu, op: tuple[str, int, int]) -> None:
    """An operator's request on one node's sozu (refused requests are part of the game)."""
    kind, i, arg = op
    cid = f"app-{i:06d}" if i < CLUSTERS else f"new-{i:06d}"
    reqs: list[pb.Request] = []
    if kind == "weight":
        for b in [b for b in sozu.state.backends.get(cid, [])]:
            reqs.append(
                pb.Request(remove_backend=pb.RemoveBackend(cluster_id=cid, backend_id=b.backend_id, address=b.address))
            )
            reqs.append(pb.Request(add_backend=build.backend(cid, b.backend_id, _address(i), weight=arg)))
    elif kind == "add":
        reqs.append(pb.Request(add_cluster=build.cluster(cid)))
        reqs.append(pb.Request(add_backend=build.backend(cid, f"{cid}-{arg}", _address(i + arg))))
        reqs.append(pb.Request(add_http_frontend=build.http_frontend(cid, LISTENER, f"{cid}-{arg}.example.com")))
    elif kind == "remove_backend":
        for b in list(sozu.state.backends.get(cid, []))[:1]:
            reqs.append(
                pb.Request(remove_backend=pb.RemoveBackend(cluster_id=cid, backend_id=b.backend_id, address=b.address))
            )
    elif kind == "remove_cluster":
        reqs.append(pb.Request(remove_cluster=cid))
    for r in reqs:
        sozu.state.dispatch(r)


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("op"),
            st.integers(0, 1),
            st.tuples(
                st.sampled_from(["weight", "add", "remove_backend", "remove_cluster"]),
                st.integers(0, CLUSTERS + 3),
                st.integers(1, 3),
            ),
        ),
        st.tuples(st.just("sync"), st.integers(0, 1), st.just(("", 0, 0))),
    ),
    min_size=1,
    max_size=14,
)


def _live(n: Node) -> ConfigState:
    return parse_state_file(n.sozu.state.generate_state_file(), V2, source="live", allow_empty=True)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
async def test_the_incremental_path_sends_and_holds_what_the_full_path_does(
    ops: list[tuple[str, int, tuple[str, int, int]]],
) -> None:
    async with world(True) as inc, world(False) as full:
        for kind, n, op in [*ops, ("sync", 0, ("", 0, 0)), ("sync", 1, ("", 0, 0)), ("sync", 0, ("", 0, 0))]:
            if kind == "op":
                operator(inc[n].sozu, op)
                operator(full[n].sozu, op)
                continue
            ri = await inc[n].engine.sync_once("test")
            rf = await full[n].engine.sync_once("test")
            assert (ri.outcome, ri.pushed, ri.drift) == (rf.outcome, rf.pushed, rf.drift)
            for a, b in zip(inc, full, strict=True):
                assert a.mutations() == b.mutations(), f"node {a.engine.settings.node}: other requests"
        for a, b in zip(inc, full, strict=True):
            assert _live(a) == _live(b)
            assert a.engine.incremental_disagreements == 0
        assert full[0].engine.incremental_steps == 0


async def test_a_remote_change_takes_the_incremental_path_and_sends_one_request() -> None:
    async with world(True) as (a, b):
        for n in (a, b):
            n.engine.settings.verify_incremental = False
        before = (a.engine.incremental_steps, a.engine._parts.full_parses)
        operator(b.sozu, ("weight", 3, 7))
        await b.engine.sync_once("test")  # b reads its change and pushes it
        mark = len(a.sozu.requests)
        report = await a.engine.sync_once("test")
        assert report.requests_sent == 1 and a.mutations() != []
        assert a.engine.incremental_steps == before[0] + 1
        assert a.engine._parts.full_parses == before[1], "only the changed shards were parsed"
        assert _live(a) == _live(b)
        reads = [request_kind(r) for r in a.sozu.requests[mark:]]
        assert "save_state" not in reads, f"no full live read around an incremental step: {reads}"


async def test_the_periodic_resync_reads_sozu_in_full_and_counts_what_the_probe_missed() -> None:
    """A change the request counters do not show (here: made behind the simulator's back) is invisible to
    incremental steps; the periodic resync reads sozu in full, counts the stale read, and syncs it."""
    async with world(True) as (a, b):
        for n in (a, b):
            n.engine.settings.verify_incremental = False
        cid = "app-000004"
        hidden = build.backend(cid, f"{cid}-0", _address(4), weight=42)
        a.sozu.state.backends[cid] = [hidden]  # no request, no counter: the probe cannot see it
        operator(b.sozu, ("weight", 3, 7))
        await b.engine.sync_once("test")
        report = await a.engine.sync_once("opensvc_change")
        assert report.incremental and not report.pushed
        assert a.engine.incremental_disagreements == 0
        report = await a.engine.sync_once("opensvc_change,periodic_resync")
        assert not report.incremental and report.incremental_disagreed and report.pushed
        assert a.engine.incremental_disagreements == 1
        await b.engine.sync_once("test")
        weights = [x.load_balancing_parameters.weight for x in b.sozu.state.backends[cid]]
        assert weights == [42], "the change reached the other node"


async def test_with_incremental_steps_off_the_periodic_resync_still_reads_sozu_in_full() -> None:
    """With incremental steps off (`incremental = false`): every step is full, and the periodic resync does not
    trust the probe either."""
    async with world(False) as (a, b):
        cid = "app-000004"
        hidden = build.backend(cid, f"{cid}-0", _address(4), weight=42)
        a.sozu.state.backends[cid] = [hidden]  # no request, no counter: the probe cannot see it
        report = await a.engine.sync_once("opensvc_change")
        assert not report.pushed, "the cached read, vouched for by the probe, was used"
        report = await a.engine.sync_once("periodic_resync")
        assert report.incremental_disagreed and report.pushed
        await b.engine.sync_once("test")
        weights = [x.load_balancing_parameters.weight for x in b.sozu.state.backends[cid]]
        assert weights == [42], "the change reached the other node"


async def test_a_push_names_its_parent_by_the_digest_the_manifest_vouched_for_without_computing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A local change on a settled node: the push's parent is the shared state it read, whose digest the
    metadata gave (the layout checked every shard against the manifest). Only the new state's digest is
    computed: one O(state) pass, not two."""
    async with world(True) as (a, b):
        data, meta_bytes = await b.shared.read()
        assert data is not None and data.vouched and meta_bytes is not None
        parent_digest = msgspec.json.decode(meta_bytes, type=SharedMeta).digest
        operator(b.sozu, ("weight", 3, 7))
        computed: list[int] = []
        real = ConfigState.digest

        def counting(self: ConfigState) -> str:
            computed.append(len(self))
            return real(self)

        monkeypatch.setattr(ConfigState, "digest", counting)
        report = await b.engine.sync_once("sozu_change")
        assert report.pushed
        assert len(computed) == 1, f"{len(computed)} digests computed in one push step"
        _, meta_bytes = await b.shared.read()
        assert meta_bytes is not None
        assert msgspec.json.decode(meta_bytes, type=SharedMeta).parent == parent_digest
        monkeypatch.undo()
        await a.engine.sync_once("opensvc_change")  # the lineage still reads as a child of what a holds
        assert a.engine.incremental_disagreements == 0


async def test_reading_back_its_own_push_is_an_incremental_step_that_moves_the_base() -> None:
    """A local change costs one full step (it reads, merges and pushes the whole state); the next step, which
    reads that push back, is incremental, decides what the full path decides (checked by
    ``verify_incremental``), sends and pushes nothing, and moves the base: the step after is settled."""
    async with world(True) as (a, b):
        operator(b.sozu, ("weight", 3, 7))
        pushed = await b.engine.sync_once("sozu_change")
        assert pushed.pushed and not pushed.incremental
        b.mutations()
        echo = await b.engine.sync_once("opensvc_change")
        assert echo.incremental and not echo.pushed and echo.requests_sent == 0
        assert b.engine.incremental_disagreements == 0
        base = b.engine.base.load(V2)
        data, _ = await b.shared.read()
        assert base is not None and data is not None
        assert base[0].same_as(parse_state_file(data.assembled, V2, source="shared"))
        # settled on it: a remote change is incremental again on both nodes
        await a.engine.sync_once("opensvc_change")
        operator(a.sozu, ("weight", 5, 9))
        await a.engine.sync_once("sozu_change")
        report = await b.engine.sync_once("opensvc_change")
        assert report.incremental and report.requests_sent == 1 and b.engine.incremental_disagreements == 0


async def test_an_incremental_step_copies_no_whole_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """What keeps a remote change O(change) on the receiving node: the parse's new shared state, the live
    state predicted after the apply and the states between are copies that share one mapping
    (``ConfigState`` is copy-on-write), and nothing on the incremental path reads a whole state, which would
    fold a copy's changes into a mapping of its own (an O(state) copy)."""
    async with world(True) as (a, b):
        for n in (a, b):
            n.engine.settings.verify_incremental = False  # the check computes the full decision: O(state)
        operator(b.sozu, ("weight", 3, 7))
        await b.engine.sync_once("test")
        folds: list[int] = []
        real = ConfigState._fold

        def counting(self: ConfigState) -> None:
            folds.append(len(self))
            real(self)

        monkeypatch.setattr(ConfigState, "_fold", counting)
        report = await a.engine.sync_once("opensvc_change")
        assert report.incremental and report.requests_sent == 1
        assert folds == [], f"{len(folds)} whole-mapping copies in an incremental step"
        monkeypatch.undo()
        assert _live(a) == _live(b)


async def test_a_node_holds_one_value_per_object_for_its_live_and_shared_states() -> None:
    """The shared state's parts are parsed with the live reads' record cache as peer: once a node is in sync,
    its live state (the adapter's read) and its shared state hold the same value objects (bytes)."""
    async with world(True) as (a, _b):
        live = await a.adapter.read_live(fresh=True)
        await a.engine.sync_once("test")  # nothing changed: the parts parsed before are kept
        shared = a.engine._parts._state
        assert shared is not None and shared == live
        assert all(shared.raw(k) is live.raw(k) for k in live)
