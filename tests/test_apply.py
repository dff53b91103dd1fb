"""apply_plan (sozud.state.apply) against the sozu simulator: every pair of fixture states, failures, batches."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from google.protobuf.message import Message

from sozud import serde
from sozud.errors import ConvergenceError, SozuRequestError, SozuTimeoutError, UnsafePlanError
from sozud.proto import command_pb2 as pb
from sozud.serde import parse_address
from sozud.socket_proto import SozuChannel
from sozud.state.apply import MAX_RECORD_BYTES, _chunks, apply_plan, batch_chunks, encode_records
from sozud.state.codec import parse_state_file
from sozud.state.live import read_live_report
from sozud.state.model import ConfigState, ObjKey, object_address
from sozud.state.plan import plan
from sozud.testing import builders as build
from sozud.testing.fake_sozu import FakeSozu
from sozud.versions import Family, SozuVersion

FIXTURES = Path(os.environ.get("SOZUD_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
VERSIONS = ("2.1.0", "1.1.1", "0.15.19")


def states_of(version: str) -> list[Path]:
    return sorted((FIXTURES / f"sozu-{version}" / "states").glob("*.state"))


PAIRS = [(v, a.name, b.name) for v in VERSIONS for a in states_of(v) for b in states_of(v)]


def test_every_pair_is_there() -> None:
    assert len(PAIRS) == 25 + 25 + 81  # guards against silently testing nothing


@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="sza")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@asynccontextmanager
async def sozu(
    workdir: str, version: str, max_command_buffer_size: int = 2_000_000
) -> AsyncIterator[tuple[FakeSozu, SozuChannel]]:
    path = os.path.join(workdir, "s.sock")
    fake = FakeSozu(path, version, max_command_buffer_size=max_command_buffer_size)
    await fake.start()
    ch = SozuChannel(path, version=SozuVersion.parse(version), request_timeout_s=30.0)
    try:
        await ch.connect()
        yield fake, ch
    finally:
        await ch.aclose()
        await fake.stop()


def fixture_state(version: str, name: str) -> tuple[Path, ConfigState]:
    path = FIXTURES / f"sozu-{version}" / "states" / name
    return path, parse_state_file(path.read_bytes(), SozuVersion.parse(version), source=str(path))


async def load(ch: SozuChannel, path: Path) -> None:
    try:
        await ch.request(pb.Request(load_state=str(path)))
    except SozuRequestError as e:  # workers refuse the records on addresses without a listener
        assert "error" in e.sozu_message.lower()


async def saved(ch: SozuChannel, workdir: str) -> ConfigState:
    path = os.path.join(workdir, "reference.state")
    await ch.request(pb.Request(save_state=path))
    data = await asyncio.to_thread(Path(path).read_bytes)
    os.unlink(path)
    return parse_state_file(data, ch.version, source=path)


def listener_addresses(state: ConfigState) -> set[str]:
    return {k[2] for k in state if k[0] == "listener"}


def assert_documented_failures(report_steps: list, desired: ConfigState) -> None:  # type: ignore[type-arg]
    """Failures are only the documented ones: requests the main state kept and the workers refused
    (a frontend or certificate on an address without a listener; 0.15: a certificate it cannot parse)."""
    for step in report_steps:
        if step.ok:
            continue
        assert step.main_accepted, step
        assert step.key is not None and tuple(step.key) in desired, step
        address = object_address(tuple(step.key))
        if "found no listener" in step.message:
            assert address is not None and address not in listener_addresses(desired), step
        else:
            assert desired.version.family is Family.V0_15 and step.kind.endswith("_certificate"), step
            assert "could not add certificate" in step.message, step


# --- every pair of fixture states -----------------------------------------------------------------------


@pytest.mark.parametrize(("version", "a", "b"), PAIRS)
async def test_apply_every_pair_with_shared_dir(workdir: str, version: str, a: str, b: str) -> None:
    a_path, _ = fixture_state(version, a)
    _, desired = fixture_state(version, b)
    async with sozu(workdir, version) as (_fake, ch):
        await load(ch, a_path)
        report = await apply_plan(ch, desired, shared_dir=workdir, force=True)
        assert report.converged
        assert report.remaining is not None and report.remaining.is_empty
        live = await saved(ch, workdir)
        assert live == desired
        assert report.live_after == desired
        # a fresh read and plan find nothing to do
        again = await read_live_report(ch, shared_dir=workdir)
        assert plan(again.state, desired).is_empty
        assert_documented_failures(report.steps, desired)
        assert sorted(os.listdir(workdir)) == ["s.sock"]  # no temporary file left behind


@pytest.mark.parametrize(("version", "a", "b"), PAIRS)
async def test_apply_every_pair_by_queries(workdir: str, version: str, a: str, b: str) -> None:
    """Without a shared directory: B is reached, except objects of A that no query shows (documented)."""
    a_path, start = fixture_state(version, a)
    _, desired = fixture_state(version, b)
    async with sozu(workdir, version) as (_fake, ch):
        await load(ch, a_path)
        report = await apply_plan(ch, desired, force=True)
        assert report.converged
        live = await saved(ch, workdir)
    for key, value in desired.items():
        assert live.get(key) == value, key
    clusters = {k[1] for k in live if k[0] == "cluster"}
    for key in live.keys() - desired.keys():
        assert key in start, key  # nothing new appeared
        if key[0] == "backend":
            assert key[1] not in clusters, key  # a backend of a removed cluster: no query lists it
        else:
            assert key[0] == "certificate", key  # a certificate no worker serves: its address is unknown
    assert_documented_failures(report.steps, desired)


@pytest.mark.parametrize("version", ["2.1.0", "1.1.1", "0.15.19"])
async def test_a_round_sozu_accepted_whole_is_not_read_again(workdir: str, version: str) -> None:
    """Issue 10: after a round whose every request sozu accepted, the state it holds is known from the
    answers; with an exact read (SaveState) the apply does not read it again. What it predicts is exactly
    what a read then shows."""
    from sozud.state.codec import write_state_file
    from sozud.testing import builders as build

    v = SozuVersion.parse(version)
    before = build.fleet_state(50, listener="127.0.0.1:18080", version=v)
    desired = build.fleet_state(50, listener="127.0.0.1:18080", version=v, changed_weight=7)
    desired.add("cluster", build.cluster("added"))
    async with sozu(workdir, version) as (fake, ch):
        fake.state.load_state_file(write_state_file(before))
        initial = await read_live_report(ch, shared_dir=workdir)
        start = len(fake.requests)
        report = await apply_plan(ch, desired, shared_dir=workdir, force=True, initial=initial)
        sent = [r.WhichOneof("request_type") for r in fake.requests[start:]]
        assert report.converged and report.predicted_reads == 1 and report.live_reads == 0
        assert "save_state" not in sent
        assert report.live_after == await saved(ch, workdir) == desired


# --- failures --------------------------------------------------------------------------------------------


async def test_stops_at_the_first_failure_reports_it_and_replans(workdir: str) -> None:
    a_path, _ = fixture_state("2.1.0", "00-initial.state")
    _, desired = fixture_state("2.1.0", "03-final.state")
    async with sozu(workdir, "2.1.0") as (fake, ch):
        await load(ch, a_path)
        fake.refuse_next("add_backend", "injected: worker 0 cannot reach 10.0.0.1")
        start = len(fake.requests)
        report = await apply_plan(ch, desired, shared_dir=workdir)
        sent = [r.WhichOneof("request_type") for r in fake.requests[start:]]
        assert await saved(ch, workdir) == desired
    assert report.converged
    injected = [s for s in report.steps if "injected" in s.message]
    assert len(injected) == 1 and injected[0].kind == "add_backend" and injected[0].main_accepted
    # the round stopped right there: the next request is the re-read
    i = next(i for i, k in enumerate(sent) if k == "add_backend")
    failed_at = [s for s in report.steps if s.kind == "add_backend"].index(injected[0])
    j = [n for n, k in enumerate(sent) if k == "add_backend"][failed_at]
    assert i <= j and sent[j + 1] == "save_state"
    assert report.rounds >= 2
    assert_documented_failures([s for s in report.steps if s is not injected[0]], desired)


def bad_certificate_state(version: str) -> ConfigState:
    """00-initial plus a certificate whose PEM is not X.509: sozu's main state refuses it every time."""
    _, state = fixture_state(version, "00-initial.state")
    https = next(k[2] for k in state if k[0] == "listener" and k[1] == "https")
    cert = pb.CertificateAndKey(
        certificate=(FIXTURES / "certs" / "malformed.pem").read_text(),
        key=(FIXTURES / "certs" / "api.example.test.key").read_text(),
    )
    state.add("certificate", pb.AddCertificate(address=parse_address(https), certificate=cert))
    return state


async def test_a_request_the_main_state_refuses_ends_in_convergence_error(workdir: str) -> None:
    desired = bad_certificate_state("2.1.0")
    async with sozu(workdir, "2.1.0") as (fake, ch):
        await load(ch, FIXTURES / "sozu-2.1.0" / "states" / "00-initial.state")
        start = len(fake.requests)
        with pytest.raises(ConvergenceError) as info:
            await apply_plan(ch, desired, shared_dir=workdir, max_rounds=2)
        sent = [r.WhichOneof("request_type") for r in fake.requests[start:]]
    text = str(info.value)
    assert "add_certificate" in text and "Could not add certificate" in text
    assert "PRIVATE KEY" not in text
    assert sent.count("add_certificate") == 2  # once per round, no more
    # without raising: the report tells the same
    async with sozu(workdir, "2.1.0") as (_fake, ch):
        report = await apply_plan(ch, desired, shared_dir=workdir, max_rounds=1, raise_on_failure=False)
    assert not report.converged
    assert report.failures and not report.failures[0].main_accepted
    assert "Could not add certificate" in report.failures[0].message
    assert report.remaining is not None and len(report.remaining.steps) == 1


async def test_the_safety_valve_refuses_before_sending_anything(workdir: str) -> None:
    _, desired = fixture_state("2.1.0", "00-initial.state")
    async with sozu(workdir, "2.1.0") as (fake, ch):
        await load(ch, FIXTURES / "sozu-2.1.0" / "states" / "01-populated.state")
        start = len(fake.requests)
        with pytest.raises(UnsafePlanError):
            await apply_plan(ch, desired, shared_dir=workdir)
        assert [r.WhichOneof("request_type") for r in fake.requests[start:]] == ["save_state"]


# --- batch mode -----------------------------------------------------------------------------------------


def generated(version: str, clusters: int, port_base: int = 28000) -> ConfigState:
    """clusters x (cluster, 2 backends, 1 HTTP frontend) plus an HTTP listener."""
    v = SozuVersion.parse(version)
    state = ConfigState(v)
    listener = pb.HttpListenerConfig(
        address=parse_address(f"127.0.0.1:{port_base + 80}"),
        expect_proxy=False,
        sticky_name="SOZUBALANCEID",
        front_timeout=60,
        back_timeout=30,
        connect_timeout=3,
        request_timeout=10,
        active=True,
    )
    if v.family is Family.V0_15:
        listener.answer_404 = "HTTP/1.1 404 Not Found\r\n\r\n"
        listener.answer_503 = "HTTP/1.1 503 Service Unavailable\r\n\r\n"
    state.add_listener("http", listener)
    for c in range(clusters):
        cid = f"gen{c:05d}"
        state.add(
            "cluster", pb.Cluster(cluster_id=cid, sticky_session=False, https_redirect=False, load_balancing=pb.RANDOM)
        )
        for b in range(2):
            state.add(
                "backend",
                pb.AddBackend(
                    cluster_id=cid,
                    backend_id=f"{cid}-{b}",
                    address=parse_address(f"10.1.{c % 250}.{b + 1}:{8000 + c // 250}"),
                    load_balancing_parameters=pb.LoadBalancingParams(weight=10 + b),
                ),
            )
        state.add(
            "http_frontend",
            pb.RequestHttpFrontend(
                cluster_id=cid,
                address=parse_address(f"127.0.0.1:{port_base + 80}"),
                hostname=f"{cid}.example.test",
                path=pb.PathRule(kind=pb.PREFIX, value="/"),
                position=pb.TREE,
            ),
        )
    return state


@pytest.mark.parametrize("version", VERSIONS)
async def test_batch_mode_reaches_the_same_state_with_far_fewer_requests(workdir: str, version: str) -> None:
    desired = generated(version, 150)  # 600 objects + a listener
    async with sozu(workdir, version) as (fake, ch):
        one_by_one = await apply_plan(ch, desired, batch_threshold=10**9, shared_dir=workdir)
        requests_one_by_one = len(fake.requests)
        reference = await saved(ch, workdir)
    async with sozu(workdir, version) as (fake, ch):
        batch = await apply_plan(ch, desired, shared_dir=workdir, batch_threshold=200, chunk_bytes=40_000)
        requests_batch = len(fake.requests)
        live = await saved(ch, workdir)
    assert one_by_one.converged and batch.converged
    assert live == reference == desired
    assert len(batch.batches) >= 3 and all(b.ok for b in batch.batches)
    assert all(b.bytes <= 40_000 for b in batch.batches)
    assert batch.requests_by_type.get("load_state") == len(batch.batches)
    assert not batch.steps  # nothing was left for one-by-one
    assert requests_one_by_one > 600
    assert requests_batch * 20 < requests_one_by_one
    assert not [f for f in os.listdir(workdir) if f.startswith(".sozud")]  # chunk files are deleted


async def test_batch_failures_fall_back_to_one_by_one(workdir: str) -> None:
    """Records the main state refuses are skipped silently by load_state: the re-plan sends them one by
    one, where sozu's refusal is attributed to its request."""
    desired = generated("2.1.0", 60)
    bad = bad_certificate_state("2.1.0")
    for key, value in bad.items():
        if key[0] == "certificate":
            desired.put(key, value)
    https = next(k for k in bad if k[0] == "listener" and k[1] == "https")
    desired.put(https, bad[https])
    async with sozu(workdir, "2.1.0") as (fake, ch):
        report = await apply_plan(
            ch, desired, shared_dir=workdir, batch_threshold=50, chunk_bytes=20_000, raise_on_failure=False
        )
        sent = [r.WhichOneof("request_type") for r in fake.requests]
    assert report.batches
    assert not report.converged
    assert [s.kind for s in report.steps] == ["add_certificate"] * len(report.steps)
    assert "Could not add certificate" in report.steps[0].message
    assert sent.count("load_state") == len(report.batches)
    remaining = report.remaining
    assert remaining is not None and [s.request.WhichOneof("request_type") for s in remaining.steps] == [
        "add_certificate"
    ]


# --- records and chunks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_records_are_a_state_file_sozu_reads(version: str) -> None:
    desired = generated(version, 20)
    steps = plan(ConfigState(desired.version), desired).steps
    data = b"".join(encode_records([s.request for s in steps], desired.version))
    assert data.endswith(b"\n\0") and data.count(b"\n\0") == len(steps)
    assert parse_state_file(data, desired.version, source="records") == desired


def test_chunks_keep_order_and_size_and_leave_out_oversized_records() -> None:
    records = [b"x" * n + b"\n\0" for n in (10, 20, 30, MAX_RECORD_BYTES + 5, 40, 50, 60)]
    chunks = _chunks(records, 75)
    flat = [(first + i, rec) for first, chunk in chunks for i, rec in enumerate(chunk)]
    assert [records.index(rec) for _, rec in flat] == [i for i, _ in flat]  # in order, indices right
    assert all(sum(len(r) for r in chunk) <= 75 for _, chunk in chunks)
    assert 3 not in {i for i, _ in flat}  # the oversized record is sent on its own later
    assert {i for i, _ in flat} == {0, 1, 2, 4, 5, 6}


def _value(state: ConfigState, key: ObjKey) -> Message | None:
    return state.get(key)


# --- a change made while the plan is applied ----------------------------------------------------------


class _Wrapped:
    """A channel passed through to a real one; subclasses change what ``request`` does."""

    def __init__(self, ch: SozuChannel) -> None:
        self.ch = ch

    @property
    def version(self) -> SozuVersion | None:
        return self.ch.version

    @property
    def epoch(self) -> int:
        return self.ch.epoch


class _OperatorDuringApply(_Wrapped):
    """A channel that lets an operator add a cluster to sozu right after the plan's first mutation."""

    def __init__(self, ch: SozuChannel, fake: FakeSozu, version: SozuVersion) -> None:
        super().__init__(ch)
        self.fake, self.done = fake, False
        self.cluster = build.cluster("operator-added")

    async def request(self, req: pb.Request, *, timeout_s: float | None = None) -> object:
        answer = await self.ch.request(req, timeout_s=timeout_s)
        if not self.done and not req.WhichOneof("request_type").startswith(("query", "list", "save", "count")):
            self.done = True
            assert self.fake.state.dispatch(pb.Request(add_cluster=self.cluster)) is None
        return answer


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_change_made_during_the_apply_is_not_reverted(workdir: str, version: str) -> None:
    """Later rounds only finish the first plan: an object an operator added meanwhile stays."""
    _, desired = fixture_state(version, "01-populated.state")
    async with sozu(workdir, version) as (fake, ch):
        op = _OperatorDuringApply(ch, fake, SozuVersion.parse(version))
        report = await apply_plan(op, desired)
        assert op.done and report.converged
        after = (await read_live_report(ch, shared_dir=workdir)).state  # exact (SaveState)
    assert ("cluster", "operator-added") in after, "the operator's concurrent change was reverted"
    missing = [k for k, v in desired.items() if after.get(k) != v]
    assert not missing, f"the plan itself was not finished: {missing}"


class _RefuseFrontendAdds(_Wrapped):
    """A channel whose sozu refuses every add_http_frontend outright (main state included)."""

    async def request(self, req: pb.Request, *, timeout_s: float | None = None) -> object:
        if req.WhichOneof("request_type") == "add_http_frontend" and req.add_http_frontend.tags.get("new") == "1":
            raise SozuRequestError("refused for the test", request_kind="add_http_frontend")
        return await self.ch.request(req, timeout_s=timeout_s)


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_changed_frontend_whose_new_value_is_refused_gets_its_old_value_back(
    workdir: str, version: str
) -> None:
    _, live = fixture_state(version, "01-populated.state")
    desired = live.copy()
    key, old = next((k, v) for k, v in live.items() if k[0] == "http_frontend")
    new = pb.RequestHttpFrontend()
    new.CopyFrom(old)
    new.tags["new"] = "1"
    desired[key] = new
    async with sozu(workdir, version) as (_fake, ch):
        await apply_plan(ch, live, raise_on_failure=False)
        report = await apply_plan(_RefuseFrontendAdds(ch), desired, raise_on_failure=False)
        after = (await read_live_report(ch, shared_dir=workdir)).state
    assert not report.converged
    assert after.get(key) == old, "the route was lost: its old value must be put back"
    restores = [s for s in report.steps if s.summary.startswith("restore")]
    assert len(restores) == 1 and restores[0].ok, "restored once, and not tried again round after round"


# --- what one load_state chunk queues to a worker (sozu-command-protocol.md §11.10) ---------------------

PUBLISHED_MAX_COMMAND_BUFFER = 163_840  # max_command_buffer_size of the published OpenSVC template's config.toml


def _queued_to_worker(record: bytes, version: SozuVersion) -> int:
    """Bytes one record occupies in sozu's main→worker channel: 1.x/2.x forward the request as a
    length-prefixed (8 bytes) protobuf WorkerRequest, 0.15 forwards the JSON record itself."""
    if version.family is Family.V0_15:
        return len(record)
    doc = json.loads(record.rstrip(b"\n\0"))
    req = serde.from_json(pb.Request, doc["content"], version)
    return len(pb.WorkerRequest(id=doc["id"], content=req).SerializeToString()) + 8


@pytest.mark.parametrize("version", VERSIONS)
def test_a_batch_chunk_fits_the_published_command_buffer_cap(version: str) -> None:
    """4 000 objects (§11.10 used 10 000): every chunk the batch apply sends must queue well under 163 840
    bytes per worker (with that cap, one load_state of the whole file is never answered)."""
    desired = generated(version, 1000)
    steps = plan(ConfigState(desired.version), desired).steps
    v = desired.version
    chunks = batch_chunks([s.request for s in steps], v)
    assert sum(len(c) for _, c in chunks) == len(steps)
    whole = sum(_queued_to_worker(r, v) for _, c in chunks for r in c)
    assert whole > PUBLISHED_MAX_COMMAND_BUFFER  # the case of §11.10: one chunk would overflow
    worst = max(sum(_queued_to_worker(r, v) for r in c) for _, c in chunks)
    assert worst <= PUBLISHED_MAX_COMMAND_BUFFER // 2


@pytest.mark.parametrize("version", ["2.1.0", "1.1.1"])
async def test_batch_apply_under_the_published_cap_is_answered(workdir: str, version: str) -> None:
    """Simulated sozu with max_command_buffer_size = 163840: one load_state of 4 000 objects is never
    answered (as observed in §11.10 with 10 000), the batch apply's chunks are."""
    desired = generated(version, 1000)
    records = encode_records([s.request for s in plan(ConfigState(desired.version), desired).steps], desired.version)
    path = os.path.join(workdir, "whole.state")
    with open(path, "wb") as f:  # noqa: ASYNC230 (test setup)
        f.write(b"".join(records))
    async with sozu(workdir, version, PUBLISHED_MAX_COMMAND_BUFFER) as (_, ch):
        with pytest.raises(SozuTimeoutError):
            await ch.request(pb.Request(load_state=path), timeout_s=1.0)
    async with sozu(workdir, version, PUBLISHED_MAX_COMMAND_BUFFER) as (_, ch):
        report = await apply_plan(ch, desired, shared_dir=workdir, batch_threshold=200)
        live = await saved(ch, workdir)
    assert report.converged and report.batches and all(b.ok for b in report.batches)
    assert live == desired


# --- scope: the caller says where live and desired differ ---------------------------------------------------


def _scope_base(version: SozuVersion) -> ConfigState:
    state = build.fleet_state(40, listener="127.0.0.1:18080", version=version)
    # a second backend at app-000003's address: removing one of them re-adds the other
    state.add("backend", build.backend("app-000003", "app-000003-1", "10.0.0.3:8000"))
    return state


def _weight_changed(desired: ConfigState) -> None:
    desired.add("backend", build.backend("app-000007", "app-000007-0", "10.0.0.7:8000", weight=3))


def _frontend_added_and_removed(desired: ConfigState) -> None:
    desired.add("http_frontend", build.http_frontend("app-000001", "127.0.0.1:18080", "new.example.com"))
    (gone,) = [k for k in desired if k[0] == "http_frontend" and "app-000002." in k[1]]
    del desired[gone]


def _cluster_removed(desired: ConfigState) -> None:
    for k in [k for k in desired if "app-000005" in k[1]]:
        del desired[k]  # the cluster, its backend and its frontend


def _backend_at_a_shared_address_removed(desired: ConfigState) -> None:
    del desired[("backend", "app-000003", "app-000003-0", "10.0.0.3:8000")]


SCOPE_CASES = {
    "backend weight": _weight_changed,
    "frontend added and removed": _frontend_added_and_removed,
    "cluster removed with its backends": _cluster_removed,
    "backend removed beside a kept one": _backend_at_a_shared_address_removed,
}


@pytest.mark.parametrize("exact", [True, False], ids=["save_state", "queries"])
@pytest.mark.parametrize("case", sorted(SCOPE_CASES))
async def test_a_scoped_apply_sends_what_a_full_apply_sends(
    workdir: str, case: str, exact: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With scope = the keys that differ, the same requests reach sozu and it ends in the same state;
    every plan (the first one included) is built from a few objects, not from the whole state."""
    import sozud.state.plan as plan_module

    sizes: list[int] = []
    real_builder = plan_module.StepBuilder

    def recording_builder(live: ConfigState, desired: ConfigState) -> object:
        sizes.append(len(live))
        return real_builder(live, desired)

    monkeypatch.setattr(plan_module, "StepBuilder", recording_builder)
    version = SozuVersion(2, 1, 0)
    before = _scope_base(version)
    desired = before.copy()
    SCOPE_CASES[case](desired)
    scope = [k for k in before.keys() | desired.keys() if before.get(k) != desired.get(k)]
    from sozud.state.codec import write_state_file

    results = []
    for with_scope in (False, True):
        sizes.clear()
        async with sozu(workdir, "2.1.0") as (fake, ch):
            fake.state.load_state_file(write_state_file(before))
            shared_dir = workdir if exact else None
            initial = await read_live_report(ch, shared_dir=shared_dir)
            start = len(fake.requests)
            report = await apply_plan(
                ch, desired, shared_dir=shared_dir, initial=initial, scope=scope if with_scope else None
            )
            sent = [r.SerializeToString(deterministic=True) for r in fake.requests[start:]]
            results.append((sent, await saved(ch, workdir), report.plan_digest, report.live_after))
            if with_scope:
                assert sizes and max(sizes) <= 4, sizes
            else:
                assert sizes[0] == len(before)
    (full_sent, full_after, full_digest, full_live), (scoped_sent, scoped_after, scoped_digest, scoped_live) = results
    assert scoped_sent == full_sent
    assert scoped_digest == full_digest
    assert scoped_after == full_after == desired
    assert scoped_live == full_live == desired


async def test_a_scoped_apply_leaves_what_is_outside_the_scope(workdir: str) -> None:
    """The caller vouches for the keys outside the scope: a difference there is not planned."""
    version = SozuVersion(2, 1, 0)
    before = _scope_base(version)
    desired = before.copy()
    _weight_changed(desired)
    desired.add("cluster", build.cluster("outside"))
    key = ("backend", "app-000007", "app-000007-0", "10.0.0.7:8000")
    from sozud.state.codec import write_state_file

    async with sozu(workdir, "2.1.0") as (fake, ch):
        fake.state.load_state_file(write_state_file(before))
        initial = await read_live_report(ch, shared_dir=workdir)
        report = await apply_plan(ch, desired, shared_dir=workdir, initial=initial, scope=[key])
        after = await saved(ch, workdir)
    assert report.converged and report.requests_by_type == {"add_backend": 1}
    assert ("cluster", "outside") not in after
    assert after[key] == desired[key]
