"""Three-way merge: no change without a conflict is lost, and every node converges."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import derived, fixture_certificate, sock, states

from sozud.proto import command_pb2 as pb
from sozud.state.merge import Conflict, merge
from sozud.state.model import ConfigState, value_digest
from sozud.versions import V1_1_1, V2_1_0

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def three_states(draw: st.DrawFn) -> tuple[ConfigState, ConfigState, ConfigState]:
    base = draw(states())
    return base, draw(derived(base)), draw(derived(base))


def _changed(base: ConfigState, side: ConfigState) -> dict[Any, Any]:
    """key -> new value (None = removed) for every key ``side`` changed relative to ``base``."""
    keys = set(base) | set(side)
    return {k: side.get(k) for k in keys if side.get(k) != base.get(k)}


@SETTINGS
@given(three_states())
def test_every_non_conflicting_change_survives(s: tuple[ConfigState, ConfigState, ConfigState]) -> None:
    base, local, remote = s
    result = merge(base, local, remote)
    mine, theirs = _changed(base, local), _changed(base, remote)
    merged = result.state
    for key, value in mine.items():
        if key not in theirs or theirs[key] == value:
            assert merged.get(key) == value, key
    for key, value in theirs.items():
        if key not in mine:
            assert merged.get(key) == value, key
    for key, value in base.items():
        if key not in mine and key not in theirs:
            assert merged[key] == value
    assert result.local_changes == len(mine)
    assert result.remote_changes == len(theirs)
    conflicting = {k for k in mine if k in theirs and mine[k] != theirs[k]}
    assert {c.key for c in result.conflicts} == conflicting
    for c in result.conflicts:
        a, b = mine[c.key], theirs[c.key]
        kept = merged.get(c.key)
        if a is None or b is None:
            assert kept is not None and kept == (a if b is None else b)  # a change beats a removal
            assert c.rule == "change beats removal"
        else:
            assert kept == max(a, b, key=value_digest)
            assert c.rule == "greater digest"


@SETTINGS
@given(three_states())
def test_every_node_converges(s: tuple[ConfigState, ConfigState, ConfigState]) -> None:
    base, a, b = s
    ab, ba = merge(base, a, b), merge(base, b, a)
    assert ab.state == ba.state
    assert sorted(ab.conflicts, key=lambda c: c.key) == sorted(ba.conflicts, key=lambda c: c.key)
    assert (ab.local_changes, ab.remote_changes) == (ba.remote_changes, ba.local_changes)
    for c1, c2 in zip(
        sorted(ab.conflicts, key=lambda c: c.key), sorted(ba.conflicts, key=lambda c: c.key), strict=True
    ):
        assert (c1.local, c1.remote) == (c2.remote, c2.local)


@SETTINGS
@given(states(), st.data())
def test_no_change_is_a_no_op(base: ConfigState, data: st.DataObject) -> None:
    result = merge(base, base.copy(), base.copy())
    assert result.state == base and result.conflicts == [] and result.local_changes == result.remote_changes == 0
    other = data.draw(derived(base))
    one_sided = merge(base, other, base)
    assert one_sided.state == other and one_sided.conflicts == [] and one_sided.remote_changes == 0
    assert merge(base, base, other).state == other
    # both sides made the same change: no conflict
    same = merge(base, other, other.copy())
    assert same.state == other and same.conflicts == []


def _cluster(cid: str, sticky: bool) -> pb.Cluster:
    return pb.Cluster(cluster_id=cid, sticky_session=sticky, https_redirect=False, load_balancing=pb.ROUND_ROBIN)


def test_change_beats_removal_either_side() -> None:
    base = ConfigState(V1_1_1)
    base.add("cluster", _cluster("c", False))
    changed = ConfigState(V1_1_1)
    changed.add("cluster", _cluster("c", True))
    removed = ConfigState(V1_1_1)
    for local, remote in ((changed, removed), (removed, changed)):
        result = merge(base, local, remote)
        assert result.state.get(("cluster", "c")) == _cluster("c", True)
        (conflict,) = result.conflicts
        assert conflict.rule == "change beats removal"
        assert "removed" in (conflict.local, conflict.remote)
        assert conflict.as_log()["kept"] == ("local" if local is changed else "remote")


def test_two_different_changes_keep_the_greater_digest_and_are_reported() -> None:
    base = ConfigState(V1_1_1)
    base.add("backend", pb.AddBackend(cluster_id="c", backend_id="b", address=sock("10.0.0.1:80")))
    sides = []
    for weight in (10, 20):
        s = base.copy()
        s.add(
            "backend",
            pb.AddBackend(
                cluster_id="c",
                backend_id="b",
                address=sock("10.0.0.1:80"),
                load_balancing_parameters=pb.LoadBalancingParams(weight=weight),
            ),
        )
        sides.append(s)
    key = ("backend", "c", "b", "10.0.0.1:80")
    winner = max((s[key] for s in sides), key=value_digest)
    r1, r2 = merge(base, sides[0], sides[1]), merge(base, sides[1], sides[0])
    assert r1.state[key] == r2.state[key] == winner
    assert r1.conflicts == r2.conflicts and len(r1.conflicts) == 1
    assert isinstance(r1.conflicts[0], Conflict) and "backend c/b @ 10.0.0.1:80" in str(r1.conflicts[0])


def test_both_removing_is_not_a_conflict() -> None:
    base = ConfigState(V2_1_0)
    base.add("cluster", _cluster("c", False))
    base.add("cluster", _cluster("d", False))
    a = base.copy()
    del a[("cluster", "c")]
    result = merge(base, a, a.copy())
    assert sorted(result.state) == [("cluster", "d")] and result.conflicts == []


def test_conflict_reports_never_hold_private_keys() -> None:
    base = ConfigState(V2_1_0)
    cert = pb.AddCertificate(address=sock("127.0.0.1:8443"), certificate=fixture_certificate("api.example.test"))
    base.add("certificate", cert)
    a, b = base.copy(), ConfigState(V2_1_0)
    ((key, value),) = a.items()
    assert isinstance(value, pb.AddCertificate)
    value.certificate.versions.append(pb.TLS_V1_3)
    a[key] = value
    (conflict,) = merge(base, a, b).conflicts
    text = str(conflict) + repr(conflict) + str(conflict.as_log())
    assert "PRIVATE KEY" not in text and "certificate 127.0.0.1:8443" in text
    assert conflict.key == key
