"""``plan(live, desired, scope=keys)``: the plan of ``live`` -> ``desired'`` (``live`` with the scope's keys
as in ``desired``), identical to the full computation, planned from sub-states of the scope's size."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from strategies import backend, certificate, http_frontend, l4_frontend, listener, sock, state_pairs

import sozud.state.plan as plan_module
from sozud.errors import SozudError, UnsafePlanError, VersionMismatchError
from sozud.proto import command_pb2 as pb
from sozud.state.model import FRONTEND_KIND_OF_LISTENER, ConfigState, Kind, ObjKey, copy_message
from sozud.state.plan import Plan, plan
from sozud.testing import builders as build
from sozud.versions import V0_15_19, V1_1_1, V2_1_0, SozuVersion

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# keys in neither state, one of each kind (a scope may name objects that exist nowhere)
ABSENT_KEYS: tuple[ObjKey, ...] = (
    ("listener", "http", "192.0.2.9:1"),
    ("cluster", "nowhere"),
    ("backend", "app1", "nowhere", "10.1.0.1:80"),
    ("http_frontend", "192.0.2.9:1;nowhere.test;P/"),
    ("https_frontend", "192.0.2.9:2;nowhere.test;P/"),
    ("tcp_frontend", "app1", "192.0.2.9:3", ""),
    ("certificate", "192.0.2.9:4", "00" * 32),
)


def _same(a: Message | None, b: Message | None) -> bool:
    return (a is None) == (b is None) and (a is None or a == b)


def overlaid(live: ConfigState, desired: ConfigState, scope: Collection[ObjKey]) -> ConfigState:
    """desired' computed here, independently of the planner."""
    out = ConfigState(desired.version, dict(live))
    for k in scope:
        if k in desired:
            out[k] = desired[k]
        else:
            out.pop(k, None)
    return out


@st.composite
def scoped_cases(draw: st.DrawFn) -> tuple[ConfigState, ConfigState, Collection[ObjKey]]:
    live, desired = draw(state_pairs())
    for key in [k for k in live if k[0] == "listener"]:
        if draw(st.booleans()):  # a changed listener (often one that must be rebuilt) rather than a new one
            desired[key] = draw(listener(key[1], key[2], live.version))
    # Objects both states hold unchanged, from the same pools as the drawn ones: enough of them for a
    # scope to be small next to live (so the scoped path runs), and objects that planning a drawn one
    # looks at: backends sharing (cluster_id, address) with a removed one (re-added), frontends and
    # certificates on a rebuilt listener, TCP frontends of one (cluster_id, address) group, certificates
    # a new one renews.
    version = live.version
    fillers: list[tuple[Kind, Message]] = []
    for i in range(draw(st.integers(min_value=0, max_value=60))):
        b = draw(backend(version))
        b.backend_id = f"fill{i}"
        fillers.append(("backend", b))
    for i in range(draw(st.integers(min_value=0, max_value=10))):
        fillers.append(("cluster", build.cluster(f"fill{i}")))
    kinds: list[Kind] = ["http_frontend", "https_frontend"]
    for kind in kinds:
        fillers += [(kind, f) for f in draw(st.lists(http_frontend(version), max_size=3))]
    fillers += [("tcp_frontend", f) for f in draw(st.lists(l4_frontend("tcp"), max_size=3))]
    fillers += [("certificate", c) for c in draw(st.lists(certificate(), max_size=2))]
    for key in sorted(live.keys() | desired.keys()):
        if draw(st.booleans()):
            fillers += _neighbours(draw, key, version)
    for kind, value in fillers:
        if kind == "listener":
            continue
        live.add(kind, value)
        desired.add(kind, copy_message(value))
    keys = sorted(live.keys() | desired.keys())
    differing = [k for k in keys if not _same(live.get(k), desired.get(k))]
    modes = ["any", "differing", "differing_and_more", "some_differing", "one_differing", "one_differing"]
    mode = draw(st.sampled_from(modes))
    if mode == "one_differing":  # the common case: one change (its kind decides the path)
        if differing:  # a kind first, so that rarer kinds (listeners) come up as often as the others
            kind = draw(st.sampled_from(sorted({k[0] for k in differing})))
            scope = [draw(st.sampled_from([k for k in differing if k[0] == kind]))]
        else:
            scope = []
    elif mode == "any":
        scope = draw(st.lists(st.sampled_from(keys), unique=True)) if keys else []
    elif mode == "differing":
        scope = list(differing)
    elif mode == "differing_and_more":
        scope = draw(st.permutations(differing))
        scope += [k for k in draw(st.lists(st.sampled_from(keys), max_size=5)) if k not in scope] if keys else []
    else:  # differing keys the scoped path takes, and a few equal ones
        simple = [k for k in differing if k[0] not in ("listener", "certificate", "tcp_frontend", "udp_frontend")]
        scope = draw(st.lists(st.sampled_from(simple), unique=True)) if simple else []
        scope += draw(st.lists(st.sampled_from(keys), unique=True, max_size=3)) if keys else []
    scope += draw(st.lists(st.sampled_from(ABSENT_KEYS), unique=True, max_size=3))
    container: Callable[[list[ObjKey]], Collection[ObjKey]] = draw(st.sampled_from([list, set, frozenset, tuple]))
    return live, desired, container(scope)


def _neighbours(draw: st.DrawFn, key: ObjKey, version: SozuVersion) -> list[tuple[Kind, Message]]:
    """Objects that planning ``key`` looks at: a backend at the same (cluster_id, address), a TCP/UDP
    frontend of the same (cluster_id, address) group, frontends on a listener's address."""
    kind = key[0]
    if kind == "backend":
        return [("backend", pb.AddBackend(cluster_id=key[1], backend_id=f"nb-{key[2]}", address=sock(key[3])))]
    if kind in ("tcp_frontend", "udp_frontend"):
        front = draw(l4_frontend("tcp" if kind == "tcp_frontend" else "udp"))
        front.cluster_id = key[1]
        front.address.CopyFrom(sock(key[2]))
        return [(kind, front)]
    if kind == "listener":
        fkind = FRONTEND_KIND_OF_LISTENER[key[1]]
        if fkind in ("http_frontend", "https_frontend"):
            value: Message = draw(http_frontend(version))
        else:
            value = draw(l4_frontend("tcp" if fkind == "tcp_frontend" else "udp"))
        getattr(value, "address").CopyFrom(sock(key[2]))  # noqa: B009
        return [(fkind, value)]
    return []


def _outcome(call: Callable[[], Plan]) -> tuple[Plan | None, SozudError | None]:
    try:
        return call(), None
    except SozudError as e:
        return None, e


def _steps(p: Plan) -> list[tuple[str, ObjKey, str, bytes]]:
    return [(s.action, s.key, s.summary, s.request.SerializeToString(deterministic=True)) for s in p.steps]


@SETTINGS
@given(
    case=scoped_cases(),
    force=st.booleans(),
    complete=st.booleans(),
    ratio=st.sampled_from([0.5, 1.0, 0.05]),
)
def test_a_scoped_plan_is_the_full_plan_of_the_overlaid_state(
    case: tuple[ConfigState, ConfigState, Collection[ObjKey]], force: bool, complete: bool, ratio: float
) -> None:
    live, desired, scope = case
    digests = live.digest(), desired.digest()
    target = overlaid(live, desired, scope)
    options: dict[str, Any] = {"force": force, "desired_is_complete": complete, "max_removal_ratio": ratio}
    full, full_error = _outcome(lambda: plan(live, target, **options))
    scoped, scoped_error = _outcome(lambda: plan(live, desired, scope=scope, **options))
    event("scoped path" if plan_module._scoped_states(live, desired, scope) is not None else "full path")
    event("refused" if full_error is not None else "planned")
    assert (live.digest(), desired.digest()) == digests, "planning changed its inputs"
    if full_error is not None:
        assert type(scoped_error) is type(full_error) and str(scoped_error) == str(full_error)
        return
    assert scoped_error is None, scoped_error
    assert full is not None and scoped is not None
    assert _steps(scoped) == _steps(full)
    assert scoped.digest() == full.digest()
    assert (scoped.removals, scoped.additions, scoped.changes) == (full.removals, full.additions, full.changes)
    assert scoped.version == full.version


# --- the cost: a scoped plan looks at its keys, not at the state -------------------------------------------


class _RecordingBuilder(plan_module.StepBuilder):
    sizes: list[int] = []

    def __init__(self, live: ConfigState, desired: ConfigState) -> None:
        _RecordingBuilder.sizes.append(len(live))
        super().__init__(live, desired)


@pytest.fixture
def builder_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    monkeypatch.setattr(_RecordingBuilder, "sizes", sizes)
    monkeypatch.setattr(plan_module, "StepBuilder", _RecordingBuilder)
    return sizes


def test_one_backend_change_is_planned_from_a_few_objects(builder_sizes: list[int]) -> None:
    live = build.fleet_state(2000)
    desired = build.fleet_state(2000, changed_weight=7)
    changed = [k for k, v in desired.items() if live[k] != v]
    assert len(changed) == 1
    scoped = plan(live, desired, scope=changed)
    assert builder_sizes == [1], "the scoped plan was built from more than the changed backend"
    assert _steps(scoped) == _steps(plan(live, desired))
    assert [s.request_type for s in scoped.steps] == ["add_backend"]


def test_a_removed_backend_brings_its_siblings_into_the_plan(builder_sizes: list[int]) -> None:
    live = build.fleet_state(400)
    for i in range(3):  # three backends of app-000001 at one address
        live.add("backend", build.backend("app-000001", f"sib{i}", "10.9.9.9:80"))
    desired = live.shallow_copy()
    gone = ("backend", "app-000001", "sib0", "10.9.9.9:80")
    del desired[gone]
    scoped = plan(live, desired, scope=[gone])
    assert builder_sizes == [3]
    assert [(s.action, s.key[2]) for s in scoped.steps] == [("remove", "sib0"), ("add", "sib1"), ("add", "sib2")]
    assert _steps(scoped) == _steps(plan(live, desired))


def test_a_scope_on_a_listener_or_a_large_scope_is_planned_in_full(builder_sizes: list[int]) -> None:
    live = build.fleet_state(100)
    desired = live.shallow_copy()
    ((lkey, lvalue),) = [(k, v) for k, v in live.items() if k[0] == "listener"]
    active = copy_message(lvalue)
    setattr(active, "active", True)  # noqa: B010
    desired[lkey] = active
    p = plan(live, desired, scope=[lkey])
    assert builder_sizes == [len(live)] and [s.action for s in p.steps] == ["activate"]
    builder_sizes.clear()
    # an unchanged listener in the scope changes nothing: the scope stays small
    plan(
        live,
        build.fleet_state(100, changed_weight=3),
        scope=[lkey, ("backend", "app-000050", "app-000050-0", "10.0.0.50:8000")],
    )
    assert builder_sizes == [1]
    builder_sizes.clear()
    big = [k for k in live if k[0] == "cluster"][:80]  # more than a quarter of 301 objects
    plan(live, ConfigState(live.version, {k: v for k, v in live.items() if k not in big}), scope=big, force=True)
    assert builder_sizes == [len(live)]


def test_the_safety_valve_counts_the_whole_state() -> None:
    live = build.fleet_state(100)
    desired = live.shallow_copy()
    gone = [k for k in live if k[0] == "cluster"][:10]
    for k in gone:
        del desired[k]
    # 10 of 301 objects: fine with the whole state counted (10 of 10 would not be)
    assert len(plan(live, desired, scope=gone).steps) == 10
    with pytest.raises(UnsafePlanError, match="incomplete") as info:
        plan(live, desired, scope=gone, desired_is_complete=False)
    assert "10 of the 301 live objects" in str(info.value)


def test_a_scoped_plan_still_checks_the_versions() -> None:
    with pytest.raises(VersionMismatchError):
        plan(ConfigState(V0_15_19), ConfigState(V2_1_0), scope=[])


def _rebuilt_listener() -> tuple[ConfigState, ConfigState, ObjKey]:
    live = build.fleet_state(8, version=V1_1_1)  # 1.x has no update_*_listener: any change rebuilds
    desired = live.shallow_copy()
    (key,) = [k for k in live if k[0] == "listener"]
    value = copy_message(live[key])
    setattr(value, "front_timeout", 77)  # noqa: B010
    desired[key] = value
    return live, desired, key


def _l4_group(kind: str) -> tuple[ConfigState, ConfigState, ObjKey]:
    live = build.fleet_state(8)
    cls = pb.RequestTcpFrontend if kind == "tcp_frontend" else pb.RequestUdpFrontend
    gone = live.add(kind, cls(cluster_id="app-000001", address=sock("127.0.0.1:9000")))  # type: ignore[arg-type]
    kept = cls(cluster_id="app-000001", address=sock("127.0.0.1:9000"))
    kept.tags["env"] = "a"
    live.add(kind, kept)  # type: ignore[arg-type]
    desired = live.shallow_copy()
    del desired[gone]
    return live, desired, gone


def _shared_address() -> tuple[ConfigState, ConfigState, ObjKey]:
    live = build.fleet_state(8)
    gone = live.add("backend", build.backend("app-000001", "other", "10.0.0.1:8000"))  # beside app-000001-0
    desired = live.shallow_copy()
    del desired[gone]
    return live, desired, gone


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(_rebuilt_listener, id="rebuilt listener: its frontends are removed and added again"),
        pytest.param(lambda: _l4_group("tcp_frontend"), id="tcp frontend group: the kept one is re-added"),
        pytest.param(lambda: _l4_group("udp_frontend"), id="udp frontend group: the kept one is re-added"),
        pytest.param(_shared_address, id="backend at a shared address: the kept one is re-added"),
    ],
)
def test_one_change_whose_plan_involves_unchanged_objects(case: Callable[[], Any]) -> None:
    """Each case's plan has steps for objects outside the scope: a scoped plan must still hold them."""
    live, desired, key = case()
    full = plan(live, desired)
    scoped = plan(live, desired, scope=[key])
    assert any(s.key != key for s in full.steps)
    assert _steps(scoped) == _steps(full)
