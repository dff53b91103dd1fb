"""The sozu adapter: restart detection from request counters, cached reads, assumed-invisible objects."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from sozud.adapters import SozuAdapter
from sozud.proto import command_pb2 as pb
from sozud.socket_proto import SozuChannel
from sozud.state.codec import parse_state_file
from sozud.state.model import ConfigState
from sozud.testing import builders as build
from sozud.testing.fake_sozu import FakeSozu
from sozud.versions import SozuVersion


@asynccontextmanager
async def _simulated(*, exact: bool) -> AsyncIterator[tuple[FakeSozu, SozuAdapter]]:
    """A simulated sozu 2.1.0 and an adapter over it (``exact``: SaveState reads through a shared
    directory, and the read kept after an apply whose counters add up)."""
    d = tempfile.mkdtemp(prefix="sz")
    fake = FakeSozu(f"{d}/s.sock", "2.1.0")
    await fake.start()
    ch = SozuChannel(f"{d}/s.sock", version=SozuVersion(2, 1, 0), request_timeout_s=5.0)
    adapter = SozuAdapter(ch, shared_dir=d if exact else None)
    adapter.keep_read_after_apply = exact
    try:
        yield fake, adapter
    finally:
        await ch.aclose()
        await fake.stop()


@pytest.fixture
async def sozu() -> AsyncIterator[tuple[FakeSozu, SozuAdapter]]:
    async with _simulated(exact=False) as pair:
        yield pair


async def test_reconnect_is_not_a_restart_but_reset_counters_are(sozu: tuple[FakeSozu, SozuAdapter]) -> None:
    fake, adapter = sozu
    await adapter.channel.request(pb.Request(add_cluster=build.cluster("c1")))
    await adapter.read_live()
    epoch = adapter.epoch
    await fake.restart(empty=False)  # connections dropped, same main process state and counters
    await adapter.read_live()
    assert adapter.epoch > epoch and adapter.restarts == 0
    await fake.restart(empty=True)  # a new sozu: its counters start again
    live = await adapter.read_live()
    assert adapter.restarts == 1 and ("cluster", "c1") not in live


async def test_a_restart_right_after_an_apply_is_a_restart(sozu: tuple[FakeSozu, SozuAdapter]) -> None:
    """Seen as a flaky e2e test (0.15, about 1 run in 10): sozu restarted empty a few ms after sozud
    applied the shared state, before any probe; the counters it had seen were those before the apply,
    the empty sozu's were not lower, so the empty live was merged as a mass removal and refused."""
    fake, adapter = sozu
    live = await adapter.read_live()
    desired = live.copy()
    desired.add("cluster", build.cluster("c1"))
    desired.add("backend", build.backend("c1", "c1-0", "10.0.0.1:80"))
    await adapter.apply(desired, force=False, desired_is_complete=True)
    await fake.restart(empty=True)
    live = await adapter.read_live()
    assert ("cluster", "c1") not in live and adapter.restarts == 1


async def test_cached_read_until_the_probe_changes(sozu: tuple[FakeSozu, SozuAdapter]) -> None:
    fake, adapter = sozu
    await adapter.read_live()
    reads = len(fake.requests)
    again = await adapter.read_live()
    # only the probe's request: the cached state is returned
    assert len(fake.requests) - reads == 1 and len(again) == 0
    await adapter.channel.request(pb.Request(add_cluster=build.cluster("c")))
    await adapter.read_live()
    await adapter.channel.request(pb.Request(add_backend=build.backend("c", "b", "10.0.0.1:80")))
    live = await adapter.read_live()  # 2.1.0 sends no event for backends: the probe must see it
    assert ("backend", "c", "b", "10.0.0.1:80") in live


async def test_a_change_made_during_a_sync_is_never_reverted(sozu: tuple[FakeSozu, SozuAdapter]) -> None:
    from sozud.errors import LiveChangedError

    fake, adapter = sozu
    snapshot = await adapter.read_live()  # what the engine merges from
    # an operator adds a cluster while sozud reads OpenSVC and merges
    assert fake.state.dispatch(pb.Request(add_cluster=build.cluster("operator"))) is None
    desired = snapshot.copy()
    desired.add("cluster", build.cluster("from-peer"))
    sent = len(fake.requests)
    with pytest.raises(LiveChangedError, match="changed while sozud was syncing"):
        await adapter.apply(desired, force=False, desired_is_complete=True)
    assert [r.WhichOneof("request_type") for r in fake.requests[sent:]] == ["count_requests"]
    assert "operator" in fake.state.clusters
    # the next read shows the operator's cluster, so the next merge keeps it
    assert ("cluster", "operator") in await adapter.read_live()


# --- the cached read after an apply ------------------------------------------------------------------------


@pytest.fixture
async def exact_sozu() -> AsyncIterator[tuple[FakeSozu, SozuAdapter]]:
    """An adapter that reads with SaveState (a shared directory): exact reads, predicted applies."""
    async with _simulated(exact=True) as pair:
        yield pair


def _held(fake: FakeSozu) -> ConfigState:
    """What the simulated sozu holds."""
    return parse_state_file(fake.state.generate_state_file(), fake.version, source="fake", allow_empty=True)


def _sent(fake: FakeSozu, start: int) -> list[str]:
    return [r.WhichOneof("request_type") or "" for r in fake.requests[start:]]


async def _counted_before(adapter: SozuAdapter) -> None:
    """sozu has counted add_cluster and add_backend before (a counter's first value is ambiguous)."""
    await adapter.channel.request(pb.Request(add_cluster=build.cluster("c0")))
    await adapter.channel.request(pb.Request(add_backend=build.backend("c0", "b0", "10.0.0.1:80")))


async def test_after_a_clean_apply_the_next_read_is_the_probe_alone(exact_sozu: tuple[FakeSozu, SozuAdapter]) -> None:
    fake, adapter = exact_sozu
    await _counted_before(adapter)
    live = await adapter.read_live()
    for i in (1, 2):  # twice: the second apply starts from the first one's prediction
        desired = live.copy()
        desired.add("cluster", build.cluster(f"c{i}"))
        desired.add("backend", build.backend(f"c{i}", "b", "10.0.0.2:80"))
        desired.add("backend", build.backend("c0", "b0", "10.0.0.1:80", weight=i))
        start = len(fake.requests)
        outcome = await adapter.apply(desired, force=False, desired_is_complete=True)
        assert "save_state" not in _sent(fake, start) and outcome.live_after == desired
        start = len(fake.requests)
        live = await adapter.read_live()
        assert _sent(fake, start) == ["count_requests"], "the read after a clean apply re-read sozu"
        assert live == _held(fake) == desired


async def test_a_clean_apply_and_the_next_read_hand_back_the_kept_read_without_copying_it(
    exact_sozu: tuple[FakeSozu, SozuAdapter],
) -> None:
    """An exact read hides nothing: the state after the apply is the cached read itself, and so is the next
    read_live's answer (no copy of the mapping per step, issue 10: callers never modify them)."""
    fake, adapter = exact_sozu
    await _counted_before(adapter)
    desired = (await adapter.read_live()).copy()
    desired.add("cluster", build.cluster("c1"))
    outcome = await adapter.apply(desired, force=False, desired_is_complete=True)
    assert adapter._cache is not None and outcome.live_after is adapter._cache[2]
    live = await adapter.read_live()
    assert live is outcome.live_after
    assert live == outcome.live_after == _held(fake)


class _OperatorBeforeTheLastProbe:
    """Wraps the channel's request: an operator's add_cluster reaches sozu right before the probe that
    follows the apply (after our last request), so the probes alone cannot tell it from ours."""

    def __init__(self, adapter: SozuAdapter, fake: FakeSozu) -> None:
        self.real = adapter.channel.request
        self.fake = fake
        self.probes = 0
        self.done = False

    async def __call__(self, req: pb.Request, *, timeout_s: float | None = None) -> object:
        if req.WhichOneof("request_type") == "count_requests":
            self.probes += 1
            if self.probes == 2:  # the first one is the probe before the apply
                assert self.fake.state.dispatch(pb.Request(add_cluster=build.cluster("operator"))) is None
                self.done = True
        return await self.real(req, timeout_s=timeout_s)


async def test_an_operator_request_during_the_apply_is_seen_by_the_next_read(
    exact_sozu: tuple[FakeSozu, SozuAdapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, adapter = exact_sozu
    await _counted_before(adapter)
    live = await adapter.read_live()
    desired = live.copy()
    desired.add("cluster", build.cluster("c1"))  # the operator's request is of the same type
    operator = _OperatorBeforeTheLastProbe(adapter, fake)
    monkeypatch.setattr(adapter.channel, "request", operator)
    await adapter.apply(desired, force=False, desired_is_complete=True)
    assert operator.done
    start = len(fake.requests)
    live = await adapter.read_live()
    assert "save_state" in _sent(fake, start)
    assert ("cluster", "operator") in live and live == _held(fake)


@pytest.mark.parametrize("first_count", [2, 1], ids=["counters start at 2", "counters start at 1"])
async def test_a_request_type_sozu_never_counted_drops_the_cached_read(
    exact_sozu: tuple[FakeSozu, SozuAdapter], monkeypatch: pytest.MonkeyPatch, first_count: int
) -> None:
    """sozu 2.x starts a counter at 2 (``or_insert(1)``, then ``+= 1``), another version may start it at 1:
    an increase of a counter that did not exist cannot be checked, whichever this sozu does."""
    from sozud.testing._sozu_state import request_name

    fake, adapter = exact_sozu

    def count(kind: str) -> None:
        name = request_name(kind)
        fake.state.request_counts[name] = fake.state.request_counts.get(name, first_count - 1) + 1

    monkeypatch.setattr(fake.state, "_count", count)
    await adapter.channel.request(pb.Request(add_cluster=build.cluster("c0")))  # add_backend never sent
    live = await adapter.read_live()
    desired = live.copy()
    desired.add("cluster", build.cluster("c1"))
    desired.add("backend", build.backend("c1", "b", "10.0.0.2:80"))
    await adapter.apply(desired, force=False, desired_is_complete=True)
    start = len(fake.requests)
    live = await adapter.read_live()
    assert "save_state" in _sent(fake, start)
    assert live == _held(fake) == desired


async def test_after_an_apply_that_read_sozu_again_the_next_read_is_a_full_one(
    sozu: tuple[FakeSozu, SozuAdapter],
) -> None:
    """Without a shared directory the apply reads sozu again by queries (nothing is predicted from a
    read that cannot see everything): that read is not kept, the next one reads sozu in full."""
    fake, adapter = sozu
    await _counted_before(adapter)
    live = await adapter.read_live()
    desired = live.copy()
    desired.add("cluster", build.cluster("c1"))
    await adapter.apply(desired, force=False, desired_is_complete=True)
    start = len(fake.requests)
    live = await adapter.read_live()
    assert "query_clusters_hashes" in _sent(fake, start)
    assert live == desired


async def test_a_fresh_read_queries_every_cluster_again_and_a_normal_one_only_what_changed(
    sozu: tuple[FakeSozu, SozuAdapter],
) -> None:
    fake, adapter = sozu  # no shared directory: reads by queries

    def cluster_queries(since: int) -> int:
        return sum(1 for r in fake.requests[since:] if r.HasField("query_cluster_by_id"))

    for i in range(5):
        await adapter.channel.request(pb.Request(add_cluster=build.cluster(f"c{i}")))
    n = len(fake.requests)
    await adapter.read_live()
    assert cluster_queries(n) == 5
    await adapter.channel.request(pb.Request(add_cluster=build.cluster("c2", sticky=True)))
    n = len(fake.requests)
    live = await adapter.read_live()  # the probe saw a change: a read, reusing the 4 unchanged clusters
    assert cluster_queries(n) == 1
    sticky = live[("cluster", "c2")]
    assert isinstance(sticky, pb.Cluster) and sticky.sticky_session
    n = len(fake.requests)
    assert await adapter.read_live(fresh=True) == live  # anti-entropy: trusts no hash
    assert cluster_queries(n) == 5


async def test_only_an_exact_read_sees_all() -> None:
    """The engine skips its search for what a read cannot see when the port says it sees all: only a
    SaveState read may say so; a read by queries cannot see the backends of a removed cluster."""
    for exact in (True, False):
        async with _simulated(exact=exact) as (_fake, adapter):
            await adapter.channel.request(pb.Request(add_backend=build.backend("gone", "b0", "10.0.0.1:80")))
            live = await adapter.read_live()
            orphan = ("backend", "gone", "b0", "10.0.0.1:80")
            assert adapter.sees_all is exact
            assert (orphan in live) is exact and adapter.hides(
                orphan, build.backend("gone", "b0", "10.0.0.1:80")
            ) is not exact
