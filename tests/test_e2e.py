"""End to end: two or three simulated nodes (a simulated sozu and a real sozud daemon each) sharing one
simulated OpenSVC store. Waits are deadlines on conditions, never sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import FIXTURES

from sozud.errors import VersionMismatchError
from sozud.main import main
from sozud.proto import command_pb2 as pb
from sozud.state.codec import parse_state_file
from sozud.testing import builders as build
from sozud.testing.cluster import SimCluster, mutation_count, wait_until
from sozud.testing.fake_opensvc import FakeOpenSVCCluster
from sozud.testing.fake_sozu import FakeSozu
from sozud.versions import SozuVersion

VERSIONS = ["2.1.0", "1.1.1", "0.15"]


def cluster_req(cid: str, *, sticky: bool = False, redirect: bool = False) -> pb.Request:
    return pb.Request(add_cluster=build.cluster(cid, sticky=sticky, https_redirect=redirect))


def backend_req(cid: str, bid: str, addr: str) -> pb.Request:
    return pb.Request(add_backend=build.backend(cid, bid, addr))


def remove_backend_req(cid: str, bid: str, addr: str) -> pb.Request:
    return pb.Request(remove_backend=build.remove_backend(cid, bid, addr))


def listener_req(version: str) -> pb.Request:
    return pb.Request(add_http_listener=build.http_listener("127.0.0.1:18080", version=SozuVersion.parse(version)))


def in_sync(cluster: SimCluster) -> bool:
    files = {n.live_file() for n in cluster.nodes}
    return len(files) == 1


async def settled(cluster: SimCluster) -> None:
    """Every node runs one more sync after the states agree (so echoes, if any, would have happened)."""
    await wait_until(lambda: in_sync(cluster), what="all nodes to hold the same live state")
    marks = {}
    for n in cluster.nodes:
        assert n.daemon is not None
        marks[n.name] = n.daemon.syncs_attempted
        n.daemon.trigger("test")
    for n in cluster.nodes:
        d = n.daemon
        assert d is not None
        await wait_until(lambda d=d, m=marks[n.name]: d.syncs_attempted > m, what=f"{n.name} to sync again")


def writes_to_key(cluster: SimCluster) -> int:
    """Writes of the state key that the simulated agents served (v2 raw: ``POST key``)."""
    return sum(
        1
        for n in cluster.nodes
        for r in n.agent.requests
        if r.key in (cluster.key, cluster.key + ".manifest")
        and r.action in ("POST key", "set_key", "PUT data/key", "POST data/key")
    )


@pytest.fixture(params=VERSIONS)
async def three_nodes(request: pytest.FixtureRequest) -> AsyncIterator[SimCluster]:
    version = request.param
    cluster = await SimCluster.create(["a", "b", "c"], version=version)
    await cluster.node("a").request(listener_req(version))
    await cluster.node("a").request(cluster_req("app"))
    await cluster.node("a").request(backend_req("app", "app-0", "10.0.0.1:8000"))
    await cluster.start()
    try:
        await settled(cluster)
        yield cluster
    finally:
        await cluster.stop()


async def test_change_on_a_reaches_b_and_c_removals_too(three_nodes: SimCluster) -> None:
    c = three_nodes
    a = c.node("a")
    await a.request(cluster_req("shop"))
    await a.request(backend_req("shop", "shop-0", "10.0.0.2:8000"))
    await a.request(remove_backend_req("app", "app-0", "10.0.0.1:8000"))
    await settled(c)
    for n in c.nodes:
        live = n.live_file()
        assert b'"cluster_id":"shop"' in live and b"shop-0" in live
        assert b"app-0" not in live, f"the removal did not reach {n.name}"


async def test_echo_causes_no_request_and_no_push(three_nodes: SimCluster) -> None:
    c = three_nodes
    a = c.node("a")
    before_mutations = {n.name: mutation_count(n.sozu) for n in c.nodes}
    before_writes = writes_to_key(c)
    await a.request(cluster_req("echo"))
    await settled(c)
    after = {n.name: mutation_count(n.sozu) for n in c.nodes}
    assert after["a"] == before_mutations["a"], "the origin node got its own change sent back"
    assert after["b"] - before_mutations["b"] == 1 and after["c"] - before_mutations["c"] == 1
    assert writes_to_key(c) - before_writes == 1, "exactly one push for one change (no echo pushes)"
    # nothing more happens on further syncs
    await settled(c)
    assert {n.name: mutation_count(n.sozu) for n in c.nodes} == after
    assert writes_to_key(c) - before_writes == 1


async def test_concurrent_non_conflicting_edits_both_survive(three_nodes: SimCluster) -> None:
    c = three_nodes
    await c.node("a").request(cluster_req("from-a"))
    await c.node("b").request(cluster_req("from-b"))
    await settled(c)
    for n in c.nodes:
        assert b'"from-a"' in n.live_file() and b'"from-b"' in n.live_file()


async def test_conflict_is_resolved_identically_and_reported(three_nodes: SimCluster) -> None:
    c = three_nodes
    a, b = c.node("a"), c.node("b")
    # b's daemon is stopped while both edits are made, so b cannot learn a's edit before making its own:
    # the two edits are concurrent whatever the timing, and whichever node syncs second sees a conflict.
    await b.stop_daemon()
    await a.request(cluster_req("app", sticky=True))
    await b.request(cluster_req("app", redirect=True))
    await b.start_daemon()
    await settled(c)
    reported = 0
    for n in c.nodes:
        assert n.daemon is not None
        reported += n.daemon.status.conflicts_total
    assert reported >= 1, "two different edits of the same cluster were merged without a conflict being reported"
    # All nodes end identical (checked by settled) with exactly one of the two values: the merge keeps one
    # side's object whole, it never mixes the two.
    live = a.live_file()
    assert (b'"sticky_session":true' in live) != (b'"https_redirect":true' in live)


async def test_sozu_restarting_empty_on_b_is_repaired(three_nodes: SimCluster) -> None:
    c = three_nodes
    b = c.node("b")
    expected = c.node("a").live_file()
    await b.sozu.restart(empty=True)
    assert b.live_file() != expected
    await wait_until(lambda: b.live_file() == expected, what="b's restarted sozu to be repaired")
    await settled(c)
    assert c.node("a").live_file() == expected, "the empty restart must not propagate removals"


async def test_agent_down_then_up_loses_nothing(three_nodes: SimCluster) -> None:
    c = three_nodes
    a = c.node("a")
    assert a.daemon is not None
    await a.agent.stop()
    failures = a.daemon.status.consecutive_failures
    await a.request(cluster_req("while-down"))
    await wait_until(
        lambda: a.daemon is not None and a.daemon.status.consecutive_failures > failures,
        what="a's sync to fail while its agent is down",
    )
    await a.agent.start()
    await settled(c)
    for n in c.nodes:
        assert b'"while-down"' in n.live_file()


@pytest.mark.parametrize("corrupt", ["truncated", "empty"])
async def test_truncated_or_empty_state_in_store_removes_nothing(three_nodes: SimCluster, corrupt: str) -> None:
    c = three_nodes
    b = c.node("b")
    assert b.daemon is not None
    expected = b.live_file()
    value = c.shared_value()
    assert value is not None
    bad = value[: value.index(b"\0", len(value) // 2) + 1] if corrupt == "truncated" else b"\n"
    records = value.count(b"\0")
    c.opensvc.set_value("b", c.obj, c.key, bad)
    # sozud must not apply the bad state, and repairs the shared key from its live state and base
    await wait_until(lambda: (c.shared_value("b") or b"").count(b"\0") == records, what="the shared key to be repaired")
    await settled(c)
    for n in c.nodes:
        assert n.live_file() == expected, f"{n.name} lost objects after a {corrupt} shared state"


async def test_mixed_fleet_is_refused(tmp_path: Path) -> None:
    cluster = await SimCluster.create(["a", "b"], version="2.1.0", versions={"b": "1.1.1"})
    try:
        await cluster.node("a").request(cluster_req("app"))
        a, b = cluster.node("a"), cluster.node("b")
        await a.start_daemon()
        await wait_until(lambda: cluster.shared_value() is not None, what="a to bootstrap the shared state")
        before = b.live_file()
        await b.start_daemon()
        await wait_until(
            lambda: b.daemon is not None and isinstance(b.daemon.last_error, VersionMismatchError),
            what="b to refuse the 2.x state",
        )
        assert "mixed fleet" in str(b.daemon.last_error) if b.daemon else False
        assert b.live_file() == before
    finally:
        await cluster.stop()


# --- sozud --once against the simulators ---------------------------------------------------------


async def _once_env(tmp_path: Path, version: str = "2.1.0") -> tuple[FakeSozu, FakeOpenSVCCluster, list[str]]:
    sozu = FakeSozu(str(tmp_path / "s.sock"), version)
    await sozu.start()
    opensvc = FakeOpenSVCCluster()
    opensvc.create_object("igw/cfg/sozu")
    agent = opensvc.agent("n1", tmp_path / "osvc")
    await agent.start()
    args = [
        "--once",
        "--socket",
        str(tmp_path / "s.sock"),
        "--api",
        f"unix://{agent.lsnr_sock}",
        "--state-dir",
        str(tmp_path / "state"),
        "--node",
        "n1",
        "--log-level",
        "error",
    ]
    return sozu, opensvc, args


def _run_main_in_thread(args: list[str]) -> int:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(main, args).result()


def _valid_mid_state() -> bytes:
    """The captured 02-mid state without the scenario's deliberate failures (objects on 127.0.0.1:21099,
    where no listener exists, which real sozu's workers refuse)."""
    from sozud.state.codec import parse_state_file, write_state_file

    state = parse_state_file((FIXTURES / "sozu-2.1.0/states/02-mid.state").read_bytes(), source="02-mid")
    for key in [k for k in state if any("127.0.0.1:21099" in part for part in k)]:
        del state[key]
    return write_state_file(state)


async def test_once_converges_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    from sozud.state.codec import parse_state_file

    sozu, opensvc, args = await _once_env(tmp_path)
    desired = _valid_mid_state()
    opensvc.set_value("n1", "igw/cfg/sozu", "state.json", desired)
    rc = await asyncio.to_thread(main, args)
    assert rc == 0, capsys.readouterr().err
    assert "in sync" in capsys.readouterr().out
    assert parse_state_file(sozu.state.generate_state_file(), source="live") == parse_state_file(
        desired, source="desired"
    )
    # a second run finds nothing to do
    before = mutation_count(sozu)
    assert await asyncio.to_thread(main, args) == 0
    assert mutation_count(sozu) == before
    await sozu.stop()


async def test_once_reports_the_refused_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    sozu, opensvc, args = await _once_env(tmp_path)
    state = (FIXTURES / "sozu-2.1.0/states/00-initial.state").read_bytes()
    extra = (
        b'{"id":"SAVE-9","content":{"request_type":{"ADD_CLUSTER":{"cluster_id":"refused-app",'
        b'"sticky_session":false,"https_redirect":false,"proxy_protocol":null,"load_balancing":0,'
        b'"answer_503":null,"load_metric":null,"http2":null,"answers":{},"https_redirect_port":null,'
        b'"authorized_hashes":[],"www_authenticate":null,"max_connections_per_ip":null,"retry_after":null,'
        b'"health_check":null,"udp":null}}}}\n\0'
    )
    opensvc.set_value("n1", "igw/cfg/sozu", "state.json", state + extra)
    for _ in range(10):
        sozu.refuse_next("add_cluster", "simulated worker failure")
    rc = await asyncio.to_thread(main, args)
    err = capsys.readouterr().err
    assert rc == 1
    assert "add_cluster" in err and "refused-app" in err and "simulated worker failure" in err
    await sozu.stop()


# --- waking the v2 agent's monitor (issue 13) ----------------------------------------------------------


async def test_a_change_reaches_the_peers_without_waiting_for_the_agents_monitor_loop() -> None:
    """The v2 agent replicates an API write at its monitor's next loop (10-15 s); sozud wakes it after
    each push. The loop here never comes during the test: only the wake can carry the change."""
    cluster = await SimCluster.create(["a", "b", "c"], monitor_interval_s=3600.0)
    try:
        await cluster.node("a").request(listener_req("2.1.0"))
        await cluster.start()
        await settled(cluster)
        a = cluster.node("a")
        await a.request(cluster_req("woken"))
        await a.request(backend_req("woken", "woken-0", "10.0.0.9:80"))
        for n in cluster.nodes:
            await wait_until(lambda n=n: b'"woken"' in n.live_file(), what=f"the change to reach {n.name}")
        wakes = [r for r in a.agent.requests if r.action == "POST wake_monitor"]
        assert wakes and all(r.path == cluster.obj for r in wakes)
        assert a.daemon is not None and a.daemon.metrics.wakes.get(outcome="ok") >= 1
    finally:
        await cluster.stop()


async def test_a_failed_wake_is_counted_and_never_fails_the_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    from sozud._om.v2 import V2Transport
    from sozud.errors import OpenSVCAuthError

    async def refused(self: V2Transport, obj: str, reason: str) -> bool:
        raise OpenSVCAuthError("operator role required", transport=self.name, obj=obj)

    monkeypatch.setattr(V2Transport, "wake_monitor", refused)
    cluster = await SimCluster.create(["a"], monitor_interval_s=3600.0)
    try:
        a = cluster.node("a")
        await a.request(cluster_req("app"))
        await cluster.start()
        assert a.daemon is not None
        d = a.daemon
        await wait_until(lambda: cluster.shared_value() is not None and d.syncs_attempted >= 1, what="a push")
        await wait_until(lambda: d.metrics.wakes.get(outcome="failed") >= 1, what="the failed wake counted")
        assert d.metrics.sync_failures.get(error="OpenSVCAuthError") == 0
        assert d.last_error is None
    finally:
        await cluster.stop()


# --- TLS private keys: never in a cfg object by default; a sec object carries them (issue 12) ----------


def _tls_state() -> bytes:
    return (FIXTURES / "sozu-2.1.0/states/01-populated.state").read_bytes()  # five certificates and keys


async def test_certificates_are_synced_through_a_sec_object() -> None:
    cluster = await SimCluster.create(["a", "b"], obj="igw/sec/sozu")
    try:
        a, b = cluster.node("a"), cluster.node("b")
        for n in cluster.nodes:
            n.config.sozu.shared_dir = str(n.dir)  # exact live reads: this fixture holds objects queries cannot see
        a.sozu.state.load_state_file(_tls_state(), source="fixture")
        await cluster.start()

        def same() -> bool:  # as states: the simulator's file order of certificates varies
            live_b = parse_state_file(b.live_file(), source="b", allow_empty=True)
            return live_b == parse_state_file(a.live_file(), source="a")

        await wait_until(same, what="the certificates to reach b")
        shared = cluster.shared_value()
        assert shared is not None and b"PRIVATE KEY" in shared
        assert b"PRIVATE KEY" in b.live_file()
    finally:
        await cluster.stop()


async def test_private_keys_are_never_written_to_a_cfg_object_by_default() -> None:
    cluster = await SimCluster.create(["a"])
    try:
        a = cluster.node("a")
        a.sozu.state.load_state_file(_tls_state(), source="fixture")
        await cluster.start()
        d = a.daemon
        assert d is not None
        await wait_until(lambda: d.metrics.sync_failures.get(error="OpenSVCRefusedError") >= 1, what="a refusal")
        assert cluster.shared_value() is None, "nothing may be written to the cfg object"
        assert d.status.last_error is not None and "sec object" in d.status.last_error
        assert "MII" not in d.status.last_error
    finally:
        await cluster.stop()


# --- an unusable shared key: status says what to do, `sozud push --from-live` repairs it (issue 12) -----


def _settings_argv(node_config: object) -> list[str]:
    from sozud.config import Config

    assert isinstance(node_config, Config)
    c = node_config
    return [
        *("--socket", c.sozu.socket, "--sozu-version", c.sozu.version, "--api", c.opensvc.api or ""),
        *("--object", c.opensvc.object, "--key", c.opensvc.key, "--node", c.node, "--state-dir", c.sync.state_dir),
        *("--log-level", "error", "--layout", c.opensvc.layout),
    ]


@pytest.mark.parametrize(
    ("layout", "key_suffix", "bad"),
    [
        ("plain", "", b'{"id":"SAVE-0","content":' + b"[" * 1000 + b"]" * 1000 + b"}\n\0"),  # nested 1,000 deep
        ("plain", "", b'{"id":"SAVE-0","content":{"request_type":{"ADD_CLUS'),  # a cut record
        ("plain", "", (FIXTURES / "sozu-0.15.19/states/01-populated.state").read_bytes()),  # 0.15 in a 2.x fleet
        ("sharded", ".manifest", b'{"format":2,"shards":' + b"[" * 1000 + b"\n"),  # a mangled manifest
    ],
    ids=["deep", "cut", "foreign", "manifest"],
)
async def test_an_unusable_shared_key_is_repaired_with_push_from_live(
    layout: str, key_suffix: str, bad: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = await SimCluster.create(["a", "b"], settings={"layout": layout})
    try:
        a, b = cluster.node("a"), cluster.node("b")
        await a.request(listener_req("2.1.0"))
        await a.request(cluster_req("app"))
        await cluster.start()
        await settled(cluster)
        cluster.opensvc.set_value("a", cluster.obj, cluster.key + key_suffix, bad)
        for n in cluster.nodes:
            d = n.daemon
            assert d is not None
            await wait_until(lambda d=d: d.status.action is not None, what=f"{n.name} to report the bad key")
            assert "sozud push --from-live" in d.status.action
        # the cluster is blocked, nothing was applied from the bad key; the operator repairs from node a
        await a.request(cluster_req("after-repair"))
        rc = await asyncio.to_thread(main, ["push", "--from-live", *_settings_argv(a.config)])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert "pushed this node's live state" in out
        await wait_until(lambda: b'"after-repair"' in b.live_file(), what="b to apply the repaired state")
        assert b'"app"' in b.live_file()
    finally:
        await cluster.stop()


async def test_push_from_live_keeps_the_removal_valve(capsys: pytest.CaptureFixture[str]) -> None:
    cluster = await SimCluster.create(["a"])
    try:
        a = cluster.node("a")
        await a.request(listener_req("2.1.0"))
        for i in range(4):
            await a.request(cluster_req(f"c{i}"))
        await cluster.start()
        await settled(cluster)
        await a.stop_daemon()
        for i in range(4):
            await a.request(pb.Request(remove_cluster=f"c{i}"))
        argv = ["push", "--from-live", *_settings_argv(a.config)]
        assert await asyncio.to_thread(main, argv) == 3
        assert "max_removal_ratio" in capsys.readouterr().err
        assert await asyncio.to_thread(main, [*argv, "--force"]) == 0
        shared = cluster.shared_value()
        assert shared is not None and b'"c0"' not in shared
    finally:
        await cluster.stop()
