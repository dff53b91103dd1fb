"""The daemon's life cycle: graceful stop with an apply in progress, configuration reload, sd_notify."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import log_events

from sozud.config import Config, with_settings
from sozud.daemon import Daemon, run_daemon
from sozud.errors import ConfigError
from sozud.proto import command_pb2 as pb
from sozud.sdnotify import Notifier
from sozud.testing import builders as build
from sozud.testing.cluster import SimCluster, SimNode, wait_until


async def test_stop_lets_the_apply_in_progress_finish() -> None:
    cluster = await SimCluster.create(["a", "b"])
    a, b = cluster.node("a"), cluster.node("b")
    try:
        await a.request(pb.Request(add_http_listener=build.http_listener("127.0.0.1:18080")))
        await cluster.start()
        await wait_until(lambda: b.live_file() == a.live_file(), what="initial sync")
        # b's sozu holds the add_cluster request (as a slow sozu would) until the gate opens
        entered, gate = asyncio.Event(), asyncio.Event()
        original = b.sozu._worker_request

        async def slow_add_cluster(conn: Any, kind: str, req: pb.Request) -> None:
            if kind == "add_cluster":
                entered.set()
                await gate.wait()
            await original(conn, kind, req)

        b.sozu._worker_request = slow_add_cluster  # type: ignore[method-assign]
        await a.request(pb.Request(add_cluster=build.cluster("late")))
        await asyncio.wait_for(entered.wait(), timeout=30)
        assert b.daemon is not None and b.task is not None
        b.daemon.request_stop()  # SIGTERM while b's sozu is processing our request
        await asyncio.sleep(0)
        assert not b.task.done(), "the daemon must not stop in the middle of an apply"
        gate.set()
        await asyncio.wait_for(b.task, timeout=30)
        assert "late" in b.sozu.state.clusters
        assert b.daemon.last_report is not None and b.daemon.last_error is None
    finally:
        await cluster.stop()


async def test_reload_applies_new_settings_and_keeps_old_ones_when_invalid(tmp_path: Path) -> None:
    cluster = await SimCluster.create(["a"])
    node = cluster.node("a")
    try:
        await node.request(pb.Request(add_cluster=build.cluster("c")))
        configs: list[Config | Exception] = []

        def reload_config() -> Config:
            item = configs.pop(0)
            if isinstance(item, Exception):
                raise item
            return item

        daemon = Daemon(node.config, reload_config=reload_config)
        await daemon.start()
        task = asyncio.create_task(daemon.run())
        await wait_until(lambda: daemon.last_report is not None, what="first sync")
        new_state_dir = str(tmp_path / "new-state")
        configs.append(with_settings(node.config, state_dir=new_state_dir, max_removal_ratio=0.2))
        marks = daemon.syncs_attempted
        daemon.request_reload()
        await wait_until(lambda: daemon.syncs_attempted > marks, what="a sync after the reload")
        assert daemon.config.sync.state_dir == new_state_dir and daemon.config.sync.max_removal_ratio == 0.2
        assert (Path(new_state_dir) / "status.json").exists()
        configs.append(ConfigError("configuration key 'poll_interval_s': must be > 0"))
        marks = daemon.syncs_attempted
        daemon.request_reload()
        await wait_until(lambda: daemon.syncs_attempted > marks, what="a sync after the failed reload")
        assert daemon.config.sync.state_dir == new_state_dir, "a bad reload must keep the running configuration"
        daemon.request_stop()
        await task
        await daemon.stop()
    finally:
        await cluster.stop()


async def _http_get(address: str, path: str) -> bytes:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def _reload(daemon: Daemon, configs: list[Config], config: Config) -> None:
    configs.append(config)
    marks = daemon.syncs_attempted
    daemon.request_reload()
    await wait_until(lambda: daemon.syncs_attempted > marks, what="a sync after the reload")


@contextlib.asynccontextmanager
async def _reloadable_daemon() -> AsyncIterator[tuple[Daemon, list[Config], SimCluster]]:
    """A running daemon on one simulated node, after its first sync; it reloads the configs appended to
    the list it yields."""
    cluster = await SimCluster.create(["a"])
    node = cluster.node("a")
    configs: list[Config] = []
    daemon = Daemon(node.config, reload_config=lambda: configs.pop(0))
    task: asyncio.Task[None] | None = None
    try:
        await node.request(pb.Request(add_cluster=build.cluster("c")))
        await daemon.start()
        task = asyncio.create_task(daemon.run())
        await wait_until(lambda: daemon.last_report is not None, what="first sync")
        yield daemon, configs, cluster
        daemon.request_stop()
        await task
    finally:
        if task is not None and not task.done():
            task.cancel()
        await daemon.stop()
        await cluster.stop()


async def test_reload_serves_a_new_metrics_address(capsys: pytest.CaptureFixture[str]) -> None:
    async with _reloadable_daemon() as (daemon, configs, _):
        capsys.readouterr()
        await _reload(daemon, configs, with_settings(daemon.config, metrics_address="127.0.0.1:0"))
        events = log_events(capsys.readouterr().err)
        serving = [e["address"] for e in events if e["event"] == "metrics.serving"]
        assert len(serving) == 1, "the new metrics_address is not served"
        assert b"sozud_" in await _http_get(serving[0], "/metrics")
        reloaded = [e for e in events if e["event"] == "config.reloaded"]
        assert len(reloaded) == 1, events
        assert reloaded[0]["applied"] == ["metrics_address"] and "not_applied" not in reloaded[0]


async def test_reload_applies_the_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    async with _reloadable_daemon() as (daemon, configs, cluster):
        await _reload(daemon, configs, with_settings(daemon.config, log_level="error"))
        capsys.readouterr()
        await cluster.node("a").request(pb.Request(add_cluster=build.cluster("quiet")))
        await wait_until(lambda: b"quiet" in (cluster.shared_value() or b""), what="a push after the reload")
        events = log_events(capsys.readouterr().err)
        assert events == [], "events below log_level = error were written after the reload"


async def test_reload_rebuilds_only_the_connection_whose_settings_changed() -> None:
    async with _reloadable_daemon() as (daemon, configs, cluster):
        assert daemon.components is not None
        channel, om = daemon.components.channel, daemon.components.om

        await _reload(daemon, configs, with_settings(daemon.config, log_level="error", max_rounds=4))
        assert daemon.components.channel is channel, "the sozu connection was rebuilt, its settings did not change"
        assert daemon.components.om is om, "the OpenSVC client was rebuilt, its settings did not change"
        engine = daemon.components.engine
        await _reload(daemon, configs, with_settings(daemon.config, log_level="warning"))
        assert daemon.components.engine is engine, "the engine was rebuilt (forgetting the pushes it remembers)"

        await _reload(daemon, configs, with_settings(daemon.config, sozu_version="auto"))
        assert daemon.components.channel is not channel and daemon.components.om is om
        assert daemon.last_error is None, daemon.last_error
        channel = daemon.components.channel

        await _reload(daemon, configs, with_settings(daemon.config, opensvc_poll_interval_s=0.2))
        assert daemon.components.channel is channel and daemon.components.om is not om
        assert daemon.last_error is None, daemon.last_error

        await cluster.node("a").request(pb.Request(add_cluster=build.cluster("after-reloads")))
        await wait_until(lambda: b"after-reloads" in (cluster.shared_value() or b""), what="a push after the reloads")


async def test_ready_and_status_are_notified_to_systemd(tmp_path: Path) -> None:
    cluster = await SimCluster.create(["a"])
    node = cluster.node("a")
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    messages: list[bytes] = []
    try:
        await node.request(pb.Request(add_cluster=build.cluster("c")))
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
        daemon = Daemon(node.config, notifier=notifier)
        runner = asyncio.create_task(run_daemon(daemon))

        async def received(text: bytes) -> bool:
            with contextlib.suppress(TimeoutError, BlockingIOError):
                while True:
                    messages.append(await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout=0.05))
            return any(text in m for m in messages)

        await wait_until(lambda: received(b"READY=1"), what="READY=1")
        await wait_until(lambda: received(b"WATCHDOG=1"), what="WATCHDOG=1")
        await wait_until(lambda: received(b"STATUS=in sync"), what="STATUS after the first sync")
        daemon.request_stop()
        await runner
        assert await received(b"STOPPING=1")
    finally:
        sock.close()
        await cluster.stop()


@asynccontextmanager
async def one_node_in_sync(first_cluster: str) -> AsyncIterator[tuple[SimCluster, SimNode, Daemon]]:
    """One node whose sozu holds ``first_cluster``, after its bootstrap push (no periodic re-sync)."""
    cluster = await SimCluster.create(["a"], settings={"resync_interval_s": 3600.0})
    node = cluster.node("a")
    try:
        await node.request(pb.Request(add_cluster=build.cluster(first_cluster)))
        await cluster.start()
        assert node.daemon is not None
        await wait_until(lambda: cluster.shared_value() is not None, what="bootstrap")
        yield cluster, node, node.daemon
    finally:
        await cluster.stop()


async def test_a_change_made_during_a_sync_triggers_the_next_one() -> None:
    async with one_node_in_sync("first") as (cluster, node, daemon):
        assert daemon.components is not None
        adapter = daemon.components.sozu
        real_read = adapter.read_live
        changed = asyncio.Event()

        async def read_then_operator_changes_sozu(**kwargs: Any) -> Any:
            state = await real_read(**kwargs)
            if not changed.is_set():  # right after this sync's read, an operator adds a cluster
                changed.set()
                assert node.sozu.state.dispatch(pb.Request(add_cluster=build.cluster("during"))) is None
            return state

        adapter.read_live = read_then_operator_changes_sozu  # type: ignore[method-assign]
        daemon.trigger("test")
        await asyncio.wait_for(changed.wait(), timeout=30)
        # the change was not in the state that sync read; the probe loop must still see it as new
        await wait_until(lambda: b'"during"' in (cluster.shared_value() or b""), what="the change to be pushed")


async def test_a_refused_plan_is_reported_once_and_status_says_what_to_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cluster = await SimCluster.create(["a"])
    node = cluster.node("a")
    try:
        await node.request(pb.Request(add_http_listener=build.http_listener("127.0.0.1:18080")))
        for i in range(4):
            await node.request(pb.Request(add_cluster=build.cluster(f"c{i}")))
        await cluster.start()
        d = node.daemon
        assert d is not None
        await wait_until(lambda: (node.dir / "state" / "base.meta.json").exists(), what="a base")
        for i in range(3):  # a local mass removal: pushing it is refused by the valve
            await node.request(pb.Request(remove_cluster=f"c{i}"))
        await wait_until(lambda: d.metrics.sync_failures.get(error="UnsafePlanError") >= 1, what="a refusal")
        for _ in range(3):  # the same refusal again, several times
            mark = d.syncs_attempted
            d.trigger("test")
            await wait_until(lambda mark=mark: d.syncs_attempted > mark, what="another sync")
        assert d.metrics.sync_failures.get(error="UnsafePlanError") >= 4
        err = capsys.readouterr().err
        assert err.count('"sync.refused"') == 1, "a refusal that does not change must be reported once"
        status = msgspec.json.decode((node.dir / "state" / "status.json").read_bytes())
        assert "--force" in status["action"] and "max_removal_ratio" in status["last_error"]
    finally:
        await cluster.stop()


async def test_a_burst_of_agent_events_is_read_once_not_once_per_event() -> None:
    """After a push, the agent sends every node an event per key written (16 shards and a manifest):
    each node must read the shared state once for the burst, not once per event (issue 11: no read
    storm on a loaded agent)."""
    cluster = await SimCluster.create(["a", "b"], settings={"resync_interval_s": 3600.0})
    a, b = cluster.node("a"), cluster.node("b")
    try:
        await a.request(pb.Request(add_cluster=build.cluster("first")))
        await cluster.start()
        await wait_until(lambda: "first" in b.sozu.state.clusters, what="b to get the first cluster")
        assert b.daemon is not None
        syncs = b.daemon.syncs_attempted
        served = len(b.agent.requests)
        for i in range(20):  # a burst of writes by another node, each one an event on b's agent
            cluster.opensvc.set_value("a", cluster.obj, f"unrelated{i}", b"x\n")
        await cluster.opensvc.settle()  # every event has landed on b's agent and been sent to b
        b.daemon.trigger("after_the_burst")  # coalesces with the burst's triggers when they coalesce
        # last_reason is set when a sync starts, syncs_attempted when it ends: wait for both
        await wait_until(
            lambda: (
                b.daemon is not None
                and "after_the_burst" in (b.daemon.status.last_reason or "")
                and b.daemon.syncs_attempted > syncs
            ),
            what="b to finish a sync after the burst",
        )
        manifest_reads = [
            r for r in b.agent.requests[served:] if r.action == "GET key" and r.key == cluster.key + ".manifest"
        ]
        assert 1 <= len(manifest_reads) <= 3, f"{len(manifest_reads)} reads for a burst of 20 events"
    finally:
        await cluster.stop()


async def test_a_sozu_restart_is_logged_once_and_resyncs(capsys: pytest.CaptureFixture[str]) -> None:
    async with one_node_in_sync("c") as (_cluster, node, d):
        capsys.readouterr()
        await node.sozu.restart(empty=False)
        await wait_until(lambda: d.metrics.reconnects.get() >= 1, what="the reconnection")
        await wait_until(lambda: "sozu_reconnected" in (d.status.last_reason or ""), what="the re-sync it triggers")
        records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        reconnected = [r for r in records if r["event"] == "sozu.reconnected"]
        assert len(reconnected) == 1, f"one reconnection, logged {len(reconnected)} times: {reconnected}"
        assert reconnected[0]["epoch"] == 2
