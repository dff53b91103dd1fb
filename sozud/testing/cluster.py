"""A simulated cluster for tests, benchmarks and the demo: per node a SIMULATED sozu and a real sozud.

Each :class:`SimNode` runs the production daemon (:class:`sozud.daemon.Daemon`, built from a normal
:class:`sozud.config.Config`) against a simulated sozu (:mod:`sozud.testing.fake_sozu`) and a simulated
OpenSVC agent (:mod:`sozud.testing.fake_opensvc`); all agents share one store, like the cluster's
replicated config maps. Nothing here is meant for production: it exists so the sync can be exercised
end to end on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sozud.config import Config, config_from_settings
from sozud.daemon import Daemon
from sozud.proto import command_pb2 as pb
from sozud.testing._fake_opensvc_cost import AgentCost
from sozud.testing.fake_opensvc import FakeAgent, FakeOpenSVCCluster
from sozud.testing.fake_sozu import FakeSozu
from sozud.versions import STORED_REQUESTS, SozuVersion

MUTATIONS = STORED_REQUESTS | {"load_state"}


def mutation_count(sozu: FakeSozu) -> int:
    """Mutation requests the simulated sozu processed (queries excluded)."""
    return sum(1 for r in sozu.requests if r.WhichOneof("request_type") in MUTATIONS)


@dataclass
class SimNode:
    name: str
    dir: Path
    sozu: FakeSozu
    agent: FakeAgent
    config: Config
    daemon: Daemon | None = None
    task: asyncio.Task[None] | None = None

    async def start_daemon(self) -> None:
        self.daemon = Daemon(self.config)
        await self.daemon.start()
        self.task = asyncio.create_task(self.daemon.run())

    async def stop_daemon(self) -> None:
        if self.daemon is None:
            return
        self.daemon.request_stop()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.daemon.stop()
        self.daemon = None
        self.task = None

    async def request(self, req: pb.Request) -> None:
        """Change this node's sozu directly, as an operator's `sozu` CLI would (via the simulator's state)."""
        err = self.sozu.state.dispatch(req)
        if err is not None:
            raise AssertionError(f"simulated sozu on {self.name} refused {req.WhichOneof('request_type')}: {err}")

    def live_file(self) -> bytes:
        return self.sozu.state.generate_state_file()


@dataclass
class SimCluster:
    """N simulated nodes sharing one simulated OpenSVC store."""

    version: SozuVersion
    opensvc: FakeOpenSVCCluster
    nodes: list[SimNode] = field(default_factory=list)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sz")))
    obj: str = "igw/cfg/sozu"
    key: str = "state.json"

    @classmethod
    async def create(
        cls,
        names: list[str],
        *,
        version: str = "2.1.0",
        root: Path | None = None,
        replication_delay_s: float = 0.0,
        monitor_interval_s: float = 15.0,
        settings: dict[str, Any] | None = None,
        versions: dict[str, str] | None = None,
        obj: str = "igw/cfg/sozu",
        cost: AgentCost | None = None,
    ) -> SimCluster:
        opensvc = FakeOpenSVCCluster(
            replication_delay_s=replication_delay_s, monitor_interval_s=monitor_interval_s, cost=cost
        )
        cluster = cls(SozuVersion.parse(version), opensvc, obj=obj)
        if root is not None:
            cluster.root = root
        opensvc.create_object(cluster.obj)
        for name in names:
            d = cluster.root / name
            d.mkdir(parents=True, exist_ok=True)
            node_version = (versions or {}).get(name, version)
            sozu = FakeSozu(str(d / "s.sock"), node_version, worker_timeout_s=0.2)
            await sozu.start()
            agent = opensvc.agent(name, d / "osvc")
            await agent.start()
            base: dict[str, Any] = {
                "socket": str(d / "s.sock"),
                "sozu_version": node_version,
                "api": f"unix://{agent.lsnr_sock}",
                "node": name,
                "state_dir": str(d / "state"),
                "object": cluster.obj,
                "key": cluster.key,
                "poll_interval_s": 0.05,
                "opensvc_poll_interval_s": 0.1,
                "resync_interval_s": 30.0,
                "debounce_ms": 10,
                "max_wait_ms": 200,
                "retry_max_s": 0.5,
                "request_timeout_s": 5.0,
                "log_level": "warning",
            }
            base.update(settings or {})
            cluster.nodes.append(SimNode(name, d, sozu, agent, config_from_settings(base)))
        return cluster

    def node(self, name: str) -> SimNode:
        return next(n for n in self.nodes if n.name == name)

    async def start(self) -> None:
        for n in self.nodes:
            await n.start_daemon()

    async def stop(self) -> None:
        for n in self.nodes:
            await n.stop_daemon()
        for n in self.nodes:
            with contextlib.suppress(Exception):
                await n.agent.stop()
            with contextlib.suppress(Exception):
                await n.sozu.stop()

    async def __aenter__(self) -> SimCluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def shared_value(self, node: str | None = None) -> bytes | None:
        """The shared state as a plain state file, as ``node`` (default: the first) holds it: reassembled
        from the sharded layout's manifest and shards, else the plain key."""
        import msgspec

        from sozud.layout import Manifest, assemble, decode_shard
        from sozud.state.codec import MAX_STATE_BYTES

        name = node or self.nodes[0].name
        manifest = self.opensvc.value(name, self.obj, self.key + ".manifest")
        if manifest is None:
            return self.opensvc.value(name, self.obj, self.key)
        files = []
        for ref in msgspec.json.decode(manifest, type=Manifest).shards:
            value = self.opensvc.value(name, self.obj, ref.key)
            if value is None:
                return None
            files.append(decode_shard(value, source=ref.key, max_bytes=MAX_STATE_BYTES))
        return assemble(files)


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], *, timeout_s: float = 20.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until true; AssertionError naming ``what`` after ``timeout_s`` (a deadline, not a sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for: {what}")
        await asyncio.sleep(0.01)
