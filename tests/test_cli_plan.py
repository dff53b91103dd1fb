"""``sozud plan``: offline on two fixture state files, and against the sozu simulator."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import structlog

from sozud.cli.plan import register
from sozud.errors import SozuRequestError
from sozud.exitcodes import ExitCode
from sozud.log import configure_logging
from sozud.proto import command_pb2 as pb
from sozud.socket_proto import SozuChannel
from sozud.state.codec import parse_state_file
from sozud.testing.fake_sozu import FakeSozu
from sozud.versions import SozuVersion

FIXTURES = Path(os.environ.get("SOZUD_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


def state(version: str, name: str) -> str:
    return str(FIXTURES / f"sozu-{version}" / "states" / f"{name}.state")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sozud")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


async def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = parse(argv)
    rc = await args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def logs_to_stderr() -> Iterator[None]:
    """As sozud's main sets it up: log lines go to stderr, stdout carries only the plan."""
    before = structlog.get_config()
    configure_logging("warning", json=True)
    yield
    structlog.configure(**before)


@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="szc")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@asynccontextmanager
async def simulator(workdir: str, version: str, load: str | None) -> AsyncIterator[FakeSozu]:
    fake = FakeSozu(os.path.join(workdir, "s.sock"), version)
    await fake.start()
    try:
        if load is not None:
            ch = SozuChannel(fake.socket_path, version=SozuVersion.parse(version))
            try:
                await ch.request(pb.Request(load_state=load))
            except SozuRequestError as e:  # workers refuse the fixture's listener-less records
                assert "error" in e.sozu_message
            finally:
                await ch.aclose()
        yield fake
    finally:
        await fake.stop()


# --- offline --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.1.0", "1.1.1", "0.15.19"])
async def test_offline_table(version: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run(
        ["plan", "--from", state(version, "00-initial"), "--to", state(version, "01-populated")], capsys
    )
    assert rc == ExitCode.OK, err
    assert "add_cluster" in out and "add_certificate" in out and "add_backend" in out
    assert "cluster app1" in out
    assert "PRIVATE KEY" not in out + err
    # one line per step, besides the header lines
    body = [line for line in out.splitlines() if line.strip() and not line.startswith("#")]
    assert len(body) >= 30


async def test_offline_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run(
        ["plan", "--json", "--from", state("2.1.0", "00-initial"), "--to", state("2.1.0", "01-populated")], capsys
    )
    assert rc == ExitCode.OK, err
    assert "PRIVATE KEY" not in out + err
    doc = json.loads(out)
    kinds = [step["request_type"] for step in doc["plan"]]
    assert kinds.count("add_certificate") == 5  # 01-populated holds five certificate records
    assert kinds.count("add_cluster") == 6
    # the certificates are there, their keys are not
    assert "BEGIN CERTIFICATE" in out


async def test_offline_empty_plan(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = await run(["plan", "--from", state("1.1.1", "02-mid"), "--to", state("1.1.1", "02-mid")], capsys)
    assert rc == ExitCode.OK
    assert "nothing to do" in out


async def test_offline_safety_valve_and_force(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--from", state("2.1.0", "01-populated"), "--to", state("2.1.0", "00-initial")]
    rc, out, err = await run(argv, capsys)
    assert rc == ExitCode.UNSAFE
    assert "max_removal_ratio" in err and out == ""
    rc, out, err = await run([*argv, "--force"], capsys)
    assert rc == ExitCode.OK, err
    assert "remove_backend" in out
    rc, _, _ = await run([*argv, "--max-removal-ratio", "1.0"], capsys)
    assert rc == ExitCode.OK


async def test_offline_errors_name_the_file(workdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    missing = os.path.join(workdir, "missing.state")
    rc, _, err = await run(["plan", "--from", state("2.1.0", "00-initial"), "--to", missing], capsys)
    assert rc == ExitCode.ERROR and missing in err and len(err.strip().splitlines()) == 1
    broken = os.path.join(workdir, "broken.state")
    with open(broken, "wb") as f:  # noqa: ASYNC230 - a tiny test file
        f.write(b'{"id":"SAVE-0","content":{"request_type":{"ADD_CLUSTER":{}}}}')  # no final NUL
    rc, _, err = await run(["plan", "--from", state("2.1.0", "00-initial"), "--to", broken], capsys)
    assert rc == ExitCode.ERROR and broken in err and len(err.strip().splitlines()) == 1
    rc, _, err = await run(
        ["plan", "--from", state("2.1.0", "00-initial"), "--to", state("0.15.19", "01-populated")], capsys
    )
    assert rc == ExitCode.ERROR and "0.15" in err
    rc, _, err = await run(["plan", "--from", state("2.1.0", "00-initial")], capsys)
    assert rc == ExitCode.ERROR and "--to" in err


# --- against the simulator ------------------------------------------------------------------------------


async def test_plan_against_the_simulator_table_and_json(workdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    async with simulator(workdir, "2.1.0", state("2.1.0", "01-populated")) as fake:
        before = len(fake.requests)
        argv = [
            "plan",
            "--socket",
            fake.socket_path,
            "--desired",
            state("2.1.0", "03-final"),
            "--sozu-version",
            "2.1.0",
        ]
        rc, out, err = await run([*argv, "--force"], capsys)
        assert rc == ExitCode.OK, err
        assert "remove_cluster" in out and "PRIVATE KEY" not in out + err
        rc, out, err = await run([*argv, "--force", "--json", "--shared-dir", workdir], capsys)
        assert rc == ExitCode.OK, err
        assert "PRIVATE KEY" not in out + err
        assert any(step["request_type"] == "remove_cluster" for step in json.loads(out)["plan"])
        # planning sends no mutation
        kinds = {r.WhichOneof("request_type") for r in fake.requests[before:]}
        assert not {k for k in kinds if k and k.startswith(("add_", "remove_", "replace_"))}


async def test_apply_against_the_simulator(workdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    target = state("2.1.0", "02-mid")
    async with simulator(workdir, "2.1.0", state("2.1.0", "01-populated")) as fake:
        argv = ["plan", "--socket", fake.socket_path, "--desired", target, "--shared-dir", workdir]
        rc, out, err = await run([*argv, "--apply"], capsys)
        assert rc == ExitCode.OK, err
        assert "converged" in out and "PRIVATE KEY" not in out + err
        assert "found no listener" in out  # the fixture's listener-less frontend: kept by main, refused by workers
        rc, out, err = await run(argv, capsys)
        assert rc == ExitCode.OK and "nothing to do" in out
        path = os.path.join(workdir, "after.state")
        ch = SozuChannel(fake.socket_path, version=SozuVersion.parse("2.1.0"))
        try:
            await ch.request(pb.Request(save_state=path))
        finally:
            await ch.aclose()
        version = SozuVersion.parse("2.1.0")
        live = parse_state_file(await asyncio.to_thread(Path(path).read_bytes), version, source=path)
        desired = parse_state_file(await asyncio.to_thread(Path(target).read_bytes), version, source=target)
        assert live == desired


async def test_apply_refused_by_the_safety_valve(workdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    async with simulator(workdir, "1.1.1", state("1.1.1", "01-populated")) as fake:
        argv = ["plan", "--socket", fake.socket_path, "--desired", state("1.1.1", "00-initial"), "--apply"]
        before = len(fake.requests)
        rc, _, err = await run([*argv, "--sozu-version", "1.1.1"], capsys)
        assert rc == ExitCode.UNSAFE and "max_removal_ratio" in err
        assert not [r for r in fake.requests[before:] if (r.WhichOneof("request_type") or "").startswith("remove_")]
        rc, out, err = await run([*argv, "--sozu-version", "1.1.1", "--force", "--json"], capsys)
        assert rc == ExitCode.OK, err
        assert json.loads(out)["apply"]["converged"] is True
        assert "PRIVATE KEY" not in out + err


async def test_unreachable_socket_is_one_clear_line(workdir: str, capsys: pytest.CaptureFixture[str]) -> None:
    from sozud.log import configure_logging

    configure_logging("error")  # what sozud.main does for one-shot commands
    sock = os.path.join(workdir, "nobody.sock")
    rc, out, err = await run(
        ["plan", "--socket", sock, "--desired", state("2.1.0", "01-populated"), "--sozu-version", "2.1.0"], capsys
    )
    assert rc == ExitCode.ERROR and out == ""
    ours = [line for line in err.splitlines() if line.startswith("sozud plan:")]  # besides structured log lines
    assert len(ours) == 1 and sock in ours[0] and "connect" in ours[0]


# --- a changed object whose replacement cannot be sent (issue 12: a lost route) -----------------------


def _health_with_tags(version: str, n_tags: int, workdir: str) -> tuple[str, pb.RequestHttpFrontend]:
    """01-populated with the /health frontend of example.test carrying ``n_tags`` tags, as a state file."""
    from sozud.state.codec import write_state_file

    desired = parse_state_file(Path(state(version, "01-populated")).read_bytes(), source="fixture")
    health = next(
        (k, v)
        for k, v in desired.items()
        if k[0] == "http_frontend" and getattr(v, "hostname", "") == "example.test" and "/health" in str(v.path)
    )
    changed = pb.RequestHttpFrontend()
    changed.CopyFrom(health[1])
    for i in range(n_tags):
        changed.tags[f"tag{i:06d}"] = "x" * 8
    desired[health[0]] = changed
    path = os.path.join(workdir, "desired.state")
    Path(path).write_bytes(write_state_file(desired))
    return path, health[1]


async def test_a_changed_frontend_whose_replacement_cannot_be_sent_is_not_removed(
    workdir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    desired_path, original = _health_with_tags("2.1.0", 200_000, workdir)
    async with simulator(workdir, "2.1.0", state("2.1.0", "01-populated")) as fake:
        before = len(fake.requests)
        rc, _, err = await run(["plan", "--desired", desired_path, "--socket", fake.socket_path, "--apply"], capsys)
        sent = [r.WhichOneof("request_type") for r in fake.requests[before:]]
        fronts = [f for f in fake.state.http_fronts.values() if f.hostname == "example.test"]
    assert rc == ExitCode.ERROR and "desired.state, record" in err and "could never load it back" in err
    assert "remove_http_frontend" not in sent, "nothing may be removed when a request of the plan cannot be sent"
    assert any(f == original for f in fronts), "the /health route was lost"


async def test_a_plan_with_a_request_over_the_frame_limit_sends_nothing(workdir: str) -> None:
    """Below the record limit but above what the channel may send (a lower max_frame_bytes): the plan
    is refused before its first request, so the changed frontend is not removed first."""
    from sozud.errors import StateError
    from sozud.state.apply import apply_plan

    desired_path, original = _health_with_tags("2.1.0", 6_000, workdir)  # a record of ~150 kB
    desired = parse_state_file(Path(desired_path).read_bytes(), source="desired")  # noqa: ASYNC240 - small file
    async with simulator(workdir, "2.1.0", state("2.1.0", "01-populated")) as fake:
        ch = SozuChannel(fake.socket_path, version=SozuVersion.parse("2.1.0"), max_frame_bytes=100_000)
        try:
            before = len(fake.requests)
            with pytest.raises(StateError, match=r"plan refused, nothing was sent: .* max_frame_bytes=100000"):
                await apply_plan(ch, desired)
            sent = [r.WhichOneof("request_type") for r in fake.requests[before:]]
        finally:
            await ch.aclose()
        fronts = [f for f in fake.state.http_fronts.values() if f.hostname == "example.test"]
    assert not [k for k in sent if k.startswith(("add_", "remove_"))], f"requests were sent: {sent}"
    assert any(f == original for f in fronts)
