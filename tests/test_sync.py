"""The sync engine's decisions, with in-memory ports (no sockets): bootstrap, echo suppression, merge,
base movement, truncated/unparsable/mixed-family shared states, reconnect repair, safety valves."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from conftest import FIXTURES

from sozud.errors import StateParseError, UnsafePlanError, VersionMismatchError
from sozud.persist import BaseStore
from sozud.proto import command_pb2 as pb
from sozud.state.codec import parse_state_file
from sozud.state.model import ConfigState
from sozud.sync import ApplyOutcome, EngineSettings, SharedMeta, SyncEngine
from sozud.testing import builders as build
from sozud.versions import SozuVersion

V2 = SozuVersion(2, 1, 0)


def fixture_state(name: str, version: str = "2.1.0") -> ConfigState:
    return parse_state_file((FIXTURES / f"sozu-{version}/states/{name}.state").read_bytes(), source=name)


def cluster(cid: str, *, sticky: bool = False) -> pb.Cluster:
    return build.cluster(cid, sticky=sticky)


def backend(cid: str, bid: str, addr: str) -> pb.AddBackend:
    return build.backend(cid, bid, addr)


class MemSozu:
    """A sozu that applies a desired state wholesale (the planner is tested elsewhere)."""

    def __init__(self, live: ConfigState) -> None:
        self.live = live
        self.restarts = 0
        self.applies = 0
        self.version = V2

    async def read_live(self) -> ConfigState:
        return self.live.copy()

    def hides(self, key: object, value: object) -> bool:
        return False

    async def apply(self, desired: ConfigState, *, force: bool, desired_is_complete: bool) -> ApplyOutcome:
        self.applies += 1
        removed = [k for k in self.live.objects if k not in desired.objects]
        if removed and not desired_is_complete and not force:
            raise UnsafePlanError("removal from an incomplete desired state")
        changed = sum(1 for k, v in desired.objects.items() if self.live.objects.get(k) != v) + len(removed)
        self.live = desired.copy()
        return ApplyOutcome(changed, {"mixed": changed}, "digest", self.live.copy())


class MemShared:
    """One OpenSVC key pair shared by every engine of a test (an instantly replicated store)."""

    def __init__(self) -> None:
        self.state: bytes | None = None
        self.meta: bytes | None = None
        self.writes = 0

    async def read(self) -> tuple[bytes | None, bytes | None]:
        return self.state, self.meta

    async def write(self, state: bytes, meta: bytes) -> None:
        self.state, self.meta = state, meta
        self.writes += 1


def engine(tmp_path: Path, name: str, sozu: MemSozu, shared: MemShared, **kw: object) -> SyncEngine:
    return SyncEngine(sozu, shared, BaseStore(tmp_path / name), EngineSettings(node=name, **kw))  # type: ignore[arg-type]


def shared_state(shared: MemShared) -> ConfigState:
    assert shared.state is not None
    return parse_state_file(shared.state, V2, source="shared")


async def test_bootstrap_then_echo_suppression(tmp_path: Path) -> None:
    live = fixture_state("01-populated")
    sozu, shared = MemSozu(live.copy()), MemShared()
    e = engine(tmp_path, "a", sozu, shared)
    r1 = await e.sync_once("startup")
    assert r1.outcome == "bootstrapped" and r1.pushed and sozu.applies == 0
    assert shared_state(shared) == live
    meta = msgspec.json.decode(shared.meta or b"", type=SharedMeta)
    assert (meta.origin, meta.generation, meta.records) == ("a", 1, shared.state.count(b"\0"))  # type: ignore[union-attr]
    # Our own push does not set the base...
    assert e.base.load(V2) is None
    # ...reading it back does, and causes neither a request nor a push.
    r2 = await e.sync_once("opensvc_change")
    assert (r2.requests_sent, r2.pushed, sozu.applies, shared.writes) == (0, False, 0, 1)
    loaded = e.base.load(V2)
    assert loaded is not None and loaded[0] == live
    r3 = await e.sync_once("sozu_probe")
    assert (r3.outcome, shared.writes, sozu.applies) == ("in_sync", 1, 0)


async def test_no_base_shared_wins_and_is_applied(tmp_path: Path) -> None:
    shared = MemShared()
    shared.state = (FIXTURES / "sozu-2.1.0/states/02-mid.state").read_bytes()
    sozu = MemSozu(fixture_state("00-initial"))
    r = await engine(tmp_path, "b", sozu, shared).sync_once("startup")
    assert r.requests_sent > 0 and not r.pushed and r.in_sync
    assert sozu.live == fixture_state("02-mid")


async def test_local_change_reaches_a_peer_and_removals_too(tmp_path: Path) -> None:
    start = fixture_state("01-populated")
    shared = MemShared()
    a_sozu, b_sozu = MemSozu(start.copy()), MemSozu(start.copy())
    a, b = engine(tmp_path, "a", a_sozu, shared), engine(tmp_path, "b", b_sozu, shared)
    await a.sync_once()  # bootstrap
    await a.sync_once()
    await b.sync_once()  # no base: shared wins (equal anyway)
    # A adds a cluster and removes a backend.
    a_sozu.live.add("cluster", cluster("new"))
    removed_key = next(k for k, _ in a_sozu.live.of_kind("backend"))
    del a_sozu.live.objects[removed_key]
    ra = await a.sync_once("sozu_probe")
    assert ra.pushed and ra.requests_sent == 0 and ra.local_changes == 2
    rb = await b.sync_once("opensvc_change")
    assert not rb.pushed and rb.remote_changes == 2
    assert b_sozu.live == a_sozu.live
    assert ("cluster", "new") in b_sozu.live and removed_key not in b_sozu.live


async def test_concurrent_non_conflicting_edits_both_survive(tmp_path: Path) -> None:
    start = fixture_state("01-populated")
    shared = MemShared()
    a_sozu, b_sozu = MemSozu(start.copy()), MemSozu(start.copy())
    a, b = engine(tmp_path, "a", a_sozu, shared), engine(tmp_path, "b", b_sozu, shared)
    for e in (a, a, b):
        await e.sync_once()
    a_sozu.live.add("cluster", cluster("from-a"))
    b_sozu.live.add("backend", backend("app1", "from-b", "10.1.1.1:80"))
    await a.sync_once()  # pushes base + from-a
    await b.sync_once()  # merges: keeps from-b, applies from-a, pushes both
    await a.sync_once()  # applies from-b
    for s in (a_sozu.live, b_sozu.live, shared_state(shared)):
        assert ("cluster", "from-a") in s
        assert ("backend", "app1", "from-b", "10.1.1.1:80") in s
    assert a_sozu.live == b_sozu.live == shared_state(shared)


async def test_conflict_is_resolved_identically_on_every_node(tmp_path: Path) -> None:
    start = fixture_state("01-populated")
    start.add("cluster", cluster("c"))
    results = []
    for order in (("a", "b"), ("b", "a")):
        shared = MemShared()
        sozus = {n: MemSozu(start.copy()) for n in "ab"}
        engines = {n: engine(tmp_path / "".join(order), n, sozus[n], shared) for n in "ab"}
        await engines["a"].sync_once()
        for n in "ab":
            await engines[n].sync_once()
        sozus["a"].live.add("cluster", cluster("c", sticky=True))
        changed = cluster("c")
        changed.https_redirect = True
        sozus["b"].live.add("cluster", changed)
        first, second = order
        await engines[first].sync_once()
        r = await engines[second].sync_once()
        assert len(r.conflicts) == 1 and r.conflicts[0].key == ("cluster", "c")
        await engines[first].sync_once()
        assert sozus["a"].live == sozus["b"].live == shared_state(shared)
        results.append(sozus["a"].live.get(("cluster", "c")))
    # whichever node pushed first, the same value wins
    assert results[0] == results[1]


async def test_truncated_shared_state_removes_nothing(tmp_path: Path) -> None:
    full = fixture_state("01-populated")
    shared = MemShared()
    sozu = MemSozu(full.copy())
    e = engine(tmp_path, "a", sozu, shared)
    await e.sync_once()
    await e.sync_once()  # base = full
    data = shared.state or b""
    cut = data[: data.index(b"\0", len(data) // 2) + 1]  # a prefix cut exactly at a record boundary
    shared.state = cut  # meta still promises all records
    r = await e.sync_once("opensvc_change")
    assert sozu.live == full, "a truncated shared state must not remove live objects"
    # the engine repairs the shared key from base + live (nothing was lost)
    assert r.pushed and shared_state(shared) == full


@pytest.mark.parametrize(
    "garbage", [b'{"id":"SAVE-0","content":{"request_type":{"ADD_CLUS', b"\xff\xfe\0", b"not json\n\0"]
)
async def test_unparsable_shared_is_never_applied(tmp_path: Path, garbage: bytes) -> None:
    live = fixture_state("01-populated")
    shared = MemShared()
    sozu = MemSozu(live.copy())
    e = engine(tmp_path, "a", sozu, shared)
    await e.sync_once()
    await e.sync_once()
    shared.state = garbage
    writes = shared.writes
    with pytest.raises(StateParseError) as info:
        await e.sync_once("opensvc_change")
    assert "opensvc igw/cfg/sozu key state.json" in str(info.value)
    assert sozu.live == live and sozu.applies == 0 and shared.writes == writes


async def test_empty_shared_is_bootstrapped_not_applied(tmp_path: Path) -> None:
    live = fixture_state("01-populated")
    shared = MemShared()
    sozu = MemSozu(live.copy())
    e = engine(tmp_path, "a", sozu, shared)
    await e.sync_once()
    await e.sync_once()
    shared.state = b""
    r = await e.sync_once("opensvc_change")
    assert sozu.live == live and sozu.applies == 0
    assert r.outcome == "bootstrapped" and shared_state(shared) == live


async def test_mixed_fleet_is_refused(tmp_path: Path) -> None:
    shared = MemShared()
    shared.state = (FIXTURES / "sozu-1.1.1/states/01-populated.state").read_bytes()
    shared.meta = msgspec.json.encode(
        SharedMeta(
            generation=4,
            origin="old-node",
            parent="",
            digest="x",
            records=35,
            sozu_family="1.x",
            sozu_version="1.1.1",
            written_at=0.0,
        )
    )
    sozu = MemSozu(fixture_state("01-populated"))
    with pytest.raises(VersionMismatchError, match=r"old-node.*mixed fleet"):
        await engine(tmp_path, "a", sozu, shared).sync_once()
    assert sozu.applies == 0


async def test_sozu_restarted_empty_is_repaired_from_shared(tmp_path: Path) -> None:
    full = fixture_state("01-populated")
    shared = MemShared()
    sozu = MemSozu(full.copy())
    e = engine(tmp_path, "b", sozu, shared)
    await e.sync_once()
    await e.sync_once()
    # sozu restarts from its TOML listeners only (the adapter sees its request counters reset)
    sozu.live = fixture_state("00-initial")
    sozu.restarts += 1
    writes = shared.writes
    r = await e.sync_once("sozu_restarted")
    assert sozu.live == full and shared.writes == writes and not r.pushed


async def test_lost_configuration_without_reconnect_is_not_pushed(tmp_path: Path) -> None:
    full = fixture_state("01-populated")
    shared = MemShared()
    sozu = MemSozu(full.copy())
    e = engine(tmp_path, "b", sozu, shared)
    await e.sync_once()
    await e.sync_once()
    sozu.live = fixture_state("00-initial")  # same epoch: looks like a local mass removal
    with pytest.raises(UnsafePlanError, match=r"max_removal_ratio"):
        await e.sync_once("sozu_probe")
    assert shared_state(shared) == full
    forced = engine(tmp_path, "b", sozu, shared, force=True)
    r = await forced.sync_once("manual")
    assert r.pushed and shared_state(shared) == fixture_state("00-initial")
