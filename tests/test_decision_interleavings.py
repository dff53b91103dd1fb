"""``decide`` under random interleavings of three nodes (hypothesis), without the engine.

A small model of the cluster, with ``decide`` as the only code under test:

- **the key** is a list of versions (the value of the shared key after each push); version 0 is "no
  shared state". Each version records the version its writer read (``parent``, None for a bootstrap),
  as the engine's push ids and ancestors do.
- **a node** has a live state (its sozu), a view of the key (the version it reads: replication lags, so
  it may be older than the newest), a base (the version it last applied without pushing, or none) and the
  versions its live held (``known``: its base moves and its own pushes).
- **operations**: an operator adds an object (a fresh key), changes one (a fresh value) or removes one on
  a node's live; a node syncs; replication catches a node's view up; a node loses its base (first start:
  base and ``known`` forgotten). With ``replication="immediate"`` every node reads the newest version.
- **a sync** of node n: ``decide(live, shared=the version n sees, base, complete)``; then live :=
  desired; when ``push``, desired is appended as a new version (parent: the version n read) and n's view
  moves to it; otherwise, when live now equals shared, n's base moves to the version it read.

The merge base is not ``decide``'s job (``SyncEngine._merge_base`` picks it); the model's rule is the
engine's, simplified: the newest version in the read version's ancestry (itself, its parent, ...) that
this node's live held, complete; none of them but a base: that base, ``complete=False`` (shared does not
descend from anything this node knows: additions only); no base either: None (a union).

One object ("anchor") is on every node from the start and never touched, so no state is ever empty
(the engine refuses to push one). After the operations, a quiescent phase: every view catches up and
every node syncs, round after round, until a round changes nothing (at most ``SETTLE_ROUNDS``).

Properties (``_check``): convergence; no lost addition or change; a single writer's last value wins
and a removal sticks (both when no push overwrote a version its writer had not read, see there).
``SOZUD_DECISION_EXAMPLES`` sets the number of examples (default 500).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sozud.decision import Branch, decide
from sozud.proto import command_pb2 as pb
from sozud.state.model import ConfigState, ObjKey
from sozud.versions import SozuVersion

V2 = SozuVersion(2, 1, 0)
NODES = 3
SETTLE_ROUNDS = 8
EXAMPLES = int(os.environ.get("SOZUD_DECISION_EXAMPLES", "500"))
ANCHOR: ObjKey = ("cluster", "anchor")


def obj(name: str, value: str) -> pb.Cluster:
    """An object: its key is its name; ``value`` makes its content (and content digest) differ."""
    return pb.Cluster(
        cluster_id=name, sticky_session=False, https_redirect=False, load_balancing=pb.ROUND_ROBIN, answer_503=value
    )


@dataclass(frozen=True)
class Version:
    state: ConfigState | None  # None: no shared state yet
    parent: int | None  # the version its writer read; None: no ancestry (bootstrap, or version 0)
    writer: int


@dataclass
class Node:
    live: ConfigState
    view: int = 0
    base: int | None = None
    known: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Event:
    """An operator's edit of one node's live: ``value`` None is a removal."""

    t: int
    node: int
    kind: str  # "add" | "change" | "remove"
    key: ObjKey
    value: pb.Cluster | None


@dataclass(frozen=True)
class Step:
    """One sync: what ``decide`` was given and chose."""

    t: int
    node: int
    branch: Branch
    complete: bool
    live: ConfigState  # as it was before the step
    shared: ConfigState | None  # the version the node read
    conflicts: frozenset[ObjKey]  # keys both sides changed differently (settled by the documented rule)
    pushed: bool
    overwrote: bool  # the push replaced a version its writer had not read (a lost update)


@dataclass
class Model:
    nodes: list[Node]
    immediate: bool
    versions: list[Version] = field(default_factory=lambda: [Version(None, None, -1)])
    events: list[Event] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    counter: int = 0

    @property
    def newest(self) -> int:
        return len(self.versions) - 1

    def ancestry(self, i: int) -> list[int]:
        out: list[int] = []
        j: int | None = i
        while j is not None and j > 0:
            out.append(j)
            j = self.versions[j].parent
        return out

    def merge_base(self, node: Node) -> tuple[ConfigState | None, bool]:
        for i in self.ancestry(node.view):
            if i in node.known:
                return self.versions[i].state, True
        if node.base is not None:
            return self.versions[node.base].state, False
        return None, True

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def edit(self, t: int, n: int, kind: str, pick: int) -> None:
        live = self.nodes[n].live
        if kind == "add":
            name = self.fresh("op")
            key, value = ("cluster", name), obj(name, "v0")
        else:
            keys = sorted(k for k in live if k != ANCHOR)
            if not keys:
                return
            key = keys[pick % len(keys)]
            value = obj(key[1], self.fresh("v")) if kind == "change" else None
        if value is None:
            del live[key]
        else:
            live[key] = value
        self.events.append(Event(t, n, kind, key, value))

    def sync(self, t: int, n: int) -> tuple[bool, bool]:
        """One sync of node ``n``; returns (pushed, live changed)."""
        node = self.nodes[n]
        if self.immediate:
            node.view = self.newest
        read = node.view
        shared = self.versions[read].state
        base, complete = self.merge_base(node) if shared is not None else (None, True)
        live = node.live.copy()
        d = decide(live=node.live, shared=shared, base=base, complete=complete)
        changed = not d.desired.same_as(node.live)
        node.live = d.desired.copy()
        overwrote = d.push and read != self.newest
        if d.push:
            self.versions.append(Version(d.desired.copy(), None if shared is None else read, n))
            node.view = self.newest
            node.known.add(node.view)
        elif shared is not None and node.live == shared:
            node.base = read
            node.known.add(read)
        self.steps.append(
            Step(t, n, d.branch, complete, live, shared, frozenset(c.key for c in d.conflicts), d.push, overwrote)
        )
        return d.push, changed

    def settle(self, t: int) -> int:
        """Catch every view up and sync every node until a round changes nothing; returns the rounds used."""
        for rounds in range(1, SETTLE_ROUNDS + 1):
            moved = False
            for n in range(NODES):
                self.nodes[n].view = self.newest
                pushed, changed = self.sync(t + rounds, n)
                moved = moved or pushed or changed
            if not moved:
                return rounds
        raise AssertionError(f"the nodes did not settle in {SETTLE_ROUNDS} rounds")


OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "change", "remove", "sync", "sync", "sync", "replicate", "lose_base"]),
        st.integers(0, NODES - 1),
        st.integers(0, 20),
    ),
    min_size=10,
    max_size=60,
)
# some objects every node may start with, each with one of three values (a union conflict when two differ)
INITIAL = st.lists(
    st.dictionaries(st.sampled_from(["i0", "i1", "i2", "i3"]), st.sampled_from(["a", "b", "c"]), max_size=3),
    min_size=NODES,
    max_size=NODES,
)


def run(initial: list[dict[str, str]], ops: list[tuple[str, int, int]], immediate: bool) -> Model:
    nodes = []
    for n in range(NODES):
        live = ConfigState(V2)
        live[ANCHOR] = obj("anchor", "")
        for name, value in initial[n].items():
            live[("cluster", name)] = obj(name, value)
        nodes.append(Node(live))
    m = Model(nodes, immediate)
    for n in range(NODES):
        for key, value in nodes[n].live.items():
            if key != ANCHOR:
                assert isinstance(value, pb.Cluster)
                m.events.append(Event(0, n, "add", key, value))
    for t, (kind, n, pick) in enumerate(ops, start=1):
        if kind in ("add", "change", "remove"):
            m.edit(t, n, kind, pick)
        elif kind == "sync":
            m.sync(t, n)
        elif kind == "replicate":
            nodes[n].view = m.newest
        elif kind == "lose_base":
            nodes[n].base = None
            nodes[n].known.clear()
    m.settle(len(ops) + 1)
    return m


def _check(m: Model) -> None:
    final = m.versions[-1].state
    assert final is not None

    # 1. Convergence: every node's live is the newest shared state (and the last round changed nothing).
    for n, node in enumerate(m.nodes):
        assert node.live == final, f"node {n} did not converge: {sorted(node.live)} vs {sorted(final)}"

    by_key: dict[ObjKey, list[Event]] = {}
    for e in m.events:
        by_key.setdefault(e.key, []).append(e)

    # 2. No lost addition, no lost non-conflicting change: an object whose last operator edit (on any
    # node) added or changed it is present, unless a sync after that edit reported a conflict on it
    # (``_conflicted``: the edit met another value, the documented rule settled it, and the value kept
    # may then meet a removal it no longer beats). An addition is a fresh key: it never conflicts, so
    # no addition is ever lost. Why: that edit left the object in its node's live; a merge drops an object
    # only when one side removed it and the other kept the merge base's value, a change that meets a
    # removal is a conflict it wins, and an additions-only or union merge drops nothing. Holds with lost
    # updates too: a push that overwrote one it never read lacks nothing its writer removed, and the
    # overwritten node's changes are merged again against an older merge base.
    for key, events in by_key.items():
        last = events[-1]
        if last.kind != "remove" and not _conflicted(m, key, last):
            assert key in final, f"lost: {key[1]} ({last.kind} on node {last.node} at step {last.t})"

    # The next two hold when no push overwrote a version its writer had not read: then versions form a
    # chain, every node's merge base is the last version its live held (live = that version + its
    # operator's edits since) and every three-way merge sees exactly both sides' changes. With lost
    # updates the engine's lineage (one parent per push) can pick an older merge base: the overwritten
    # node's changes then come back as additions, which is the documented price of a lost update.
    if any(s.overwrote for s in m.steps):
        event("a push overwrote a version its writer had not read")
        return

    # 3. A single writer's last value wins: an object every edit of which (its initial presence included)
    # was made on one node ends as that node's operator left it (absent after a removal), unless, after
    # that last edit, a union sync held another value of it (``_union_met``) or a sync reported a conflict
    # on it (``_conflicted``): a node without a base keeps every object and settles two values by digest
    # (documented), and the value it pushed back conflicts with the writer's next change. Why: no other
    # node's operator changes it, so in every three-way merge only the writer's side changes it.
    for key, events in by_key.items():
        last = events[-1]
        if len({e.node for e in events}) > 1 or _union_met(m, key, last) or _conflicted(m, key, last):
            continue
        event(f"a single writer's last {last.kind} checked")
        assert final.get(key) == last.value, f"{key[1]}: node {last.node}'s last {last.kind} lost"

    # 4. A removal sticks: an object that never had more than one value (added once, never changed),
    # removed by an operator on node n whose next sync was a three-way merge (n had a base), is absent
    # in the end unless, after that removal, some node without a base (a union sync) held it in its live
    # (it never saw the object go: the documented price of a lost base). Why: n's merge base held the
    # object (it reached n's live through it), so n's next sync removes it and pushes the removal; every
    # other node's merge base holds it with the same value and its live does not change it, so it reads
    # a removal it applies; only a union keeps every object of its live.
    for key, events in by_key.items():
        if any(e.kind == "change" for e in events) or len({e.value.SerializeToString() for e in events if e.value}) > 1:
            continue
        for r in (e for e in events if e.kind == "remove"):
            after = [s for s in m.steps if s.t > r.t]
            first = next((s for s in after if s.node == r.node), None)
            if first is None or first.branch is not Branch.MERGE:
                continue
            if any(s.branch is Branch.UNION and key in s.live for s in after):
                continue
            event("a removal checked")
            assert key not in final, f"{key[1]}: removed on node {r.node} at step {r.t}, resurrected"


def _union_met(m: Model, key: ObjKey, edit: Event) -> bool:
    """Whether a union sync after ``edit`` held ``key``, on either side (live or the shared state it read),
    with a value other than the edit left (after a removal: with any value)."""
    for step in m.steps:
        if step.t > edit.t and step.branch is Branch.UNION:
            for side in (step.live, step.shared):
                if side is not None and key in side and side[key] != edit.value:
                    return True
    return False


def _conflicted(m: Model, key: ObjKey, edit: Event) -> bool:
    """Whether a sync after ``edit`` reported a conflict on ``key``."""
    return any(step.t > edit.t and key in step.conflicts for step in m.steps)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=INITIAL, ops=OPS, immediate=st.booleans())
def test_three_nodes_converge_and_lose_no_change(
    initial: list[dict[str, str]], ops: list[tuple[str, int, int]], immediate: bool
) -> None:
    m = run(initial, ops, immediate)
    for b in sorted({(s.branch.value, s.complete) for s in m.steps if s.t <= len(ops)}):
        event(f"branch {b[0]}" + ("" if b[1] else ", additions only"))
    _check(m)
