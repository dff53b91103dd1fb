"""The planner, checked against an independent referee of sozu's main-state semantics.

The referee is the simulator's ``SozuMainState`` (sozud/testing): a state is loaded into it, the plan's
requests are dispatched one by one (each must be accepted), and the state file it generates, parsed
with our codec, must equal the desired state.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import (
    CERT_NAMES,
    cluster,
    fixture_certificate,
    sock,
    state_pairs,
    states,
)

from sozud.errors import StateError, UnsafePlanError, VersionMismatchError
from sozud.proto import command_pb2 as pb
from sozud.state.codec import parse_state_file, write_state_file
from sozud.state.model import ConfigState, copy_message, describe
from sozud.state.plan import Plan, diff, plan
from sozud.versions import V0_15_19, V1_1_1, V2_1_0, SozuVersion

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _referee_class() -> Any:
    for name in ("sozud.testing.fake_sozu", "sozud.testing._sozu_state"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "SozuMainState"):
            return module.SozuMainState
    pytest.skip("the sozu simulator's SozuMainState is not available yet")


def referee_apply(live: ConfigState, p: Plan) -> ConfigState:
    """Load ``live`` into the referee, dispatch the plan, read back its state file with our codec."""
    sim = _referee_class()(live.version)
    _accepted, refused = sim.load_state_file(write_state_file(live))
    assert refused == 0
    loaded = parse_state_file(sim.generate_state_file(), live.version, source="referee", allow_empty=True)
    assert loaded == live, "the referee does not hold the live state after loading it"
    for i, step in enumerate(p.steps):
        error = sim.dispatch(step.request)
        assert error is None, f"step {i} ({step.summary}) refused by the referee: {error}"
    return parse_state_file(sim.generate_state_file(), live.version, source="referee", allow_empty=True)


def _explain(got: ConfigState, want: ConfigState) -> list[str]:
    d = diff(got, want)
    return (
        [f"missing {describe(k)}" for k in d.added]
        + [f"extra {describe(k)}" for k in d.removed]
        + [f"differs {describe(k)}" for k in d.changed]
    )


# --- applying plan(a, b) to a gives b ----------------------------------------------------------------------


@SETTINGS
@given(state_pairs())
def test_applying_the_plan_gives_the_desired_state(pair: tuple[ConfigState, ConfigState]) -> None:
    live, desired = pair
    p = plan(live, desired, force=True)
    got = referee_apply(live, p)
    assert got == desired, _explain(got, desired)
    for step in p.steps:
        step.request.SerializeToString()  # complete proto2 messages (raises otherwise)
    assert plan(desired, desired).is_empty


@SETTINGS
@given(states())
def test_plan_from_empty_and_to_itself(state: ConfigState) -> None:
    p = plan(ConfigState(state.version), state)
    assert referee_apply(ConfigState(state.version), p) == state
    assert all(s.action in ("add", "activate") for s in p.steps)
    assert plan(state, state.copy()).is_empty


# --- minimal plans: k changes cost k requests ----------------------------------------------------------------

NEW_PORTS = iter(range(20000, 10**6))


def _new_cluster(data: st.DataObject, version: SozuVersion, cid: str) -> pb.Cluster:
    return data.draw(cluster(cid, version))


def _mutations(state: ConfigState, desired: ConfigState, data: st.DataObject, i: int) -> list[Any]:
    """The single-request changes possible on ``desired`` now (each returns the key it touches)."""
    version = state.version
    objs = desired
    out: list[Any] = []

    def add_cluster() -> Any:
        return desired.add("cluster", _new_cluster(data, version, f"new{i}"))

    def change_cluster(k: Any) -> Any:
        c = copy_message(objs[k])
        assert isinstance(c, pb.Cluster)
        c.sticky_session = not c.sticky_session
        objs[k] = c
        return k

    def remove(k: Any) -> Any:
        del objs[k]
        return k

    def add_backend() -> Any:
        return desired.add(
            "backend",
            pb.AddBackend(cluster_id="app1", backend_id=f"nb{i}", address=sock(f"10.9.0.{i}:80")),
        )

    def change_backend(k: Any) -> Any:
        b = copy_message(objs[k])
        assert isinstance(b, pb.AddBackend)
        b.load_balancing_parameters.weight = 77 if b.load_balancing_parameters.weight != 77 else 78
        objs[k] = b
        return k

    def add_front(kind: str) -> Any:
        f = pb.RequestHttpFrontend(
            address=sock("127.0.0.1:8080"),
            hostname=f"n{i}.test",
            path=pb.PathRule(kind=pb.PREFIX, value="/"),
            position=pb.TREE,
            cluster_id="app1",
        )
        return desired.add(kind, f)  # type: ignore[arg-type]

    def add_listener() -> Any:
        return desired.add_listener(
            "tcp",
            pb.TcpListenerConfig(
                address=sock(f"127.0.0.2:{next(NEW_PORTS) % 60000 + 1024}"),
                expect_proxy=False,
                front_timeout=60,
                back_timeout=30,
                connect_timeout=3,
                active=False,
            ),
        )

    def toggle(k: Any) -> Any:
        v = copy_message(objs[k])
        v.active = not v.active  # type: ignore[attr-defined]
        objs[k] = v
        return k

    def add_tcp() -> Any:
        return desired.add("tcp_frontend", pb.RequestTcpFrontend(cluster_id=f"ntcp{i}", address=sock("127.0.0.1:8080")))

    out.append(add_cluster)
    out.append(add_backend)
    out.append(lambda: add_front("http_frontend"))
    out.append(lambda: add_front("https_frontend"))
    out.append(add_listener)
    out.append(add_tcp)
    for k in list(objs):
        if k not in state or objs[k] != state[k]:
            continue  # already touched
        kind = k[0]
        if kind == "cluster":
            out += [lambda k=k: change_cluster(k), lambda k=k: remove(k)]
        elif kind == "backend":
            out.append(lambda k=k: change_backend(k))
            siblings = [s for s in state if s[0] == "backend" and s[1] == k[1] and s[3] == k[3]]
            if len(siblings) == 1:
                out.append(lambda k=k: remove(k))
        elif kind in ("http_frontend", "https_frontend", "certificate"):
            out.append(lambda k=k: remove(k))
        elif kind == "tcp_frontend":
            group = [s for s in state if s[0] == kind and s[1] == k[1] and s[2] == k[2]]
            if len(group) == 1:
                out.append(lambda k=k: remove(k))
        elif kind == "listener":
            out.append(lambda k=k: toggle(k))
            if not getattr(objs[k], "active"):  # noqa: B009
                out.append(lambda k=k: remove(k))
    return out


@SETTINGS
@given(st.sampled_from([V0_15_19, V1_1_1, V2_1_0]).flatmap(lambda v: states(v)), st.data())
def test_k_single_request_changes_cost_k_requests(live: ConfigState, data: st.DataObject) -> None:
    # certificates are left out: an added and a removed certificate with the same names on one address
    # are a renewal, one replace_certificate for two object changes (tested separately)
    live = ConfigState(live.version, {k: v for k, v in live.items() if k[0] != "certificate"})
    desired = live.copy()
    k = data.draw(st.integers(min_value=0, max_value=6))
    touched: set[Any] = set()
    for i in range(k):
        options = _mutations(live, desired, data, i)
        key = data.draw(st.sampled_from(options))()
        assert key not in touched
        touched.add(key)
    p = plan(live, desired, force=True)
    assert len(p.steps) == k, p.to_table()
    assert referee_apply(live, p) == desired


def _cert_state(version: SozuVersion, *names: str, address: str = "127.0.0.1:8443") -> ConfigState:
    state = ConfigState(version)
    for name in names:
        state.add("certificate", pb.AddCertificate(address=sock(address), certificate=fixture_certificate(name)))
    return state


@pytest.mark.parametrize("version", [V0_15_19, V1_1_1, V2_1_0])
def test_renewed_certificate_is_one_replace(version: SozuVersion) -> None:
    live = _cert_state(version, "example.test", "api.example.test")
    desired = _cert_state(version, "example.test-v2", "api.example.test")
    p = plan(live, desired)
    assert [(s.action, s.request_type) for s in p.steps] == [("replace", "replace_certificate")]
    replace = p.steps[0].request.replace_certificate
    assert replace.old_fingerprint == "478b8dd4717b00e6a0596d2c2055e0b8cea5f9e2d6f0c713ea91eb0c1f2dcd2e"
    assert referee_apply(live, p) == desired


def test_certificate_metadata_change_is_one_replace() -> None:
    live = _cert_state(V2_1_0, "wild.example.test")
    desired = live.copy()
    ((key, value),) = desired.items()
    assert isinstance(value, pb.AddCertificate)
    value.certificate.versions.append(pb.TLS_V1_3)
    desired[key] = value
    p = plan(live, desired)
    assert [s.request_type for s in p.steps] == ["replace_certificate"]
    assert p.steps[0].request.replace_certificate.old_fingerprint == key[2]
    assert referee_apply(live, p) == desired


def test_certificate_with_other_names_is_add_and_remove() -> None:
    live = _cert_state(V1_1_1, "example.test")
    desired = ConfigState(V1_1_1)
    desired.add(
        "certificate",
        pb.AddCertificate(
            address=sock("127.0.0.1:8443"), certificate=fixture_certificate("example.test-v2", ["example.test"])
        ),
    )
    p = plan(live, desired, force=True)
    assert [s.request_type for s in p.steps] == ["add_certificate", "remove_certificate"]
    assert referee_apply(live, p) == desired
    assert set(CERT_NAMES["example.test"]) != {"example.test"}


# --- specific orders and costs ------------------------------------------------------------------------


def _front(kind: str = "http_frontend", **kw: Any) -> pb.RequestHttpFrontend:
    f = pb.RequestHttpFrontend(
        address=sock("127.0.0.1:8080"),
        hostname="example.test",
        path=pb.PathRule(kind=pb.PREFIX, value="/"),
        position=pb.TREE,
    )
    for name, value in kw.items():
        if name == "tags":
            f.tags.update(value)
        elif name == "address":
            f.address.CopyFrom(value)
        else:
            setattr(f, name, value)
    return f


@pytest.mark.parametrize("field", ["cluster_id", "position", "tags"])
def test_moved_frontend_is_removed_with_its_stored_values_then_added(field: str) -> None:
    live = ConfigState(V1_1_1)
    live.add("http_frontend", _front(cluster_id="a", position=pb.PRE, tags={"k": "v"}))
    desired = ConfigState(V1_1_1)
    changes = {"cluster_id": "b", "position": pb.POST, "tags": {"k": "w"}}
    kw: dict[str, Any] = {"cluster_id": "a", "position": pb.PRE, "tags": {"k": "v"}}
    kw[field] = changes[field]
    desired.add("http_frontend", _front(**kw))
    p = plan(live, desired)
    assert [(s.action, s.request_type) for s in p.steps] == [
        ("remove", "remove_http_frontend"),
        ("add", "add_http_frontend"),
    ]
    removed = p.steps[0].request.remove_http_frontend
    assert (removed.cluster_id, removed.position, dict(removed.tags)) == ("a", pb.PRE, {"k": "v"})
    assert referee_apply(live, p) == desired


def _tcp(cluster_id: str, tags: dict[str, str] | None = None, address: str = "127.0.0.1:9000") -> pb.RequestTcpFrontend:
    f = pb.RequestTcpFrontend(cluster_id=cluster_id, address=sock(address))
    f.tags.update(tags or {})
    return f


def test_tcp_frontend_removal_keeps_the_group_members_that_stay() -> None:
    live = ConfigState(V2_1_0)
    for tags in ({}, {"a": "1"}, {"a": "2"}):
        live.add("tcp_frontend", _tcp("t1", tags))
    live.add("tcp_frontend", _tcp("t2"))
    desired = live.copy()
    del desired[("tcp_frontend", "t1", "127.0.0.1:9000", "a=1")]
    p = plan(live, desired)
    # one remove clears (t1, 127.0.0.1:9000) on sozu, the two that stay are added again; t2 untouched
    assert [s.request_type for s in p.steps] == ["remove_tcp_frontend", "add_tcp_frontend", "add_tcp_frontend"]
    assert referee_apply(live, p) == desired


def test_tcp_frontend_tag_change_is_remove_then_add() -> None:
    live = ConfigState(V1_1_1)
    live.add("tcp_frontend", _tcp("t1", {"env": "a"}))
    desired = ConfigState(V1_1_1)
    desired.add("tcp_frontend", _tcp("t1", {"env": "b"}))
    p = plan(live, desired, force=True)
    assert [s.request_type for s in p.steps] == ["remove_tcp_frontend", "add_tcp_frontend"]
    assert referee_apply(live, p) == desired


def test_backend_removal_re_adds_a_sibling_on_the_same_address() -> None:
    live = ConfigState(V1_1_1)
    for bid in ("b1", "b2"):
        live.add("backend", pb.AddBackend(cluster_id="c", backend_id=bid, address=sock("10.0.0.1:80")))
    desired = live.copy()
    del desired[("backend", "c", "b1", "10.0.0.1:80")]
    p = plan(live, desired)
    assert [(s.request_type, s.key[2]) for s in p.steps] == [("remove_backend", "b1"), ("add_backend", "b2")]
    assert referee_apply(live, p) == desired


def _http_listener(active: bool, **kw: Any) -> pb.HttpListenerConfig:
    msg = pb.HttpListenerConfig(
        address=sock("127.0.0.1:8080"),
        expect_proxy=False,
        sticky_name="S",
        front_timeout=60,
        back_timeout=30,
        connect_timeout=3,
        request_timeout=10,
        active=active,
    )
    for name, value in kw.items():
        setattr(msg, name, value)
    return msg


def test_new_active_listener_is_add_then_activate_before_anything_else() -> None:
    live = ConfigState(V2_1_0)
    desired = ConfigState(V2_1_0)
    desired.add_listener("http", _http_listener(True))
    desired.add("http_frontend", _front(cluster_id="c"))
    desired.add(
        "cluster", pb.Cluster(cluster_id="c", sticky_session=False, https_redirect=False, load_balancing=pb.ROUND_ROBIN)
    )
    p = plan(live, desired)
    assert [s.request_type for s in p.steps] == [
        "add_http_listener",
        "activate_listener",
        "add_cluster",
        "add_http_frontend",
    ]
    assert referee_apply(live, p) == desired


def test_changed_listener_on_2x_is_patched_in_place() -> None:
    live = ConfigState(V2_1_0)
    live.add_listener("http", _http_listener(True))
    live.add("http_frontend", _front(cluster_id="c"))
    desired = live.copy()
    desired.add_listener("http", _http_listener(True, front_timeout=5, sticky_name="T", h2_max_concurrent_streams=50))
    p = plan(live, desired)
    assert [s.request_type for s in p.steps] == ["update_http_listener"]
    patch = p.steps[0].request.update_http_listener
    assert (patch.front_timeout, patch.sticky_name, patch.h2_max_concurrent_streams) == (5, "T", 50)
    assert referee_apply(live, p) == desired


@pytest.mark.parametrize("version", [V0_15_19, V1_1_1, V2_1_0])
def test_unpatchable_listener_change_rebuilds_it_keeping_activation(version: SozuVersion) -> None:
    live = ConfigState(version)
    old = _http_listener(True)
    if version == V0_15_19:
        old.answer_404 = "a"
        old.answer_503 = "b"
    if version == V2_1_0:
        old.public_address.CopyFrom(sock("192.0.2.2:80"))
    live.add_listener("http", old)
    live.add("http_frontend", _front(cluster_id="c"))
    live.add("http_frontend", _front(cluster_id="c", hostname="other.test"))
    desired = live.copy()
    new = copy_message(old)
    assert isinstance(new, pb.HttpListenerConfig)
    new.front_timeout = 5
    if version == V2_1_0:
        new.ClearField("public_address")  # a patch cannot unset a field: 2.x must rebuild too
    desired.add_listener("http", new)
    p = plan(live, desired)
    assert [s.request_type for s in p.steps] == [
        "remove_http_frontend",
        "remove_http_frontend",
        "deactivate_listener",
        "remove_listener",
        "add_http_listener",
        "activate_listener",
        "add_http_frontend",
        "add_http_frontend",
    ]
    assert referee_apply(live, p) == desired


def test_removals_come_after_additions_in_reverse_dependency_order() -> None:
    v = V1_1_1
    live = ConfigState(v)
    https = pb.HttpsListenerConfig(
        address=sock("127.0.0.1:8443"),
        expect_proxy=False,
        sticky_name="S",
        front_timeout=60,
        back_timeout=30,
        connect_timeout=3,
        request_timeout=10,
        active=True,
        send_tls13_tickets=4,
    )
    live.add_listener("https", https)
    live.add(
        "cluster",
        pb.Cluster(cluster_id="old", sticky_session=False, https_redirect=False, load_balancing=pb.ROUND_ROBIN),
    )
    live.add("https_frontend", _front(address=sock("127.0.0.1:8443"), cluster_id="old"))
    live.add(
        "certificate",
        pb.AddCertificate(address=sock("127.0.0.1:8443"), certificate=fixture_certificate("api.example.test")),
    )
    live.add("backend", pb.AddBackend(cluster_id="old", backend_id="b", address=sock("10.0.0.1:80")))
    desired = ConfigState(v)
    desired.add(
        "cluster",
        pb.Cluster(cluster_id="new", sticky_session=False, https_redirect=False, load_balancing=pb.ROUND_ROBIN),
    )
    desired.add("backend", pb.AddBackend(cluster_id="new", backend_id="b", address=sock("10.0.0.2:80")))
    p = plan(live, desired, force=True)
    assert [s.request_type for s in p.steps] == [
        "add_cluster",
        "add_backend",
        "remove_https_frontend",
        "remove_backend",
        "remove_certificate",
        "remove_cluster",
        "deactivate_listener",
        "remove_listener",
    ]
    assert referee_apply(live, p) == desired


# --- safety valve -----------------------------------------------------------------------------------


def _clusters(n: int, version: SozuVersion = V1_1_1) -> ConfigState:
    s = ConfigState(version)
    for i in range(n):
        s.add(
            "cluster",
            pb.Cluster(cluster_id=f"c{i}", sticky_session=False, https_redirect=False, load_balancing=pb.ROUND_ROBIN),
        )
    return s


def test_empty_desired_never_removes_unless_forced() -> None:
    live = _clusters(3)
    with pytest.raises(UnsafePlanError, match=r"empty.*3 live objects.*--force"):
        plan(live, ConfigState(V1_1_1))
    assert len(plan(live, ConfigState(V1_1_1), force=True).steps) == 3


def test_incomplete_desired_may_add_but_never_remove() -> None:
    live = _clusters(4)
    more = _clusters(6)
    p = plan(live, more, desired_is_complete=False)
    assert [s.action for s in p.steps] == ["add", "add"]
    fewer = _clusters(3)
    with pytest.raises(UnsafePlanError, match=r"incomplete.*remove 1 of the 4"):
        plan(live, fewer, desired_is_complete=False)
    assert len(plan(live, fewer, desired_is_complete=False, force=True).steps) == 1


def test_removal_ratio() -> None:
    live = _clusters(10)
    assert len(plan(live, _clusters(5)).steps) == 5  # exactly half: allowed
    with pytest.raises(UnsafePlanError, match=r"remove 6 of the 10 live objects .*max_removal_ratio=0.5"):
        plan(live, _clusters(4))
    assert len(plan(live, _clusters(4), max_removal_ratio=0.6).steps) == 6
    assert len(plan(live, _clusters(4), force=True).steps) == 6


# --- versions and secrets ---------------------------------------------------------------------------------


def test_requests_unknown_to_the_live_version_are_refused() -> None:
    desired = ConfigState(V2_1_0)
    desired.add_listener(
        "udp",
        pb.UdpListenerConfig(
            address=sock("127.0.0.1:53"),
            front_timeout=30,
            back_timeout=30,
            max_rx_datagram_size=1500,
            max_flows=0,
            active=False,
        ),
    )
    with pytest.raises(VersionMismatchError, match="add_udp_listener"):
        plan(ConfigState(V1_1_1), ConfigState(V1_1_1, desired))
    two = ConfigState(V2_1_0)
    two.add(
        "cluster",
        pb.Cluster(
            cluster_id="c", sticky_session=False, https_redirect=False, load_balancing=pb.ROUND_ROBIN, http2=True
        ),
    )
    with pytest.raises(VersionMismatchError, match="http2"):
        plan(ConfigState(V1_1_1), ConfigState(V1_1_1, two))
    with pytest.raises(VersionMismatchError):
        plan(ConfigState(V0_15_19), _clusters(1, V1_1_1))


@SETTINGS
@given(state_pairs())
def test_printable_forms_never_hold_private_keys(pair: tuple[ConfigState, ConfigState]) -> None:
    live, desired = pair
    p = plan(live, desired, force=True)
    import json

    text = p.to_table() + json.dumps(p.to_json()) + "".join(s.summary for s in p.steps)
    assert "PRIVATE KEY" not in text
    has_cert_steps = any(s.request_type in ("add_certificate", "replace_certificate") for s in p.steps)
    assert ("<redacted>" in text) == has_cert_steps
    assert len(p.digest()) == 64 and p.digest() == plan(live, desired, force=True).digest()


def test_unsafe_plan_messages_never_hold_private_keys() -> None:
    live = _cert_state(V2_1_0, "example.test", "api.example.test", "wild.example.test")
    with pytest.raises(UnsafePlanError) as info:
        plan(live, ConfigState(V2_1_0))
    assert "PRIVATE KEY" not in str(info.value) and "certificate 127.0.0.1:8443" in str(info.value)


def test_internal_check_rejects_a_desired_state_the_planner_cannot_reach() -> None:
    # expired_at is never stored by sozu: a desired value carrying one cannot be reached
    desired = _cert_state(V2_1_0, "api.example.test")
    ((key, value),) = desired.items()
    assert isinstance(value, pb.AddCertificate)
    value.expired_at = 1
    desired[key] = value
    with pytest.raises(StateError, match="does not reach"):
        plan(ConfigState(V2_1_0), desired)
