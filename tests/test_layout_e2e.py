"""The sharded layout end to end, on simulated agents that cost what the real v2 agent costs (issue 11).

1,000 clusters (one backend and one HTTP frontend each) in the first layout (one plain key), three nodes:
the state is migrated, a change on node a reaches b and c, and no sync fails. The agents' cost is the
real one scaled by three (REAL_V2 x 3, so a 1 MB object costs what a 3 MB one cost on the real agent):
with the plain key every write then takes ~0.7 s and leaves the agent slow for ~3 s. ``SOZUD_LAYOUT_E2E
_CLUSTERS=10000`` runs the same scenario at the real cost on 10,000 clusters (minutes).
"""

from __future__ import annotations

import os

from structlog.testing import capture_logs

from sozud.proto import command_pb2 as pb
from sozud.state.codec import write_state_file
from sozud.testing import builders as build
from sozud.testing._fake_opensvc_cost import REAL_V2, AgentCost
from sozud.testing.cluster import SimCluster, wait_until

CLUSTERS = int(os.environ.get("SOZUD_LAYOUT_E2E_CLUSTERS", "1000"))
SCALE = float(os.environ.get("SOZUD_LAYOUT_E2E_COST_SCALE", "3"))  # x REAL_V2: a 1 MB object costs like 3 MB
LAYOUT = os.environ.get("SOZUD_LAYOUT_E2E_LAYOUT", "sharded")  # "plain": the first layout, for comparison


def _state(clusters: int) -> bytes:
    return write_state_file(build.fleet_state(clusters, listener="127.0.0.1:18080"))


async def test_a_large_state_is_migrated_and_a_change_reaches_the_others_on_a_slow_agent() -> None:
    cost = AgentCost(
        write_s_per_mb=REAL_V2.write_s_per_mb * SCALE,
        busy_s_per_mb=REAL_V2.busy_s_per_mb * SCALE,
        busy_request_s_per_mb=REAL_V2.busy_request_s_per_mb * SCALE,
        serialise_raw=True,
    )
    settings: dict[str, object] = {"shared_dir": None, "layout": LAYOUT}  # the default request timeout
    cluster = await SimCluster.create(["a", "b", "c"], settings=settings, cost=cost)
    data = _state(CLUSTERS)
    try:
        for n in cluster.nodes:
            n.config.sozu.shared_dir = str(n.dir)  # one SaveState per live read
            n.sozu.state.load_state_file(data, source="bench")
        cluster.opensvc.set_value("a", cluster.obj, cluster.key, data)  # the first layout, as the old way wrote it
        await cluster.opensvc.settle()
        with capture_logs() as logs:
            await cluster.start()
            a = cluster.node("a")
            await a.request(pb.Request(add_cluster=build.cluster("after-migration")))
            for n in cluster.nodes:
                await wait_until(
                    lambda n=n: "after-migration" in n.sozu.state.clusters, timeout_s=300, what=f"{n.name} to get it"
                )
        events = [e["event"] for e in logs]
        assert "shared.migrated" in events or LAYOUT == "plain"
        failed = [e for e in logs if e["event"] == "sync.failed"]
        assert not failed, f"syncs failed: {[e.get('error') for e in failed][:3]}"
        d = cluster.node("a").daemon
        assert d is not None and d.metrics.agent_requests.get(operation="put") >= 2  # a shard and the manifest
        assert d.metrics.agent_seconds.get(operation="put") > 0, "the agent's latency is measured"
        manifest = cluster.opensvc.value("a", cluster.obj, cluster.key + ".manifest")
        assert manifest is not None or LAYOUT == "plain"
        shared = cluster.shared_value()
        assert shared is not None and b"after-migration" in shared
    finally:
        await cluster.stop()
