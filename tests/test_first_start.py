"""First start under an impatient operator (issue 8): every daemon starts at once against an empty (or an
existing) shared key, and operators change live sozu right away, after a random delay, on several nodes.

Each seeded run starts 2 or 3 real daemons on simulated sozus (2.1.0, 1.1.1 and 0.15 in turn) and a
simulated OpenSVC agent, changes live sozu after ``uniform(0, 2 s) * TIME_SCALE`` on each node, then
waits (a deadline, not a sleep) for every node's live sozu and the shared key to hold exactly the union of
what the nodes started with and what their operators added. It also checks that no sync was refused.

The harness runs the daemons with short intervals (poll 50 ms, debounce 10 ms instead of 5 s and
300 ms), so the operator's delay is scaled by the same kind of factor (``TIME_SCALE``, default 0.1) to
keep the races of a real start: the change lands before, during or after the bootstrap pushes. Runs go
several at a time. ``SOZUD_FIRST_START_RUNS`` (default 200 per node count) and
``SOZUD_FIRST_START_TIME_SCALE`` (1.0 = real 0-2 s delays) change the load.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field

import pytest

from sozud.proto import command_pb2 as pb
from sozud.state.codec import parse_state_file
from sozud.state.model import ConfigState
from sozud.testing import builders as build
from sozud.testing.cluster import SimCluster, SimNode, wait_until
from sozud.versions import SozuVersion

RUNS = int(os.environ.get("SOZUD_FIRST_START_RUNS", "200"))
TIME_SCALE = float(os.environ.get("SOZUD_FIRST_START_TIME_SCALE", "0.1"))
LOG_LEVEL = os.environ.get("SOZUD_FIRST_START_LOG_LEVEL", "warning")
CONCURRENT_RUNS = int(os.environ.get("SOZUD_FIRST_START_CONCURRENCY", "10"))
VERSIONS = ["2.1.0", "1.1.1", "0.15"]
LISTENER = "127.0.0.1:18080"


@dataclass
class Scenario:
    """What one seeded run does, drawn before anything starts."""

    seed: int
    nodes: list[str]
    version: str
    initial: dict[str, list[pb.Request]] = field(default_factory=dict)
    shared_initial: list[pb.Request] = field(default_factory=list)
    delay_s: dict[str, float] = field(default_factory=dict)
    changes: dict[str, list[pb.Request]] = field(default_factory=dict)

    @classmethod
    def draw(cls, seed: int, n_nodes: int) -> Scenario:
        rng = random.Random(seed * 10 + n_nodes)
        names = ["a", "b", "c"][:n_nodes]
        sc = cls(seed, names, VERSIONS[seed % len(VERSIONS)])
        for name in names:
            reqs = [_listener(sc.version)]
            # Some nodes start with objects of their own (e.g. a sozu that was configured by hand).
            for i in range(rng.randrange(0, 3)):
                reqs += _app(f"init-{name}-{i}", rng)
            sc.initial[name] = reqs
            sc.delay_s[name] = rng.uniform(0.0, 2.0) * TIME_SCALE
            # The operator's burst: a few clusters with backends and a frontend (0 on some nodes).
            sc.changes[name] = [r for i in range(rng.randrange(0, 4)) for r in _app(f"op-{name}-{i}", rng)]
        if rng.random() < 0.3:
            # An existing cluster's key, from nodes whose sozud state was lost (no base anywhere).
            sc.shared_initial = [_listener(sc.version), *_app("shared-0", rng)]
        return sc


def _listener(version: str) -> pb.Request:
    return pb.Request(add_http_listener=build.http_listener(LISTENER, version=SozuVersion.parse(version)))


def _app(cid: str, rng: random.Random) -> list[pb.Request]:
    reqs = [pb.Request(add_cluster=build.cluster(cid))]
    for j in range(rng.randrange(1, 3)):
        reqs.append(pb.Request(add_backend=build.backend(cid, f"{cid}-{j}", f"10.{rng.randrange(256)}.0.{j + 1}:80")))
    reqs.append(pb.Request(add_http_frontend=build.http_frontend(cid, LISTENER, f"{cid}.example.test")))
    return reqs


def expected_union(sc: Scenario) -> ConfigState:
    """The union, computed on a separate simulated sozu from the scenario's own requests."""
    from sozud.testing._sozu_state import SozuMainState

    ref = SozuMainState(SozuVersion.parse(sc.version))
    seen: set[bytes] = set()
    for reqs in [sc.shared_initial, *sc.initial.values(), *sc.changes.values()]:
        for r in reqs:
            wire = r.SerializeToString(deterministic=True)
            if wire not in seen:
                seen.add(wire)
                assert ref.dispatch(r) is None
    return parse_state_file(ref.generate_state_file(), SozuVersion.parse(sc.version), source="expected")


def live_state(node: SimNode, version: str) -> ConfigState:
    return parse_state_file(node.live_file(), SozuVersion.parse(version), source=f"{node.name} live")


async def run_scenario(sc: Scenario) -> None:
    cluster = await SimCluster.create(sc.nodes, version=sc.version, settings={"log_level": LOG_LEVEL})
    try:
        for name, reqs in sc.initial.items():
            for r in reqs:
                await cluster.node(name).request(r)
        if sc.shared_initial:
            seed_state = expected_union(Scenario(sc.seed, [], sc.version, shared_initial=sc.shared_initial))
            from sozud.state.codec import write_state_file

            cluster.opensvc.set_value(sc.nodes[0], cluster.obj, cluster.key, write_state_file(seed_state))
        await asyncio.gather(*(n.start_daemon() for n in cluster.nodes))

        async def operator(name: str) -> None:
            await asyncio.sleep(sc.delay_s[name])  # the operator's timing, part of the scenario
            for r in sc.changes[name]:
                await cluster.node(name).request(r)

        await asyncio.gather(*(operator(n) for n in sc.nodes))
        want = expected_union(sc)

        def converged() -> bool:
            shared = cluster.shared_value()
            if shared is None:
                return False
            v = SozuVersion.parse(sc.version)
            if parse_state_file(shared, v, source="shared") != want:
                return False
            return all(live_state(n, sc.version) == want for n in cluster.nodes)

        try:
            await wait_until(converged, timeout_s=30.0, what=f"seed {sc.seed}: every node to hold the union")
        except AssertionError:
            lost = {n.name: sorted(str(k) for k in want if k not in live_state(n, sc.version)) for n in cluster.nodes}
            raise AssertionError(
                f"seed {sc.seed} ({sc.version}, {sc.nodes}): not converged in {cluster.root}; missing {lost}"
            ) from None
        for n in cluster.nodes:
            assert n.daemon is not None
            refused = n.daemon.metrics.sync_failures.get(error="UnsafePlanError")
            assert refused == 0, f"seed {sc.seed}: {n.name} had {refused:g} refused sync(s): {n.daemon.last_refusal}"
    finally:
        await cluster.stop()


@pytest.mark.parametrize("n_nodes", [2, 3])
async def test_daemons_started_together_converge_to_the_union(n_nodes: int) -> None:
    limit = asyncio.Semaphore(CONCURRENT_RUNS)
    done: list[int] = []

    async def one(seed: int) -> None:
        async with limit:
            await run_scenario(Scenario.draw(seed, n_nodes))
            done.append(seed)

    await asyncio.gather(*(one(seed) for seed in range(RUNS)))
    assert len(done) == RUNS
