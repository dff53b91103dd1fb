"""The sync engine's decisions, with in-memory ports (no sockets): bootstrap, echo suppression, merge,
base movement, truncated/unparsable/mixed-family shared states, reconnect repair, safety valves."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from conftest import FIXTURES

from sozud.errors import SharedInFlightError, StateParseError, UnsafePlanError, VersionMismatchError
from sozud.persist import BaseMeta, BaseStore
from sozud.proto import command_pb2 as pb
from sozud.state.codec import parse_state_file, write_state_file
from sozud.state.model import ConfigState, listener_key, value_digest
from sozud.sync import ApplyOutcome, EngineSettings, SharedData, SharedMeta, SyncEngine
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
        self.stale_reads = 0
        self.applies = 0
        self.version = V2
        self.records = None  # no record cache: the shared state is parsed on its own

    async def read_live(self, *, fresh: bool = False) -> ConfigState:
        return self.live.copy()

    @property
    def live_version(self) -> int:
        # equal for equal live states, whoever changed them (tests edit ``live`` directly)
        return int(self.live.digest()[:15], 16)

    def hides(self, key: object, value: object) -> bool:
        return False

    @property
    def sees_all(self) -> bool:
        return True

    async def apply(
        self, desired: ConfigState, *, force: bool, desired_is_complete: bool, scope: object = None
    ) -> ApplyOutcome:
        self.applies += 1
        removed = [k for k in self.live if k not in desired]
        if removed and not desired_is_complete and not force:
            raise UnsafePlanError("removal from an incomplete desired state")
        changed = sum(1 for k, v in desired.items() if self.live.get(k) != v) + len(removed)
        self.live = desired.copy()
        return ApplyOutcome(changed, {"mixed": changed}, "digest", self.live.copy())


class MemShared:
    """One OpenSVC key pair shared by every engine of a test (an instantly replicated store)."""

    def __init__(self) -> None:
        self.state: bytes | None = None
        self.meta: bytes | None = None
        self.writes = 0
        self.caveat = ""  # set by a test: the next reads' state is not the one its metadata describes

    async def read(self) -> tuple[SharedData | None, bytes | None]:
        return (None if self.state is None else SharedData.plain(self.state)), self.meta

    async def write(self, state: bytes, meta: bytes) -> None:
        self.state, self.meta = state, meta
        self.writes += 1


def publish(
    shared: MemShared,
    state: ConfigState,
    *,
    origin: str = "elsewhere",
    generation: int = 50,
    descends: bool = True,
) -> None:
    """Another node's complete write: the state and the metadata that matches it, derived from the key's
    current value (``descends``) or from nothing (a fresh bootstrap)."""
    current = msgspec.json.decode(shared.meta, type=SharedMeta) if shared.meta and descends else None
    data = write_state_file(state)
    shared.state = data
    shared.meta = msgspec.json.encode(
        SharedMeta(
            generation=generation,
            origin=origin,
            id=f"{origin}-{generation}",
            parent=current.digest if current is not None else "",
            ancestors=[current.id, *current.ancestors] if current is not None else [],
            digest=state.digest(),
            records=data.count(b"\0"),
            sozu_family=state.version.family.value,
            sozu_version=str(state.version),
            written_at=0.0,
        )
    )


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


async def test_no_base_applies_what_shared_adds(tmp_path: Path) -> None:
    shared = MemShared()
    shared.state = (FIXTURES / "sozu-2.1.0/states/02-mid.state").read_bytes()
    sozu = MemSozu(fixture_state("00-initial"))
    r = await engine(tmp_path, "b", sozu, shared).sync_once("startup")
    assert r.requests_sent > 0 and not r.pushed and r.in_sync
    assert sozu.live == fixture_state("02-mid")


async def test_first_start_is_a_union_and_removes_nothing(tmp_path: Path) -> None:
    """No base: live-only objects are kept and pushed, shared-only ones applied; nothing is removed."""
    shared = MemShared()
    theirs = fixture_state("01-populated")
    theirs.add("cluster", cluster("theirs"))
    shared.state = write_state_file(theirs)
    mine = fixture_state("01-populated")
    mine.add("cluster", cluster("mine"))
    mine.add("backend", backend("mine", "mine-0", "10.9.9.9:80"))
    sozu = MemSozu(mine.copy())
    e = engine(tmp_path, "a", sozu, shared)
    r = await e.sync_once("startup")
    union = fixture_state("01-populated")
    for k, v in (*theirs.items(), *mine.items()):
        union[k] = v
    assert sozu.live == union and shared_state(shared) == union
    assert r.pushed and not r.conflicts
    assert e.base.load(V2) is None  # our own push is not a base...
    r2 = await e.sync_once("opensvc_change")  # ...reading it back is
    loaded = e.base.load(V2)
    assert not r2.pushed and loaded is not None and loaded[0] == union


async def test_first_start_conflict_follows_the_documented_rule(tmp_path: Path) -> None:
    """The same key on both sides with different values: the greater content digest wins, on both nodes."""
    plain, sticky = cluster("c"), cluster("c", sticky=True)
    winner = plain if value_digest(plain) > value_digest(sticky) else sticky
    outcomes = []
    for mine, theirs in ((plain, sticky), (sticky, plain)):
        shared = MemShared()
        other = ConfigState(V2)
        other.add("cluster", theirs)
        shared.state = write_state_file(other)
        live = ConfigState(V2)
        live.add("cluster", mine)
        sozu = MemSozu(live)
        r = await engine(tmp_path / str(len(outcomes)), "a", sozu, shared).sync_once("startup")
        assert len(r.conflicts) == 1 and r.conflicts[0].rule == "greater digest"
        outcomes.append((sozu.live.get(("cluster", "c")), shared_state(shared).get(("cluster", "c"))))
    assert outcomes == [(winner, winner), (winner, winner)]


async def test_issue_8_sequence_concurrent_bootstrap_then_an_immediate_change(tmp_path: Path) -> None:
    """Both nodes bootstrap an empty key at once (B's push lands last), then the operator adds objects on
    A three seconds later: they must reach B and stay on A (the old engine let shared win and removed them,
    or the removal valve blocked A forever)."""
    start = ConfigState(V2)
    lst = build.http_listener("127.0.0.1:8080", version=V2)
    start[listener_key("http", lst)] = lst
    start.add("cluster", cluster("base"))
    start.add("backend", backend("base", "base-0", "10.0.0.1:80"))
    shared = MemShared()
    a_sozu, b_sozu = MemSozu(start.copy()), MemSozu(start.copy())
    b_sozu.live.add("cluster", cluster("only-b"))
    a = engine(tmp_path, "a", a_sozu, shared)
    b_view = MemShared()  # what B read: the key was still empty when B read it
    b = engine(tmp_path, "b", b_sozu, b_view)
    ra, rb = await a.sync_once("startup"), await b.sync_once("startup")
    assert ra.outcome == rb.outcome == "bootstrapped" and ra.generation == rb.generation == 1
    shared.state, shared.meta = b_view.state, b_view.meta  # B's generation-1 push overwrote A's
    b.shared = shared
    added = []
    for i in range(4):  # 16 objects, 80% of A's live state: the removal valve's territory
        cid = f"d-app-{i}"
        a_sozu.live.add("cluster", cluster(cid))
        for j in range(3):
            bk = backend(cid, f"{cid}-{j}", f"10.1.{i}.{j}:80")
            a_sozu.live.add("backend", bk)
        added.append(("cluster", cid))
    mine = a_sozu.live.copy()
    for _ in range(3):
        for e in (a, b):
            await e.sync_once("sozu_probe")
    assert a_sozu.live == b_sozu.live == shared_state(shared)
    assert all(k in a_sozu.live for k in mine), "an object the operator added on A was removed"
    assert ("cluster", "only-b") in a_sozu.live
    for e in (a, b):
        loaded = e.base.load(V2)
        assert loaded is not None and loaded[0] == shared_state(shared)


@pytest.mark.parametrize("damage", ["garbage", "digest_mismatch", "deleted"])
async def test_damaged_or_deleted_base_counts_as_none_union_not_removal(tmp_path: Path, damage: str) -> None:
    start = fixture_state("01-populated")
    shared = MemShared()
    sozu = MemSozu(start.copy())
    e = engine(tmp_path, "a", sozu, shared)
    await e.sync_once()
    await e.sync_once()
    assert e.base.load(V2) is not None
    # While sozud is down: the operator adds a cluster locally, another node removes a backend.
    sozu.live.add("cluster", cluster("while-down"))
    remote = shared_state(shared)
    removed_key = next(k for k, _ in remote.of_kind("backend"))
    del remote[removed_key]
    publish(shared, remote)
    parts = msgspec.json.decode(e.base.meta_path.read_bytes(), type=BaseMeta).parts
    assert parts, "the engine keeps its base as the shared state's parts"
    stored = e.base.dir / "base.parts" / parts[0]
    if damage == "garbage":
        stored.write_bytes(b"{not a state\0")
    elif damage == "digest_mismatch":
        stored.write_bytes(write_state_file(ConfigState(V2)))
    else:
        stored.unlink()
    restarted = engine(tmp_path, "a", sozu, shared)
    r = await restarted.sync_once("startup")
    assert ("cluster", "while-down") in sozu.live and ("cluster", "while-down") in shared_state(shared)
    # without a base, a removal made elsewhere is not known as one: nothing is removed
    assert removed_key in sozu.live and r.pushed
    assert (restarted.base.dir / "base.parts.damaged" / parts[0]).exists() == (damage != "deleted")
    await restarted.sync_once("opensvc_change")
    loaded = restarted.base.load(V2)
    assert loaded is not None and loaded[0] == sozu.live


async def test_local_change_reaches_a_peer_and_removals_too(tmp_path: Path) -> None:
    start = fixture_state("01-populated")
    shared = MemShared()
    a_sozu, b_sozu = MemSozu(start.copy()), MemSozu(start.copy())
    a, b = engine(tmp_path, "a", a_sozu, shared), engine(tmp_path, "b", b_sozu, shared)
    await a.sync_once()  # bootstrap
    await a.sync_once()
    await b.sync_once()  # no base: the union (equal anyway)
    # A adds a cluster and removes a backend.
    a_sozu.live.add("cluster", cluster("new"))
    removed_key = next(k for k, _ in a_sozu.live.of_kind("backend"))
    del a_sozu.live[removed_key]
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
    with pytest.raises(SharedInFlightError):  # first taken for a write in progress: nothing done
        await e.sync_once("opensvc_change")
    assert sozu.applies == 0 and shared.state == cut
    e.settings.mismatch_grace_s = 0.0  # (the grace period has passed)
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


async def test_a_state_and_metadata_from_different_writes_are_not_acted_on(tmp_path: Path) -> None:
    """A torn read (the state of an older write with the metadata of a newer one) would otherwise look
    like a complete state whose missing objects were removed: nothing is applied or pushed until the pair
    matches; the node's own objects are kept."""
    start = fixture_state("01-populated")
    shared = MemShared()
    sozu = MemSozu(start.copy())
    e = engine(tmp_path, "a", sozu, shared)
    await e.sync_once()
    await e.sync_once()  # base = start
    newer = start.copy()
    newer.add("cluster", cluster("newer"))
    publish(shared, newer, origin="b", generation=7)
    older_state = shared_state_of(start)  # an older, complete state without "newer", and one backend less
    older_state = older_state.copy()
    removed_key = next(k for k, _ in older_state.of_kind("backend"))
    del older_state[removed_key]
    shared.state = write_state_file(older_state)  # torn: meta says generation 7 with "newer"
    writes = shared.writes
    with pytest.raises(SharedInFlightError, match="do not match yet"):
        await e.sync_once("opensvc_change")
    assert sozu.live == start and sozu.applies == 0 and shared.writes == writes
    publish(shared, newer, origin="b", generation=7)  # the write completes
    await e.sync_once("opensvc_change")
    assert sozu.live == newer and removed_key in sozu.live


def shared_state_of(state: ConfigState) -> ConfigState:
    return parse_state_file(write_state_file(state), V2, source="copy")


class StaleView(MemShared):
    """A node's view of the key that still shows an older write (replication lag), writing through."""

    def __init__(self, real: MemShared) -> None:
        super().__init__()
        self.real = real
        self.state, self.meta = real.state, real.meta

    async def write(self, state: bytes, meta: bytes) -> None:
        await self.real.write(state, meta)
        self.state, self.meta = state, meta


async def test_a_push_that_overwrote_ours_does_not_remove_our_objects(tmp_path: Path) -> None:
    """Lost update: A pushes its objects and reads them back; B, still seeing the older key, pushes its own
    change derived from that older state and overwrites A's. A's objects are not "removed" by B (B never
    saw them): the merge uses the newest state both descend from, and every change survives."""
    start = fixture_state("01-populated")
    shared = MemShared()
    a_sozu, b_sozu = MemSozu(start.copy()), MemSozu(start.copy())
    a, b = engine(tmp_path, "a", a_sozu, shared), engine(tmp_path, "b", b_sozu, shared)
    for e in (a, a, b):
        await e.sync_once()  # bootstrap, then both have base = start
    b.shared = StaleView(shared)  # B's view stops here
    a_sozu.live.add("cluster", cluster("from-a"))
    removed_key = next(k for k, _ in a_sozu.live.of_kind("backend"))
    del a_sozu.live[removed_key]
    await a.sync_once("sozu_probe")  # pushes
    await a.sync_once("opensvc_change")  # reads it back: A's base now holds from-a
    b_sozu.live.add("cluster", cluster("from-b"))
    await b.sync_once("sozu_probe")  # pushes start + from-b over A's push
    assert ("cluster", "from-a") not in shared_state(shared)
    b.shared = shared
    for e in (a, b, a, b):
        await e.sync_once("opensvc_change")
    for st in (a_sozu.live, b_sozu.live, shared_state(shared)):
        assert ("cluster", "from-a") in st and ("cluster", "from-b") in st
        assert removed_key not in st, "A's removal was undone"
    assert a_sozu.live == b_sozu.live == shared_state(shared)


async def test_a_push_from_a_node_with_no_common_state_is_additions_only(tmp_path: Path) -> None:
    """The same overwrite when the two nodes share no known state (A's key was bootstrapped and then
    replaced by a node that never read it): nothing A holds is removed, and A's next push restores it."""
    start = fixture_state("01-populated")
    shared = MemShared()
    a_sozu = MemSozu(start.copy())
    a = engine(tmp_path, "a", a_sozu, shared)
    await a.sync_once()
    a_sozu.live.add("cluster", cluster("from-a"))
    await a.sync_once("sozu_probe")
    await a.sync_once("opensvc_change")  # base = start + from-a
    theirs = fixture_state("01-populated")
    theirs.add("cluster", cluster("theirs"))
    publish(shared, theirs, origin="b", generation=1, descends=False)  # a fresh bootstrap elsewhere
    r = await a.sync_once("opensvc_change")
    assert ("cluster", "from-a") in a_sozu.live and ("cluster", "theirs") in a_sozu.live
    assert r.pushed and ("cluster", "from-a") in shared_state(shared)


async def test_the_boot_state_file_follows_what_sozu_runs(tmp_path: Path) -> None:
    """sozu's saved_state: with the shared state sharded in OpenSVC, sozud keeps a plain file for it."""
    boot = tmp_path / "run" / "state.json"
    start = fixture_state("01-populated")
    shared = MemShared()
    sozu = MemSozu(start.copy())
    e = engine(tmp_path, "a", sozu, shared, boot_state_file=str(boot))
    await e.sync_once()
    assert parse_state_file(boot.read_bytes(), V2, source="boot") == start
    sozu.live.add("cluster", cluster("later"))
    await e.sync_once("sozu_probe")
    assert ("cluster", "later") in parse_state_file(boot.read_bytes(), V2, source="boot")
    mtime = boot.stat().st_mtime_ns
    await e.sync_once("opensvc_change")  # nothing changed: the file is not rewritten
    assert boot.stat().st_mtime_ns == mtime


class SharingSozu(MemSozu):
    """A port whose reads are its own state object (as the adapter's cached read is), and whose reads
    cannot see ``hidden`` clusters."""

    hidden: frozenset[str] = frozenset({"c2"})

    async def read_live(self, *, fresh: bool = False) -> ConfigState:
        return self.live

    def hides(self, key: object, value: object) -> bool:
        return isinstance(key, tuple) and key[0] == "cluster" and key[1] in self.hidden

    @property
    def sees_all(self) -> bool:
        return not self.hidden


async def test_what_a_read_cannot_see_is_added_to_a_copy_of_it_not_to_the_ports_read(tmp_path: Path) -> None:
    """The engine adds the merge base's view of what the read hides to its own copy: the port's read (the
    adapter's cached state, handed out without a copy) is never modified (issue 10)."""
    state = ConfigState(V2)
    for cid in ("c1", "c2"):
        state.add("cluster", build.cluster(cid))
    sozu, shared = SharingSozu(state.copy()), MemShared()
    publish(shared, state)
    e = engine(tmp_path, "a", sozu, shared)
    await e.sync_once("startup")  # takes shared as its base
    await e.sync_once("again")
    assert e.base.load(V2) is not None
    read = sozu.live = ConfigState(V2, {k: v for k, v in state.items() if k[1] != "c2"})
    report = await e.sync_once("hidden")
    assert sozu.live is read and ("cluster", "c2") not in read, "the port's read was modified"
    assert report.drift == 0 and not report.pushed
