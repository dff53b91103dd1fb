"""sozud.decision.decide, the pure sync decision: properties over random live, shared and base states."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sozud.decision import Branch, decide
from sozud.state.model import ConfigState
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
        assert set(live.objects) <= set(d.desired.objects), "no removal from an incomplete shared state"
    if live == shared and not restarted:
        assert d.desired == live and not d.push, "a state already live and shared changes nothing"
    u = decide(live=live, shared=shared, base=None, complete=complete, restarted=restarted)
    assert u.branch is Branch.UNION
    assert set(live.objects) | set(shared.objects) == set(u.desired.objects), "union: nothing removed"
    # the union resolves a key held differently on both sides the same way whichever side is live
    v = decide(live=shared, shared=live, base=None)
    assert v.desired == u.desired


def test_no_shared_state_bootstraps_and_an_empty_sozu_does_nothing() -> None:
    live = ConfigState(V2)
    assert decide(live=live, shared=None, base=None).branch is Branch.NOTHING
    live.add("cluster", build.cluster("c"))
    d = decide(live=live, shared=None, base=None)
    assert d.branch is Branch.BOOTSTRAP and d.push and d.desired == live
