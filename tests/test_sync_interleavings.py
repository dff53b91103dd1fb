"""The sync engine under random interleavings of three nodes (hypothesis): operators add and remove
objects, nodes sync with views of the key that lag behind (a push can overwrite one its writer never read),
sozud restarts (in-memory history lost) and base files are lost. After the nodes settle, every node and the
shared key hold the same state, and no object that an operator added and nobody removed is missing."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sync import MemSozu

from sozud.persist import BaseStore
from sozud.state.codec import parse_state_file
from sozud.state.model import ConfigState, ObjKey
from sozud.sync import EngineSettings, SharedData, SyncEngine
from sozud.testing import builders as build
from sozud.versions import SozuVersion

V2 = SozuVersion(2, 1, 0)
NODES = 3


@dataclass
class Store:
    """The key's successive values; each node reads the one its view is at (replication lag)."""

    versions: list[tuple[bytes | None, bytes | None]] = field(default_factory=lambda: [(None, None)])
    view: list[int] = field(default_factory=lambda: [0] * NODES)


class View:
    caveat = ""

    def __init__(self, store: Store, node: int) -> None:
        self.store, self.node = store, node

    async def read(self) -> tuple[SharedData | None, bytes | None]:
        state, meta = self.store.versions[self.store.view[self.node]]
        return (None if state is None else SharedData.plain(state)), meta

    async def write(self, state: bytes, meta: bytes) -> None:
        self.store.versions.append((state, meta))
        self.store.view[self.node] = len(self.store.versions) - 1


def SETTINGS(n: int) -> EngineSettings:
    # the removal valve is tested elsewhere; here operators may remove most objects on purpose
    return EngineSettings(node=f"n{n}", max_removal_ratio=1.0)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, NODES - 1)),
        st.tuples(st.just("remove"), st.integers(0, NODES - 1), st.integers(0, 50)),
        st.tuples(st.just("sync"), st.integers(0, NODES - 1)),
        st.tuples(st.just("replicate"), st.integers(0, NODES - 1)),
        st.tuples(st.just("restart"), st.integers(0, NODES - 1)),
        st.tuples(st.just("lose_base"), st.integers(0, NODES - 1)),
    ),
    max_size=40,
)


@settings(
    max_examples=int(os.environ.get("SOZUD_INTERLEAVINGS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=OPS, initial=st.lists(st.integers(0, 2), min_size=NODES, max_size=NODES))
async def test_every_node_converges_and_no_addition_is_lost(ops: list[tuple[object, ...]], initial: list[int]) -> None:
    root = Path(tempfile.mkdtemp(prefix="szi"))
    store = Store()
    added: dict[ObjKey, int] = {}  # object -> the node whose operator added it
    removed: set[ObjKey] = set()
    sozus: list[MemSozu] = []
    for n in range(NODES):
        live = ConfigState(V2)
        live.add("cluster", build.cluster("everywhere"))  # never removed: no state is ever empty
        for i in range(initial[n]):  # some nodes start with objects of their own
            c = build.cluster(f"init-{n}-{i}")
            live.add("cluster", c)
            added[("cluster", c.cluster_id)] = n
        sozus.append(MemSozu(live))

    def new_engine(n: int) -> SyncEngine:
        return SyncEngine(sozus[n], View(store, n), BaseStore(root / str(n)), SETTINGS(n))  # type: ignore[arg-type]

    engines = [new_engine(n) for n in range(NODES)]
    counter = 0
    for op in ops:
        kind, n = op[0], int(op[1])  # type: ignore[call-overload]
        if kind == "add":
            counter += 1
            c = build.cluster(f"op-{n}-{counter}")
            sozus[n].live.add("cluster", c)
            added[("cluster", c.cluster_id)] = n
        elif kind == "remove":
            keys = sorted(k for k in sozus[n].live if k in added)
            if keys:
                k = keys[int(op[2]) % len(keys)]  # type: ignore[call-overload]
                del sozus[n].live[k]
                removed.add(k)
        elif kind == "sync":
            await engines[n].sync_once("probe")
        elif kind == "replicate":
            store.view[n] = len(store.versions) - 1
        elif kind == "restart":
            engines[n] = new_engine(n)
        elif kind == "lose_base":
            engines[n].base.clear()
            engines[n] = new_engine(n)

    # settle: every node sees the latest value and syncs, until nothing changes
    for _ in range(12):
        before = len(store.versions)
        for n in range(NODES):
            store.view[n] = len(store.versions) - 1
            await engines[n].sync_once("settle")
        if len(store.versions) == before:
            break
    state, _ = store.versions[-1]
    assert state is not None or all(len(s.live) == 0 for s in sozus)
    shared = parse_state_file(state, V2, source="shared") if state else ConfigState(V2)
    for n, s in enumerate(sozus):
        assert s.live == shared, f"node {n} did not converge"
    lost = sorted(k for k in added if k not in removed and k not in shared)
    assert not lost, f"additions lost: {lost}"
