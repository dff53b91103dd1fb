"""The adapter keeps its live read after an apply whose end state it knows (issue 10, "no full re-read
after an apply that sozu accepted"), and only then: sozu's request counters must have moved by exactly
the requests the apply sent."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import sozud.adapters as adapters
from sozud.adapters import SozuAdapter
from sozud.proto import command_pb2 as pb
from sozud.serde import request_kind
from sozud.socket_proto import SozuChannel
from sozud.state.codec import write_state_file
from sozud.state.model import ConfigState
from sozud.testing import builders as build
from sozud.testing.fake_sozu import FakeSozu
from sozud.versions import SozuVersion

V2 = SozuVersion(2, 1, 0)
READS = {"save_state", "query_clusters_hashes", "query_cluster_by_id", "list_listeners", "list_frontends"}


@pytest.fixture
async def sozu() -> AsyncIterator[tuple[FakeSozu, SozuAdapter]]:
    d = tempfile.mkdtemp(prefix="sz")
    fake = FakeSozu(f"{d}/s.sock", "2.1.0")
    fake.state.load_state_file(write_state_file(build.fleet_state(5)), source="test")
    await fake.start()
    ch = SozuChannel(f"{d}/s.sock", version=V2, request_timeout_s=5.0)
    adapter = SozuAdapter(ch, shared_dir=d)
    adapter.keep_read_after_apply = True
    try:
        yield fake, adapter
    finally:
        await ch.aclose()
        await fake.stop()


def _with_weight(state: ConfigState, weight: int) -> ConfigState:
    out = state.shallow_copy()
    key = next(k for k in state.objects if k[0] == "backend")
    out.objects[key] = build.backend(key[1], key[2], key[3], weight=weight)
    return out


def _reads_since(fake: FakeSozu, mark: int) -> list[str]:
    return [request_kind(r) for r in fake.requests[mark:] if request_kind(r) in READS]


async def test_after_an_accepted_apply_the_next_read_is_the_probe_alone(sozu: tuple[FakeSozu, SozuAdapter]) -> None:
    fake, adapter = sozu
    live = await adapter.read_live()
    await adapter.apply(_with_weight(live, 7), force=False, desired_is_complete=True)
    mark = len(fake.requests)
    again = await adapter.read_live()
    assert _reads_since(fake, mark) == []
    assert again == _with_weight(live, 7)
    fresh = await SozuAdapter(adapter.channel, shared_dir=adapter.shared_dir).read_live()
    assert fresh == again, "the kept read is what sozu holds"


async def test_an_operators_request_racing_the_end_of_an_apply_is_read(
    sozu: tuple[FakeSozu, SozuAdapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, adapter = sozu
    live = await adapter.read_live()
    racing = pb.Request(add_cluster=build.cluster("racing"))
    real_apply_plan: Callable[..., Awaitable[Any]] = adapters.apply_plan

    async def apply_then_an_operator(*args: Any, **kwargs: Any) -> Any:
        report = await real_apply_plan(*args, **kwargs)
        assert fake.state.dispatch(racing) is None  # lands before the adapter's closing probe
        return report

    monkeypatch.setattr(adapters, "apply_plan", apply_then_an_operator)
    await adapter.apply(_with_weight(live, 7), force=False, desired_is_complete=True)
    mark = len(fake.requests)
    again = await adapter.read_live()
    assert _reads_since(fake, mark) == ["save_state"], "the counters did not add up: a full read"
    assert ("cluster", "racing") in again


async def test_a_request_type_sozu_never_counted_before_drops_the_read(sozu: tuple[FakeSozu, SozuAdapter]) -> None:
    fake, adapter = sozu
    live = await adapter.read_live()
    desired = live.shallow_copy()
    desired.add("https_frontend", build.http_frontend("app-000001", "127.0.0.1:8443", "new.example.test"))
    assert "AddHttpsFrontend" not in fake.state.request_counts
    await adapter.apply(desired, force=False, desired_is_complete=True)
    mark = len(fake.requests)
    await adapter.read_live()
    assert _reads_since(fake, mark) == ["save_state"]
