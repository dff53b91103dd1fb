"""sozud.decision.decide, the pure sync decision: properties over random live, shared and base states."""

from __future__ import annotations

import os

from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sozud.decision import Branch, decide
from sozud.proto import command_pb2 as pb
from sozud.state.model import ConfigState, ObjKey, value_digest
from sozud.testing import builders as build
from sozud.versions import SozuVersion

V2 = SozuVersion(2, 1, 0)
# six clusters, each in one of two shapes: states differ by presence and by value
UNIVERSE = [(f"c{i}", sticky) for i in range(6) for sticky in (False, True)]


def states() -> st.SearchStrategy[ConfigState]:
    def build_state(picks: dict[int, bool]) -> ConfigState:
        s = ConfigState(V2)
        for i, sticky in picks.items():
            s.add("cluster", build.cluster(f"c{i}", sticky=sticky))
        return s

    return st.dictionaries(st.integers(0, 5), st.booleans()).map(build_state)


@settings(max_examples=300, deadline=None)
@given(live=states(), shared=states(), base=states(), complete=st.booleans(), restarted=st.booleans())
def test_decide_properties(
    live: ConfigState, shared: ConfigState, base: ConfigState, complete: bool, restarted: bool
) -> None:
    before = (live.copy(), shared.copy(), base.copy())
    d = decide(live=live, shared=shared, base=base, complete=complete, restarted=restarted)
    assert (live, shared, base) == before, "decide must not modify its inputs"
    assert d.push == (not d.desired.same_as(shared))
    if restarted:
        assert d.branch is Branch.SHARED_WINS and d.desired == shared and not d.push
    elif not complete:
        assert set(live) <= set(d.desired), "no removal from an incomplete shared state"
    if live == shared and not restarted:
        assert d.desired == live and not d.push, "a state already live and shared changes nothing"
    u = decide(live=live, shared=shared, base=None, complete=complete, restarted=restarted)
    assert u.branch is Branch.UNION
    assert set(live) | set(shared) == set(u.desired), "union: nothing removed"
    # the union resolves a key held differently on both sides the same way whichever side is live
    v = decide(live=shared, shared=live, base=None)
    assert v.desired == u.desired


def test_no_shared_state_bootstraps_and_an_empty_sozu_does_nothing() -> None:
    live = ConfigState(V2)
    assert decide(live=live, shared=None, base=None).branch is Branch.NOTHING
    live.add("cluster", build.cluster("c"))
    d = decide(live=live, shared=None, base=None)
    assert d.branch is Branch.BOOTSTRAP and d.push and d.desired == live


# --- properties of decide alone, against the rules of docs/sync.md ---------------------------------------
#
# States over five keys, each absent or one of three values (so sides often agree with the base, differ
# from it, or differ from each other). ``SOZUD_DECISION_EXAMPLES`` sets the number of examples.

EXAMPLES = int(os.environ.get("SOZUD_DECISION_EXAMPLES", "500"))
PROPS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _value(i: int, v: str) -> pb.Cluster:
    return pb.Cluster(
        cluster_id=f"k{i}", sticky_session=False, https_redirect=False, load_balancing=pb.ROUND_ROBIN, answer_503=v
    )


def small_states() -> st.SearchStrategy[ConfigState]:
    def build_state(picks: dict[int, str]) -> ConfigState:
        s = ConfigState(V2)
        for i, v in picks.items():
            s.add("cluster", _value(i, v))
        return s

    return st.dictionaries(st.integers(0, 4), st.sampled_from("abc")).map(build_state)


INPUTS = {
    "live": small_states(),
    "shared": st.none() | small_states(),
    "base": st.none() | small_states(),
    "complete": st.booleans(),
    "restarted": st.booleans(),
    "repair": st.booleans(),
}


def _snapshot(s: ConfigState | None) -> dict[ObjKey, bytes] | None:
    return None if s is None else {k: v.SerializeToString(deterministic=True) for k, v in s.items()}


def expected(
    live: ConfigState, shared: ConfigState | None, base: ConfigState | None, complete: bool, restarted: bool
) -> dict[ObjKey, Message]:
    """The desired objects, key by key, from the rules as docs/sync.md and the README state them: no shared
    state: live; no base: the union (even after a sozu restart: nothing says what was removed); sozu
    restarted: shared; otherwise a three-way merge against the base where, when shared may be incomplete,
    a base object shared lacks counts as unchanged (additions only). Both sides changed a key differently:
    a change beats a removal, else the greater content digest."""
    if shared is None:
        return dict(live)
    if base is not None and restarted:
        return dict(shared)
    b = {} if base is None else base
    remote = dict(shared)
    if not complete and base is not None:
        remote.update({k: v for k, v in base.items() if k not in remote})
    out: dict[ObjKey, Message] = {}
    for key in set(b) | set(live) | set(remote):
        bv, lv, rv = b.get(key), live.get(key), remote.get(key)
        if lv in (bv, rv):
            v = rv
        elif rv == bv:
            v = lv
        elif lv is None or rv is None:
            v = rv if lv is None else lv
        else:
            v = max(lv, rv, key=value_digest)
        if v is not None:
            out[key] = v
    return out


@PROPS
@given(**INPUTS)
def test_decide_modifies_no_input(
    live: ConfigState,
    shared: ConfigState | None,
    base: ConfigState | None,
    complete: bool,
    restarted: bool,
    repair: bool,
) -> None:
    before = [_snapshot(s) for s in (live, shared, base)]
    decide(live=live, shared=shared, base=base, complete=complete, restarted=restarted, repair=repair)
    assert [_snapshot(s) for s in (live, shared, base)] == before, "decide modified an input"


@PROPS
@given(**INPUTS)
def test_decide_follows_the_documented_rules(
    live: ConfigState,
    shared: ConfigState | None,
    base: ConfigState | None,
    complete: bool,
    restarted: bool,
    repair: bool,
) -> None:
    d = decide(live=live, shared=shared, base=base, complete=complete, restarted=restarted, repair=repair)
    # the branch
    if shared is None:
        assert d.branch is (Branch.BOOTSTRAP if len(live) else Branch.NOTHING)
    else:
        assert d.branch is (Branch.UNION if base is None else Branch.SHARED_WINS if restarted else Branch.MERGE)
        assert d.complete == complete
    # the desired state
    assert dict(d.desired) == expected(live, shared, base, complete, restarted), d.branch
    # the push: a state that differs from shared is always pushed; one equal to shared only for a repair
    if shared is None:
        assert d.push == (len(live) > 0)
    elif d.branch is Branch.SHARED_WINS:
        assert not d.push
    else:
        assert d.push == (repair or not d.desired.same_as(shared))


@PROPS
@given(live=small_states(), shared=small_states(), base=small_states())
def test_shared_that_may_be_incomplete_only_adds(live: ConfigState, shared: ConfigState, base: ConfigState) -> None:
    """``complete=False``: what shared lacks is unknown, not removed. Every live object shared lacks stays
    with live's value; an object of shared leaves only when live removed it from the base and shared kept
    the base's value (a local removal); with a base, no object of live or base is dropped otherwise."""
    d = decide(live=live, shared=shared, base=base, complete=False)
    assert d.branch is Branch.MERGE and not d.complete
    for k, v in live.items():
        if k not in shared:
            assert d.desired.get(k) == v, f"{k}: a live object shared lacks was not kept"
    for k, v in shared.items():
        if k not in d.desired:
            assert k not in live and base.get(k) == v, f"{k}: dropped without a local removal"
    for k, v in base.items():
        if k not in d.desired:
            assert k not in live and shared.get(k) in (None, v), f"{k}: a base object dropped"
    if d.desired.same_as(shared):
        assert not d.push


@PROPS
@given(a=small_states(), b=small_states(), base=st.none() | small_states())
def test_both_sides_compute_the_same_state_and_report_the_same_conflicts(
    a: ConfigState, b: ConfigState, base: ConfigState | None
) -> None:
    """Two nodes, one with live a reading b, the other with live b reading a, against the same base (or
    none): the same desired state and the same conflicts (so every node converges to one state); and the
    reported conflicts are exactly the keys both sides changed differently, the counts each side's changes."""
    x = decide(live=a, shared=b, base=base)
    y = decide(live=b, shared=a, base=base)
    assert x.desired == y.desired
    assert set(x.conflicts) == set(y.conflicts)
    bo = {} if base is None else base
    keys = set(bo) | set(a) | set(b)
    mine = {k for k in keys if a.get(k) != bo.get(k)}
    theirs = {k for k in keys if b.get(k) != bo.get(k)}
    assert {c.key for c in x.conflicts} == {k for k in mine & theirs if a.get(k) != b.get(k)}
    assert (x.local_changes, x.remote_changes) == (len(mine), len(theirs))


@PROPS
@given(live=small_states(), shared=small_states(), base=st.none() | small_states(), complete=st.booleans())
def test_a_second_step_changes_nothing(
    live: ConfigState, shared: ConfigState, base: ConfigState | None, complete: bool
) -> None:
    """Once live and shared hold the decision, the next step (whatever the base) applies and pushes
    nothing: no echo, no ping-pong between nodes."""
    d = decide(live=live, shared=shared, base=base, complete=complete)
    for b in (base, d.desired, None):
        again = decide(live=d.desired, shared=d.desired, base=b, complete=complete)
        assert again.desired == d.desired and not again.push, f"a second step with base {b!r:.40} changes something"
