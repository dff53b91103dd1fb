"""SozuChannel against a small scripted sozu (a unix server in this file).

The fake speaks the framing of the version it plays (protobuf for 1.x/2.x, JSON + NUL for 0.15), answers
like the real main process where the docs say how (§3, §11, §12: 0.15 closes the connection on a frame it
cannot parse, 1.x/2.x never answer a request type they do not know), records every request and whether
two were ever in flight at once on one connection, and lets each test script misbehaviours.
"""

from __future__ import annotations

import asyncio
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
from conftest import FIXTURES

from sozud import serde
from sozud.backoff import Backoff
from sozud.errors import (
    SozuConnectionError,
    SozuProtocolError,
    SozuRequestError,
    SozuTimeoutError,
    SozuUnsupportedError,
    StateParseError,
)
from sozud.proto import command_pb2 as pb
from sozud.reconnect import LinkState
from sozud.socket_proto import JsonFraming, ProtobufFraming, SozuChannel, request_summary
from sozud.testing.cluster import wait_until
from sozud.versions import SozuVersion

V015 = SozuVersion.parse("0.15.19")
V1 = SozuVersion.parse("1.1.1")
V2 = SozuVersion.parse("2.1.0")
FAST = Backoff(initial_s=0.001, max_s=0.002)


def fast_backoff() -> Backoff:
    return Backoff(initial_s=FAST.initial_s, max_s=FAST.max_s)


# --- the fake ---------------------------------------------------------------------------------------------


def pframe(payload: bytes) -> bytes:
    return struct.pack("<Q", len(payload) + 8) + payload


def ok(message: str = "ok", content: pb.ResponseContent | None = None) -> pb.Response:
    resp = pb.Response(status=pb.OK, message=message)
    if content is not None:
        resp.content.CopyFrom(content)
    return resp


def processing(message: str) -> pb.Response:
    return pb.Response(status=pb.PROCESSING, message=message)


def failure(message: str) -> pb.Response:
    return pb.Response(status=pb.FAILURE, message=message)


def event(
    kind: pb.EventKind.ValueType, message: str = "main", *, cluster_id: str | None = None, backend_id: str | None = None
) -> pb.Response:
    ev = pb.Event(kind=kind, cluster_id=cluster_id, backend_id=backend_id)
    return pb.Response(status=pb.PROCESSING, message=message, content=pb.ResponseContent(event=ev))


@dataclass
class Conn:
    """One accepted connection of the fake."""

    fake: FakeSozu
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    number: int
    busy: bool = False
    requests: list[pb.Request] = field(default_factory=list)

    def send(self, resp: pb.Response) -> None:
        if self.fake.version.json_socket:
            self.writer.write(msgspec.json.encode(serde.to_json(resp, self.fake.version)) + b"\0")
        else:
            self.writer.write(pframe(resp.SerializeToString(deterministic=True)))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


Behaviour = Callable[[pb.Request, Conn], Awaitable[None]]


async def default_behaviour(req: pb.Request, conn: Conn) -> None:
    """PROCESSING, a few turns of the event loop (room for a misbehaving client), then OK naming the request."""
    kind = req.WhichOneof("request_type")
    conn.send(processing("Processing worker request..."))
    for _ in range(3):
        await asyncio.sleep(0)
    if kind == "list_listeners":
        conn.send(ok("Successfully listed listeners", pb.ResponseContent(listeners_list=pb.ListenersList())))
        return
    if kind == "query_health_checks":
        conn.send(
            ok("Successfully queried health checks", pb.ResponseContent(health_checks_list=pb.HealthChecksList()))
        )
        return
    assert kind is not None
    ident = getattr(req, kind)
    name = ident if isinstance(ident, str) else getattr(ident, "cluster_id", "")
    conn.send(ok(f"done {kind} {name}".strip()))


class FakeSozu:
    """A scripted sozu main process on a unix socket."""

    def __init__(self, path: Path, version: SozuVersion) -> None:
        self.path = path
        self.version = version
        self.behaviour: Behaviour = default_behaviour
        self.script: list[Behaviour] = []  # one-shot behaviours for the next requests, in order
        self.conns: list[Conn] = []
        self.overlaps = 0
        self.received: list[tuple[int, pb.Request]] = []  # (connection number, request)
        self.garbage_closes = 0
        self.subscribers: list[Conn] = []
        self.subscribed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()  # one per connection (asyncio's server tasks)
        self._workers: set[asyncio.Task[None]] = set()  # the behaviours run here

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path))

    async def stop(self) -> None:
        """Like a dying sozu: stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        # A connection accepted just before the close may get its handler a few loop turns later: drain
        # until nothing new shows up. Handlers end by themselves on the EOF of their closed connection
        # (cancelling asyncio's server tasks would make asyncio log them as errors).
        quiet_turns = 0
        while quiet_turns < 3:
            for c in self.conns:
                c.writer.close()
            for w in list(self._workers):
                w.cancel()  # a behaviour that never ends
            pending = [*self._workers, *self._handlers]
            await asyncio.gather(*pending, return_exceptions=True)
            await asyncio.sleep(0)  # one loop turn, for callbacks already scheduled (not a timed wait)
            quiet_turns = 0 if pending else quiet_turns + 1
        if self.path.exists():
            self.path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # accepted just before stop(): a dead sozu serves nothing
            writer.close()
            return
        conn = Conn(self, reader, writer, len(self.conns) + 1)
        self.conns.append(conn)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        queue: asyncio.Queue[pb.Request | None] = asyncio.Queue()
        worker = asyncio.create_task(self._work(conn, queue))
        self._workers.add(worker)
        worker.add_done_callback(self._workers.discard)
        try:
            while True:
                req = await self._read_request(conn)
                if req is None:
                    break
                if conn.busy:
                    self.overlaps += 1
                conn.busy = True
                await queue.put(req)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            await queue.put(None)
            await asyncio.gather(worker, return_exceptions=True)
            writer.close()
            self._handlers.discard(task)

    async def _read_request(self, conn: Conn) -> pb.Request | None:
        if self.version.json_socket:
            chunk = (await conn.reader.readuntil(b"\0"))[:-1]
            try:
                return serde.from_json(pb.Request, msgspec.json.decode(chunk), self.version)
            except (msgspec.DecodeError, StateParseError):
                self.garbage_closes += 1  # 0.15: "could not decode client message", connection closed
                return None
        head = await conn.reader.readexactly(8)
        req = pb.Request()
        req.ParseFromString(await conn.reader.readexactly(int.from_bytes(head, "little") - 8))
        return req

    async def _work(self, conn: Conn, queue: asyncio.Queue[pb.Request | None]) -> None:
        while (req := await queue.get()) is not None:
            conn.requests.append(req)
            self.received.append((conn.number, req))
            kind = req.WhichOneof("request_type")
            try:
                if kind is None or not self.version.knows_request(kind):
                    continue  # 1.x/2.x: an empty or unknown request is never answered
                if kind == "subscribe_events":
                    if self.version.json_socket:
                        conn.send(ok("Successfully Added CL-1 to subscribers"))
                    elif self.version >= V2:
                        conn.send(event(pb.EVENTS_SUBSCRIBED))
                    async with self.subscribed:
                        self.subscribers.append(conn)
                        self.subscribed.notify_all()
                    continue
                behaviour = self.script.pop(0) if self.script else self.behaviour
                await behaviour(req, conn)
                await conn.writer.drain()
            except ConnectionError:
                return
            finally:
                conn.busy = False

    async def wait_subscribers(self, n: int) -> list[Conn]:
        async with self.subscribed:
            await self.subscribed.wait_for(lambda: len(self.subscribers) >= n)
        return self.subscribers

    def kinds(self) -> list[str | None]:
        return [r.WhichOneof("request_type") for _, r in self.received]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sz"))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@asynccontextmanager
async def running(path: Path, version: SozuVersion) -> AsyncIterator[FakeSozu]:
    fake = FakeSozu(path, version)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def add_cluster(cluster_id: str) -> pb.Request:
    return pb.Request(
        add_cluster=pb.Cluster(
            cluster_id=cluster_id, sticky_session=False, https_redirect=False, load_balancing=pb.ROUND_ROBIN
        )
    )


def add_backend(cluster_id: str = "c1", backend_id: str = "b1") -> pb.Request:
    return pb.Request(
        add_backend=pb.AddBackend(
            cluster_id=cluster_id,
            backend_id=backend_id,
            address=serde.parse_address("127.0.0.1:8080"),
            load_balancing_parameters=pb.LoadBalancingParams(weight=100),
        )
    )


STATUS = pb.Request(status=pb.Status())


# --- sequencing --------------------------------------------------------------------------------------------


async def test_fake_detects_overlapping_requests(sock_dir: Path) -> None:
    """The fake's overlap detector works (otherwise the next test could not fail)."""
    async with running(sock_dir / "s", V2) as fake:
        reader, writer = await asyncio.open_unix_connection(str(sock_dir / "s"))
        frame = ProtobufFraming(socket_path="t", max_frame_bytes=10_000).encode(add_cluster("x"))
        writer.write(frame + frame)
        framing = ProtobufFraming(socket_path="t", max_frame_bytes=10_000)
        finals = 0
        while finals < 2:
            if (await framing.read(reader)).status == pb.OK:
                finals += 1
        writer.close()
        assert fake.overlaps == 1


async def test_concurrent_requests_never_overlap_and_get_their_own_answers(sock_dir: Path) -> None:
    async with running(sock_dir / "s", V2) as fake, SozuChannel(str(sock_dir / "s"), version=V2) as ch:
        replies = await asyncio.gather(*(ch.request(add_cluster(f"app-{i}")) for i in range(60)))
        assert [r.response.message for r in replies] == [f"done add_cluster app-{i}" for i in range(60)]
        assert all([p.message for p in r.processing] == ["Processing worker request..."] for r in replies)
        assert fake.overlaps == 0
        assert len(fake.received) == 60
        assert {n for n, _ in fake.received} == {1}  # one connection for all requests
        assert ch.epoch == 1


async def test_processing_frames_are_collected(sock_dir: Path) -> None:
    async def three_steps(req: pb.Request, conn: Conn) -> None:
        conn.send(processing("Parsing state file from /x..."))
        conn.send(processing("Applying state file..."))
        conn.send(ok("Successfully loaded state from path /x, 4 ok messages, 0 errors"))

    async with running(sock_dir / "s", V2) as fake, SozuChannel(str(sock_dir / "s"), version=V2) as ch:
        fake.script.append(three_steps)
        reply = await ch.request(pb.Request(load_state="/x"))
        assert [p.message for p in reply.processing] == ["Parsing state file from /x...", "Applying state file..."]
        assert all(p.status == pb.PROCESSING for p in reply.processing)
        assert reply.response.status == pb.OK
        assert reply.response.message == "Successfully loaded state from path /x, 4 ok messages, 0 errors"


async def test_failure_raises_request_error_with_sozus_text(sock_dir: Path) -> None:
    text = "could not dispatch request on the main process state: Did not find Cluster with address or id 'nope'"

    async def refuse(req: pb.Request, conn: Conn) -> None:
        conn.send(failure(text))

    async with running(sock_dir / "s", V1) as fake, SozuChannel(str(sock_dir / "s"), version=V1) as ch:
        fake.script.append(refuse)
        with pytest.raises(SozuRequestError) as err:
            await ch.request(pb.Request(remove_cluster="nope"))
        assert err.value.sozu_message == text
        assert err.value.request_kind == "remove_cluster"
        assert err.value.request_summary == "nope"
        assert str(sock_dir / "s") in str(err.value)
        # a FAILURE is an answer: the connection stays in use
        assert (await ch.request(STATUS)).response.status == pb.OK
        assert ch.epoch == 1


async def test_failure_of_add_certificate_never_shows_the_key(sock_dir: Path) -> None:
    key = (FIXTURES / "certs" / "example.test.key").read_text()
    cert = (FIXTURES / "certs" / "example.test.pem").read_text()

    async def refuse(req: pb.Request, conn: Conn) -> None:
        conn.send(failure("1: found no listener with address 127.0.0.1:21099"))

    req = pb.Request(
        add_certificate=pb.AddCertificate(
            address=serde.parse_address("127.0.0.1:21099"),
            certificate=pb.CertificateAndKey(certificate=cert, key=key, names=["example.test"]),
        )
    )
    async with running(sock_dir / "s", V2) as fake, SozuChannel(str(sock_dir / "s"), version=V2) as ch:
        fake.script.append(refuse)
        with pytest.raises(SozuRequestError) as err:
            await ch.request(req)
    shown = str(err.value) + err.value.request_summary
    assert "PRIVATE KEY" not in shown and key.splitlines()[1] not in shown
    assert "127.0.0.1:21099" in err.value.request_summary and "example.test" in err.value.request_summary


def test_request_summary_names_the_object() -> None:
    assert request_summary(add_backend("app1", "b0")) == "cluster_id=app1 backend_id=b0 address=127.0.0.1:8080"
    fe = pb.Request(
        remove_http_frontend=pb.RequestHttpFrontend(
            cluster_id="app1",
            address=serde.parse_address("[::1]:80"),
            hostname="example.test",
            path=pb.PathRule(kind=pb.PREFIX, value="/api"),
            position=pb.TREE,
        )
    )
    assert request_summary(fe) == "cluster_id=app1 hostname=example.test path=prefix:/api address=[::1]:80"
    assert request_summary(pb.Request(status=pb.Status())) == ""


# --- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "req"),
    [
        (V1, pb.Request(query_health_checks=pb.QueryHealthChecks())),
        (V1, pb.Request(set_max_connections_per_ip=3)),
        (V1, pb.Request()),
        (V2, pb.Request()),
        (V2, pb.Request(subscribe_events=pb.SubscribeEvents())),
        (V2, pb.Request(launch_worker="x")),
        (V015, pb.Request(remove_health_check="c")),
    ],
)
async def test_unsupported_requests_are_refused_without_sending(
    sock_dir: Path, version: SozuVersion, req: pb.Request
) -> None:
    async with running(sock_dir / "s", version) as fake, SozuChannel(str(sock_dir / "s"), version=version) as ch:
        with pytest.raises(SozuUnsupportedError) as err:
            await ch.request(req)
        assert str(sock_dir / "s") in str(err.value)
        assert fake.received == []


async def test_field_unknown_to_1x_is_refused_not_dropped(sock_dir: Path) -> None:
    req = add_cluster("app")
    req.add_cluster.http2 = True  # 2.0.0 field: 1.1.1 would skip it without a word
    async with running(sock_dir / "s", V1) as fake, SozuChannel(str(sock_dir / "s"), version=V1) as ch:
        with pytest.raises(SozuUnsupportedError, match="http2"):
            await ch.request(req)
        assert fake.received == []


async def test_detected_version_gates_requests(sock_dir: Path) -> None:
    """With the version unknown, the channel connects and detects first, then refuses a 2.x-only type."""
    async with running(sock_dir / "s", V1) as fake:
        async with SozuChannel(str(sock_dir / "s"), probe_timeout_s=0.05) as ch:
            with pytest.raises(SozuUnsupportedError):
                await ch.request(pb.Request(remove_health_check="c"))
            assert ch.version == V1
        assert "remove_health_check" not in fake.kinds()


async def test_oversize_request_is_refused(sock_dir: Path) -> None:
    big = pb.Request(save_state="/" + "x" * 5000)
    async with running(sock_dir / "s", V2) as fake:
        async with SozuChannel(str(sock_dir / "s"), version=V2, max_frame_bytes=1000) as ch:
            with pytest.raises(SozuProtocolError, match="max_frame_bytes"):
                await ch.request(big)
        assert fake.received == []


# --- timeouts and broken streams ---------------------------------------------------------------------------


async def test_unanswered_request_times_out_and_late_answer_is_never_misattributed(sock_dir: Path) -> None:
    release = asyncio.Event()

    async def late(req: pb.Request, conn: Conn) -> None:
        await release.wait()
        conn.send(ok("late answer"))

    path = str(sock_dir / "s")
    async with running(sock_dir / "s", V2) as fake, SozuChannel(path, version=V2) as ch:
        fake.script.append(late)
        with pytest.raises(SozuTimeoutError) as err:
            await ch.request(add_cluster("slow"), timeout_s=0.05)
        assert path in str(err.value) and "add_cluster" in str(err.value)
        release.set()
        reply = await ch.request(add_cluster("next"))
        assert reply.response.message == "done add_cluster next"
        assert ch.epoch == 2
        assert [n for n, _ in fake.received] == [1, 2]


def _raw(data: bytes, *, then_close: bool = False) -> Behaviour:
    async def behaviour(req: pb.Request, conn: Conn) -> None:
        conn.send_raw(data)
        if then_close:
            await conn.writer.drain()
            conn.close()

    return behaviour


BROKEN = {
    "garbage": (_raw(b"\xde\xad\xbe\xef garbage that is no frame at all"), SozuProtocolError),
    "oversize-length": (_raw(struct.pack("<Q", 1 << 40)), SozuProtocolError),
    "just-over-max": (_raw(struct.pack("<Q", 100_001) + b"\0" * 100), SozuProtocolError),
    "short-length-0": (_raw(struct.pack("<Q", 0)), SozuProtocolError),
    "short-length-5": (_raw(struct.pack("<Q", 5) + b"\x08\x00"), SozuProtocolError),
    "undecodable-payload": (_raw(pframe(b"\xff\xff\xff\xff")), SozuProtocolError),
    "missing-required-fields": (_raw(pframe(b"\x08\x00")), SozuProtocolError),  # status only, no message
    "unknown-status": (_raw(pframe(b"\x08\x07\x12\x02ok")), SozuProtocolError),
    "empty-payload": (_raw(pframe(b"")), SozuProtocolError),
    "eof-in-prefix": (_raw(b"\x10\x00\x00", then_close=True), SozuConnectionError),
    "eof-mid-payload": (_raw(struct.pack("<Q", 108) + b"\x08" * 10, then_close=True), SozuConnectionError),
    "eof-no-answer": (_raw(b"", then_close=True), SozuConnectionError),
    "eof-after-processing": (
        _raw(pframe(processing("Processing worker request...").SerializeToString()), then_close=True),
        SozuConnectionError,
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_broken_answer_gives_typed_error_then_reconnects(sock_dir: Path, case: str) -> None:
    behaviour, error = BROKEN[case]
    path = str(sock_dir / "s")
    async with running(sock_dir / "s", V2) as fake:
        async with SozuChannel(path, version=V2, max_frame_bytes=100_000, backoff=fast_backoff()) as ch:
            fake.script.append(behaviour)
            with pytest.raises(error) as err:
                await ch.request(add_cluster("first"))
            assert path in str(err.value)
            assert not ch.connected
            reply = await ch.request(add_cluster("second"))
            assert reply.response.message == "done add_cluster second"
            assert ch.epoch == 2
        assert [n for n, _ in fake.received] == [1, 2]


async def test_request_waiting_behind_a_stuck_one_times_out_unsent(sock_dir: Path) -> None:
    started = asyncio.Event()
    never = asyncio.Event()

    async def hang(req: pb.Request, conn: Conn) -> None:
        started.set()
        await never.wait()

    async with running(sock_dir / "s", V2) as fake, SozuChannel(str(sock_dir / "s"), version=V2) as ch:
        fake.script.append(hang)
        stuck = asyncio.create_task(ch.request(add_cluster("stuck"), timeout_s=3600))
        await started.wait()
        with pytest.raises(SozuTimeoutError, match="nothing was sent"):
            await ch.request(add_cluster("queued"), timeout_s=0.05)
        assert fake.kinds() == ["add_cluster"] and fake.received[0][1].add_cluster.cluster_id == "stuck"
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck


async def test_cancelled_request_drops_the_connection(sock_dir: Path) -> None:
    started = asyncio.Event()
    never = asyncio.Event()

    async def hang(req: pb.Request, conn: Conn) -> None:
        started.set()
        await never.wait()

    async with running(sock_dir / "s", V2) as fake, SozuChannel(str(sock_dir / "s"), version=V2) as ch:
        fake.script.append(hang)
        task = asyncio.create_task(ch.request(add_cluster("a")))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await ch.request(add_cluster("b"))).response.message == "done add_cluster b"
        assert ch.epoch == 2


async def test_connect_gives_up_after_max_attempts(sock_dir: Path) -> None:
    path = str(sock_dir / "missing.sock")
    ch = SozuChannel(path, version=V2, max_connect_attempts=3, backoff=fast_backoff())
    with pytest.raises(SozuConnectionError) as err:
        await ch.connect()
    assert path in str(err.value) and "after 3 connection attempt" in str(err.value)
    assert ch.epoch == 0


async def test_request_when_sozu_is_down_fails_with_connection_error(sock_dir: Path) -> None:
    path = str(sock_dir / "missing.sock")
    async with SozuChannel(path, version=V2, backoff=fast_backoff(), request_timeout_s=0.05) as ch:
        with pytest.raises(SozuConnectionError) as err:
            await ch.request(STATUS)
        assert path in str(err.value)


async def test_request_while_connect_retries_says_cannot_connect(sock_dir: Path) -> None:
    """A ``connect()`` retrying against a missing socket (the daemon's events loop while sozu is down)
    must not hold the request lock: a request meanwhile fails with the connection error, not "busy"."""
    path = str(sock_dir / "missing.sock")
    backoff = fast_backoff()
    async with SozuChannel(path, version=V2, backoff=backoff, request_timeout_s=0.2) as ch:
        connecting = asyncio.create_task(ch.connect())
        await wait_until(lambda: backoff.attempts >= 2, what="connect() retrying")
        with pytest.raises(SozuConnectionError) as err:
            await ch.request(STATUS)
        assert path in str(err.value) and "cannot connect" in str(err.value)
        assert not connecting.done()
    with pytest.raises(SozuConnectionError, match="closed"):
        await connecting


async def test_request_after_aclose_is_refused(sock_dir: Path) -> None:
    async with running(sock_dir / "s", V2):
        ch = SozuChannel(str(sock_dir / "s"), version=V2)
        await ch.request(STATUS)
        await ch.aclose()
        with pytest.raises(SozuConnectionError, match="closed"):
            await ch.request(STATUS)


async def test_version_property_before_connect() -> None:
    ch = SozuChannel("/nonexistent/sozu.sock")
    with pytest.raises(SozuConnectionError):
        _ = ch.version
    assert SozuChannel("/nonexistent/sozu.sock", version=V1).version == V1


# --- reconnection and epochs ---------------------------------------------------------------------------


async def test_epoch_and_listeners_after_sozu_restart(sock_dir: Path) -> None:
    path = sock_dir / "s"
    seen: list[int] = []
    fake = FakeSozu(path, V2)
    await fake.start()
    ch = SozuChannel(str(path), version=V2, backoff=fast_backoff())
    ch.add_reconnect_listener(seen.append)
    try:
        await ch.request(STATUS)
        await ch.request(STATUS)
        assert (ch.epoch, seen) == (1, [])
        await fake.stop()
        fake = FakeSozu(path, V2)
        await fake.start()
        # the old connection is dead; a request either notices the EOF before sending (transparent
        # reconnect) or gets it as a connection error, and the next one reconnects
        for _ in range(2):
            try:
                await ch.request(STATUS)
                break
            except SozuConnectionError:
                continue
        assert ch.epoch == 2
        assert seen == [2]
        assert len(fake.received) == 1
    finally:
        await ch.aclose()
        await fake.stop()


async def test_failing_listener_does_not_break_the_channel(sock_dir: Path) -> None:
    def boom(epoch: int) -> None:
        raise ValueError("listener bug")

    async with running(sock_dir / "s", V2) as fake, SozuChannel(str(sock_dir / "s"), version=V2) as ch:
        ch.add_reconnect_listener(boom)
        fake.script.append(_raw(b"", then_close=True))
        with pytest.raises(SozuConnectionError):
            await ch.request(STATUS)
        assert (await ch.request(STATUS)).response.status == pb.OK
        assert ch.epoch == 2


async def first_of(wanted: Awaitable[list[Conn]], other: asyncio.Task[pb.Event]) -> list[Conn]:
    """``wanted``, unless ``other`` finishes first (then fail instead of waiting forever)."""
    task = asyncio.ensure_future(wanted)
    done, _ = await asyncio.wait({task, other}, return_when=asyncio.FIRST_COMPLETED)
    if task not in done:
        task.cancel()
        pytest.fail(f"the subscription ended or yielded too early: {other.result()!r}")
    return task.result()


# --- events -----------------------------------------------------------------------------------------------


async def test_events_2x_skip_the_ack_and_keep_duplicates(sock_dir: Path) -> None:
    async with running(sock_dir / "s", V2) as fake, SozuChannel(str(sock_dir / "s"), version=V2) as ch:
        await ch.request(STATUS)  # the request connection exists first
        sub = ch.subscribe_events()
        first = asyncio.create_task(anext(sub))
        (conn,) = await fake.wait_subscribers(1)
        assert conn.number == 2  # a connection of its own
        for _ in range(2):  # 2.1.0 sends most main events twice
            conn.send(event(pb.CLUSTER_ADDED, cluster_id="app1"))
        conn.send(event(pb.REMOVED_BACKEND_HAS_NO_CONNECTIONS, message="0", backend_id="b0"))
        got = [await first, await anext(sub), await anext(sub)]
        assert [e.kind for e in got] == [pb.CLUSTER_ADDED, pb.CLUSTER_ADDED, pb.REMOVED_BACKEND_HAS_NO_CONNECTIONS]
        assert got[0].cluster_id == "app1" and got[2].backend_id == "b0"
        assert sub.epoch == 1
        # the request connection still works and never saw the subscription
        assert (await ch.request(STATUS)).response.status == pb.OK
        assert [r.WhichOneof("request_type") for r in fake.conns[0].requests] == ["status", "status"]
        await sub.aclose()


async def test_events_1x_no_ack(sock_dir: Path) -> None:
    async with running(sock_dir / "s", V1) as fake, SozuChannel(str(sock_dir / "s"), version=V1) as ch:
        sub = ch.subscribe_events()
        nxt = asyncio.create_task(anext(sub))
        (conn,) = await fake.wait_subscribers(1)
        conn.send(event(pb.REMOVED_BACKEND_HAS_NO_CONNECTIONS, message="1", backend_id="b9"))
        ev = await nxt
        assert (ev.kind, ev.backend_id) == (pb.REMOVED_BACKEND_HAS_NO_CONNECTIONS, "b9")
        await sub.aclose()


async def test_events_015_skip_the_ok_ack(sock_dir: Path) -> None:
    async with running(sock_dir / "s", V015) as fake, SozuChannel(str(sock_dir / "s"), version=V015) as ch:
        sub = ch.subscribe_events()
        nxt = asyncio.create_task(anext(sub))
        (conn,) = await fake.wait_subscribers(1)
        ev = pb.Event(kind=pb.REMOVED_BACKEND_HAS_NO_CONNECTIONS, backend_id="b1")
        ev.address.CopyFrom(serde.parse_address("127.0.0.1:15901"))
        conn.send(pb.Response(status=pb.PROCESSING, message="0", content=pb.ResponseContent(event=ev)))
        got = await nxt
        assert got.backend_id == "b1" and serde.address_text(got.address) == "127.0.0.1:15901"
        await sub.aclose()


async def test_events_resubscribe_after_connection_loss(sock_dir: Path) -> None:
    async with running(sock_dir / "s", V2) as fake:
        ch = SozuChannel(str(sock_dir / "s"), version=V2, backoff=fast_backoff())
        sub = ch.subscribe_events()
        nxt = asyncio.create_task(anext(sub))
        (conn,) = await fake.wait_subscribers(1)
        conn.send(event(pb.CLUSTER_REMOVED, cluster_id="a"))
        assert (await nxt).cluster_id == "a"
        nxt = asyncio.create_task(anext(sub))
        conn.close()  # sozu restarted, say
        subs = await first_of(fake.wait_subscribers(2), nxt)
        subs[1].send(event(pb.CLUSTER_ADDED, cluster_id="b"))
        assert (await nxt).cluster_id == "b"
        assert sub.epoch == 2
        await ch.aclose()  # closes the subscription too
        with pytest.raises(StopAsyncIteration):
            await anext(sub)


async def test_events_resubscribe_at_once_when_the_channel_reconnects(sock_dir: Path) -> None:
    """The subscription waits out its backoff while sozu is down, unless the channel reconnects first."""
    path = sock_dir / "s"
    fake = FakeSozu(path, V2)
    await fake.start()
    hour = Backoff(initial_s=3600.0, max_s=3600.0)
    ch = SozuChannel(str(path), version=V2, backoff=hour)
    try:
        await ch.request(STATUS)
        sub = ch.subscribe_events()
        nxt = asyncio.create_task(anext(sub))
        await fake.wait_subscribers(1)
        await fake.stop()  # the subscription's next attempt fails: it waits (up to an hour)
        await wait_until(lambda: sub.state is LinkState.WAITING, what="the subscription waiting")
        fake = FakeSozu(path, V2)
        await fake.start()
        await ch.request(STATUS)  # the channel reconnects (epoch 2): the subscription's wait is cut short
        await wait_until(lambda: len(fake.subscribers) == 1, what="a new subscription before the backoff ends")
        (conn,) = fake.subscribers
        conn.send(event(pb.CLUSTER_ADDED, cluster_id="back"))
        assert (await nxt).cluster_id == "back" and sub.epoch == 2
    finally:
        await ch.aclose()
        await fake.stop()


async def test_events_bad_frame_resubscribes(sock_dir: Path) -> None:
    async with running(sock_dir / "s", V2) as fake:
        ch = SozuChannel(str(sock_dir / "s"), version=V2, backoff=fast_backoff())
        sub = ch.subscribe_events()
        nxt = asyncio.create_task(anext(sub))
        (conn,) = await fake.wait_subscribers(1)
        conn.send_raw(pframe(b"\xff\xff"))
        subs = await first_of(fake.wait_subscribers(2), nxt)
        subs[1].send(event(pb.CLUSTER_ADDED, cluster_id="after"))
        assert (await nxt).cluster_id == "after"
        await ch.aclose()


# --- 0.15 JSON mode -----------------------------------------------------------------------------------------


async def test_json_mode_end_to_end(sock_dir: Path) -> None:
    async def status_answer(req: pb.Request, conn: Conn) -> None:
        conn.send_raw(b'{"status":1,"message":"Sending status requests to workers...","content":null}\0')
        conn.send_raw(
            b'{"status":0,"message":"Sent a status response to client","content":{"content_type":'
            b'{"WORKERS":{"vec":[{"id":0,"pid":30250,"run_state":0}]}}}}\0'
        )

    async def refuse(req: pb.Request, conn: Conn) -> None:
        conn.send_raw(b'{"status":2,"message":"Could not execute request on the state: nope","content":null}\0')

    async with running(sock_dir / "s", V015) as fake, SozuChannel(str(sock_dir / "s"), version=V015) as ch:
        fake.script += [status_answer, refuse]
        reply = await ch.request(STATUS)
        assert [p.message for p in reply.processing] == ["Sending status requests to workers..."]
        assert [(w.id, w.pid) for w in reply.response.content.workers.vec] == [(0, 30250)]
        with pytest.raises(SozuRequestError) as err:
            await ch.request(add_backend("c1", "b1"))
        assert err.value.sozu_message == "Could not execute request on the state: nope"
        reply = await ch.request(add_cluster("j"))
        assert reply.response.message == "done add_cluster j"
        raw = fake.conns[0]
        assert fake.overlaps == 0 and raw.requests[1].add_backend.address.port == 8080
    # the wire bytes, as sozu 0.15 expects them (addresses as strings, NUL-terminated)
    expected = (
        b'{"request_type":{"ADD_BACKEND":{"cluster_id":"c1","backend_id":"b1","address":"127.0.0.1:8080",'
        b'"sticky_id":null,"load_balancing_parameters":{"weight":100},"backup":null}}}\0'
    )
    assert JsonFraming(socket_path="t", max_frame_bytes=10_000).encode(add_backend("c1", "b1")) == expected


JSON_BROKEN = {
    "not-json": (_raw(b"this is not json\0"), SozuProtocolError),
    "not-a-response": (_raw(b'{"status":0}\0'), SozuProtocolError),
    "empty-chunk": (_raw(b"\0"), SozuProtocolError),
    "no-terminator-over-cap": (_raw(b'{"status":0,"message":"' + b"x" * 5000), SozuProtocolError),
    "eof-mid-frame": (_raw(b'{"status":0,', then_close=True), SozuConnectionError),
}


@pytest.mark.parametrize("case", sorted(JSON_BROKEN))
async def test_json_broken_answer_gives_typed_error_then_reconnects(sock_dir: Path, case: str) -> None:
    behaviour, error = JSON_BROKEN[case]
    path = sock_dir / "s"
    async with running(path, V015) as fake, SozuChannel(str(path), version=V015, max_frame_bytes=1000) as ch:
        fake.script.append(behaviour)
        with pytest.raises(error):
            await ch.request(add_cluster("first"))
        assert (await ch.request(add_cluster("second"))).response.message == "done add_cluster second"
        assert ch.epoch == 2


# --- version detection ------------------------------------------------------------------------------------


def _captured_listeners(version: str) -> bytes:
    return (FIXTURES / f"sozu-{version}" / "frames" / "003-listener-list-initial.resp-1.bin").read_bytes()


async def test_detect_015(sock_dir: Path) -> None:
    async with running(sock_dir / "s", V015) as fake:
        fake.script.append(_raw(_captured_listeners("0.15.19")))
        async with SozuChannel(str(sock_dir / "s"), backoff=fast_backoff()) as ch:
            await ch.connect()
            assert ch.version == V015
            assert fake.garbage_closes == 1  # the protobuf frame made "0.15" close the connection
            assert (await ch.request(add_cluster("x"))).response.message == "done add_cluster x"
            assert ch.epoch == 1
        assert fake.kinds() == ["list_listeners", "add_cluster"]
        assert [n for n, _ in fake.received] == [2, 2]  # the JSON connection is kept for requests


async def test_detect_2x_from_listeners(sock_dir: Path) -> None:
    async with running(sock_dir / "s", V2) as fake:
        fake.script.append(_raw(_captured_listeners("2.1.0")))
        async with SozuChannel(str(sock_dir / "s")) as ch:
            await ch.connect()
            assert ch.version == V2
            await ch.request(STATUS)
        assert fake.kinds() == ["list_listeners", "status"]  # no probe needed
        assert len(fake.conns) == 1


async def test_detect_2x_by_probe_when_no_listeners(sock_dir: Path) -> None:
    async with running(sock_dir / "s", V2) as fake:
        async with SozuChannel(str(sock_dir / "s"), probe_timeout_s=60.0) as ch:
            await ch.connect()
            assert ch.version == V2
            await ch.request(STATUS)
        assert fake.kinds() == ["list_listeners", "query_health_checks", "status"]
        assert [n for n, _ in fake.received] == [1, 2, 1]  # probe on a throw-away connection


async def test_detect_1x_by_unanswered_probe(sock_dir: Path) -> None:
    async with running(sock_dir / "s", V1) as fake:
        fake.script.append(_raw(_captured_listeners("1.1.1")))
        async with SozuChannel(str(sock_dir / "s"), probe_timeout_s=0.05) as ch:
            await ch.connect()
            assert ch.version == V1
            assert (await ch.request(add_cluster("y"))).response.message == "done add_cluster y"
            assert ch.epoch == 1
        assert fake.kinds() == ["list_listeners", "query_health_checks", "add_cluster"]
        assert [n for n, _ in fake.received] == [1, 2, 1]


async def test_redetects_after_reconnect(sock_dir: Path) -> None:
    """sozu replaced by another major version between two connections."""
    path = sock_dir / "s"
    fake = FakeSozu(path, V015)
    await fake.start()
    ch = SozuChannel(str(path), backoff=fast_backoff(), probe_timeout_s=0.05)
    try:
        fake.script.append(_raw(_captured_listeners("0.15.19")))
        await ch.connect()
        assert ch.version == V015
        await fake.stop()
        fake = FakeSozu(path, V2)
        await fake.start()
        fake.script.append(_raw(_captured_listeners("2.1.0")))
        for _ in range(2):
            try:
                await ch.request(STATUS)
                break
            except SozuConnectionError:
                continue
        assert ch.version == V2
        assert ch.epoch == 2
    finally:
        await ch.aclose()
        await fake.stop()


# --- against the simulator (sozud.testing.fake_sozu) ----------------------------------------------------------

from sozud.testing.fake_sozu import FakeSozu as Simulator  # noqa: E402


def _initial_state(version: str) -> bytes:
    return (FIXTURES / f"sozu-{version}" / "states" / "00-initial.state").read_bytes()


@pytest.mark.parametrize(
    ("version", "with_listeners"),
    [("0.15.19", True), ("1.1.1", True), ("1.1.1", False), ("2.1.0", True), ("2.1.0", False)],
)
async def test_simulator_version_detection(sock_dir: Path, version: str, with_listeners: bool) -> None:
    path = str(sock_dir / "s")
    config = _initial_state(version) if with_listeners else None
    async with Simulator(path, version, config_state=config) as sim:
        # a 1.x probe is never answered (its timeout is the wait); a 2.x one is, so give it all the time
        probe_timeout_s = 0.05 if version == "1.1.1" else 60.0
        async with SozuChannel(path, probe_timeout_s=probe_timeout_s, backoff=fast_backoff()) as ch:
            await ch.connect()
            assert ch.version == SozuVersion.parse(version)
            reply = await ch.request(pb.Request(list_listeners=pb.ListListeners()))
            listeners = reply.response.content.listeners_list
            assert len(listeners.http_listeners) == (1 if with_listeners else 0)
            assert ch.epoch == 1
        kinds = [r.WhichOneof("request_type") for r in sim.requests]
        if version == "2.1.0" and with_listeners:
            assert "query_health_checks" not in kinds  # decided from the listeners' 2.x fields


@pytest.mark.parametrize("version", ["0.15.19", "1.1.1", "2.1.0"])
async def test_simulator_concurrent_mutations_all_applied(sock_dir: Path, version: str) -> None:
    """Simulated sozu keeps only the last frame of one read: a pipelining client would lose requests."""
    path = str(sock_dir / "s")
    async with Simulator(path, version) as sim, SozuChannel(path, version=SozuVersion.parse(version)) as ch:
        await ch.request(add_cluster("bench"))
        await asyncio.gather(*(ch.request(add_backend("bench", f"b{i}")) for i in range(100)))
        reply = await ch.request(pb.Request(query_cluster_by_id="bench"))
        main = reply.response.content.worker_responses.map["main"]
        assert sorted(b.backend_id for b in main.clusters.vec[0].backends) == sorted(f"b{i}" for i in range(100))
        assert sim.connections_opened == 1 and ch.epoch == 1


async def test_simulator_failure_text(sock_dir: Path) -> None:
    path = str(sock_dir / "s")
    async with Simulator(path, "2.1.0"), SozuChannel(path, version=V2) as ch:
        with pytest.raises(SozuRequestError) as err:
            await ch.request(pb.Request(remove_cluster="nosuchcluster"))
        assert err.value.sozu_message == (
            "could not dispatch request on the main process state: "
            "Did not find Cluster with address or id 'nosuchcluster'"
        )


async def test_simulator_dropped_answer_times_out_then_recovers(sock_dir: Path) -> None:
    path = str(sock_dir / "s")
    async with Simulator(path, "2.1.0") as sim, SozuChannel(path, version=V2) as ch:
        sim.drop_answers("add_cluster", 1)
        with pytest.raises(SozuTimeoutError):
            await ch.request(add_cluster("lost"), timeout_s=0.05)
        reply = await ch.request(add_cluster("next"))
        assert reply.response.message == "Successfully applied request to all workers"
        assert ch.epoch == 2


async def test_simulator_restart_bumps_epoch(sock_dir: Path) -> None:
    path = str(sock_dir / "s")
    seen: list[int] = []
    async with Simulator(path, "1.1.1") as sim, SozuChannel(path, version=V1, backoff=fast_backoff()) as ch:
        ch.add_reconnect_listener(seen.append)
        await ch.request(add_cluster("a"))
        await sim.restart()
        for _ in range(2):
            try:
                await ch.request(STATUS)
                break
            except SozuConnectionError:
                continue
        assert (ch.epoch, seen) == (2, [2])


async def test_simulator_events_2x_duplicates(sock_dir: Path) -> None:
    path = str(sock_dir / "s")
    async with Simulator(path, "2.1.0"), SozuChannel(path, version=V2) as ch:
        sub = ch.subscribe_events()
        got: list[pb.Event] = []

        async def collect() -> None:
            async for ev in sub:
                got.append(ev)

        collector = asyncio.create_task(collect())
        list_frontends = pb.Request(list_frontends=pb.FrontendFilters(http=False, https=False, tcp=False))
        # the subscription is set up concurrently: add clusters until one was seen twice (2.1.0 sends the
        # second copy when the main process handles the next request, here list_frontends)
        complete: list[str] = []
        for i in range(1000):
            await ch.request(add_cluster(f"ev{i}"))
            await ch.request(list_frontends)
            await ch.request(STATUS)
            complete = [c for c in {e.cluster_id for e in got} if [e.cluster_id for e in got].count(c) == 2]
            if complete or collector.done():
                break
        assert complete, "no complete pair of events"
        first = complete[0]
        assert [e.kind for e in got if e.cluster_id == first] == [pb.CLUSTER_ADDED, pb.CLUSTER_ADDED]
        await sub.aclose()
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)


def test_a_json_frame_nested_too_deeply_is_a_protocol_error() -> None:
    framing = JsonFraming(socket_path="/run/t.sock", max_frame_bytes=100_000)
    with pytest.raises(SozuProtocolError, match=r"t\.sock"):
        framing.decode_chunk(b'{"id":"x","status":"OK","content":' + b"[" * 1000 + b"]" * 1000 + b"}")


async def test_an_endless_stream_of_processing_frames_is_bounded(sock_dir: Path) -> None:
    """issue 12: a peer that sends PROCESSING frames forever made the client hold every one (GBs)."""
    from sozud.socket_proto import MAX_PROCESSING_FRAMES, MAX_PROCESSING_KEPT

    sent = 0

    async def flood(req: pb.Request, conn: Conn) -> None:
        nonlocal sent
        frame = processing("Querying cluster..." + "x" * 200)
        while sent < 3 * MAX_PROCESSING_FRAMES:  # then silence: a client without a bound times out instead
            conn.send(frame)
            sent += 1
            if sent % 100 == 0:
                await conn.writer.drain()
        await asyncio.Event().wait()

    async with running(sock_dir / "s", V2) as fake, SozuChannel(str(sock_dir / "s"), version=V2) as ch:
        fake.script.append(flood)
        with pytest.raises(SozuProtocolError, match="PROCESSING frames") as info:
            await ch.request(pb.Request(query_clusters_hashes=pb.QueryClustersHashes()), timeout_s=60)
        assert str(sock_dir / "s") in str(info.value)
        # and the connection is usable again afterwards (a new one)
        reply = await ch.request(add_cluster("after"))
        assert reply.response.status == pb.OK
    assert sent > MAX_PROCESSING_FRAMES > MAX_PROCESSING_KEPT
