"""A SIMULATOR of sozu's main process command socket, for tests and demos (never a real proxy).

``FakeSozu`` serves a unix socket the way sozu's main process does for a configuration-sync client,
for the three protocol families (docs/sozu-command-protocol.md §2, §3, §11 and §12; checked against
the captures in shared/fixtures by tests/test_fixture_replay.py):

- framing: 1.x/2.x u64-LE length (prefix included) + protobuf; 0.15 JSON + NUL;
- response sequences and messages per version (PROCESSING then OK/FAILURE; refusals by the main state
  are one FAILURE; queries answered with one ``worker_responses`` entry per worker plus ``"main"``);
- the main state (``SozuMainState``), ``save_state`` / ``load_state`` files, 0.15 automatic save;
- the odd parts: 1.x/2.x answer only the last complete frame of one read; requests in flight together
  interleave; oversize (2.x) or undecodable frames wedge the connection; a length below 8 drops 8 bytes
  (2.x) or crashes the whole 1.x main process; empty/unknown requests, ``launch_worker`` and
  ``return_listen_sockets`` get no answer; 0.15 closes the connection on malformed input and answers
  every pipelined frame; a request that starts while another connection has one in progress stalls for
  ``worker_timeout_s``;
- events (``subscribe_events``) with 2.1.0's duplicated audit events, and the workers'
  ``REMOVED_BACKEND_HAS_NO_CONNECTIONS``;
- fault injection: ``refuse_next`` (workers fail a request that the main state keeps), ``drop_answers``,
  missing-listener failures in workers, ``pause_workers`` / ``resume_workers``.

Not simulated: metrics, hot upgrades, configuration reload, TLS/traffic, the real cluster hashes (a
deterministic u64 per cluster content stands in), per-worker divergence other than the failures above.

Run ``python -m sozud.testing.fake_sozu --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import struct
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from sozud.errors import StateParseError
from sozud.log import get_logger
from sozud.proto import command_pb2 as pb
from sozud.serde import from_json, to_json
from sozud.testing._sozu_state import (
    PASS_THROUGH_REQUESTS,
    CertificateProblem,
    DispatchResult,
    SozuMainState,
    certificate_names,
    certificate_not_after,
    iter_state_records,
    parse_x509,
)
from sozud.versions import STORED_REQUESTS, Family, SozuVersion

__all__ = ["FakeSozu", "SozuMainState"]

_log = get_logger(component="fake_sozu")
_PREFIX = struct.Struct("<Q")
_READ_SIZE = 65536

# Main events (2.x) emitted for accepted (twice) or refused (once) state requests.
_EVENT_OF: dict[str, int] = {
    "add_cluster": pb.CLUSTER_ADDED,
    "remove_cluster": pb.CLUSTER_REMOVED,
    "add_http_frontend": pb.FRONTEND_ADDED,
    "add_https_frontend": pb.FRONTEND_ADDED,
    "add_tcp_frontend": pb.FRONTEND_ADDED,
    "add_udp_frontend": pb.FRONTEND_ADDED,
    "remove_http_frontend": pb.FRONTEND_REMOVED,
    "remove_https_frontend": pb.FRONTEND_REMOVED,
    "remove_tcp_frontend": pb.FRONTEND_REMOVED,
    "remove_udp_frontend": pb.FRONTEND_REMOVED,
    "add_certificate": pb.CERTIFICATE_ADDED,
    "replace_certificate": pb.CERTIFICATE_REPLACED,
    "remove_certificate": pb.CERTIFICATE_REMOVED,
    "add_http_listener": pb.LISTENER_ADDED,
    "add_https_listener": pb.LISTENER_ADDED,
    "add_tcp_listener": pb.LISTENER_ADDED,
    "add_udp_listener": pb.LISTENER_ADDED,
    "update_http_listener": pb.LISTENER_UPDATED,
    "update_https_listener": pb.LISTENER_UPDATED,
    "update_tcp_listener": pb.LISTENER_UPDATED,
    "update_udp_listener": pb.LISTENER_UPDATED,
    "activate_listener": pb.LISTENER_ACTIVATED,
    "deactivate_listener": pb.LISTENER_DEACTIVATED,
    "remove_listener": pb.LISTENER_REMOVED,
}
_SINGLE_EVENT_OF: dict[str, int] = {"Logging": pb.LOGGING_LEVEL_CHANGED, "configure_metrics": pb.METRICS_CONFIGURED}
_WORKER_QUERIES = frozenset(
    {"query_clusters_hashes", "query_cluster_by_id", "query_clusters_by_domain", "query_certificates_from_workers"}
)
_NO_ANSWER = frozenset({"launch_worker", "return_listen_sockets"})


def _has_invalid_utf8(msg: Message) -> bool:
    """Python's proto2 runtime hands invalid UTF-8 in a ``string`` field back as bytes; prost refuses it."""
    for fd, value in msg.ListFields():
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            values: list[object] = [x for pair in value.items() for x in pair]
        elif fd.is_repeated:
            values = list(value)
        else:
            values = [value]
        for v in values:
            if isinstance(v, bytes) and fd.type != FieldDescriptor.TYPE_BYTES:
                return True
            if isinstance(v, Message) and _has_invalid_utf8(v):
                return True
    return False


@dataclass(frozen=True)
class _Messages:
    """The human texts of one protocol family."""

    worker_processing: tuple[str, ...]
    worker_ok: str
    refused_prefix: str
    status_processing: str
    status_ok: str
    list_workers: str
    list_listeners: str
    list_frontends: str
    certificates: str
    count_requests: str
    query_processing: str
    query_ok: str
    saved: str


_V1_MESSAGES = _Messages(
    worker_processing=("Processing worker request...",),
    worker_ok="Successfully applied request to all workers",
    refused_prefix="could not dispatch request on the main process state: ",
    status_processing="Querying status of workers...",
    status_ok="Successfully collected the status of workers",
    list_workers="Successfully listed workers",
    list_listeners="Successfully listed listeners",
    list_frontends="Successfully listed frontends",
    certificates="Successfully queried certificates from the state of main process",
    count_requests="Successfully counted requests received by the state",
    query_processing="Querying cluster...",
    query_ok="Successfully queried clusters",
    saved="Saved",
)
_V015_MESSAGES = _Messages(
    worker_processing=("Sending the request to all workers",),
    worker_ok="Successfully executed the request on all workers",
    refused_prefix="Could not execute request on the state: ",
    status_processing="Sending status requests to workers...",
    status_ok="Sent a status response to client",
    list_workers="Successfully listed all workers",
    list_listeners="Successfully listed all listeners",
    list_frontends="Successfully gathered the list of frontends",
    certificates="Successfully queried certificates from the state",
    count_requests="count requests",
    query_processing="Query was sent to the workers...",
    query_ok="Ran the query successfully",
    saved="saved",
)


@dataclass(eq=False)
class _Conn:
    number: int  # 1-based ordinal of the connection (0.15 names subscribers CL-<number>)
    writer: asyncio.StreamWriter
    subscribed: bool = False
    wedged: bool = False
    closed: bool = False
    in_progress: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class FakeSozu:
    """A SIMULATOR of sozu's main process on a unix socket (see the module docstring).

    ``version``: ``"2.1.0"``, ``"1.1.1"``, ``"0.15"``, ... ``workers``: simulated worker count.
    ``worker_timeout_s``: the stall of a request that starts while another connection has one in
    progress. ``max_command_buffer_size``: 2.x frame cap (larger declared lengths wedge the
    connection, larger answers close it); 1.x/2.x: a ``load_state`` queuing more than that to each worker
    is never answered (its records stay in the main state, §11.10). ``config_state``: state-file bytes
    standing for the TOML configuration, applied at every (re)start. ``saved_state``: a state file loaded
    after it at every (re)start when it exists. ``automatic_state_save`` (0.15 only): path rewritten in
    place after every mutation the main state accepts. ``cwd``: where relative save/load paths resolve.
    """

    def __init__(
        self,
        socket_path: str,
        version: SozuVersion | str,
        *,
        workers: int = 2,
        worker_timeout_s: float = 10.0,
        max_command_buffer_size: int = 2_000_000,
        config_state: bytes | None = None,
        saved_state: str | None = None,
        automatic_state_save: str | None = None,
        cwd: str | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.version = version if isinstance(version, SozuVersion) else SozuVersion.parse(version)
        self.workers = workers
        self.worker_timeout_s = worker_timeout_s
        self.max_command_buffer_size = max_command_buffer_size
        self.load_state_overflows = 0  # load_state requests left unanswered (worker channels overflowed)
        self.config_state = config_state
        self.saved_state = saved_state
        self.automatic_state_save = automatic_state_save
        self.cwd = cwd or os.getcwd()
        self.worker_fail_for_missing_listener = True
        self.state = SozuMainState(self.version)
        self.requests: list[pb.Request] = []
        self.busy_s = 0.0  # time spent handling requests (benchmarks subtract the simulator's share)
        self.connections_opened = 0
        self.stalls = 0  # requests that waited worker_timeout_s because another connection was busy
        self.crashed = False
        self.stopped = False
        self._msgs = _V015_MESSAGES if self._is_015 else _V1_MESSAGES
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._refuse: dict[str, list[str]] = {}
        self._drop: dict[str, int | None] = {}
        self._pending_events: list[pb.Event] = []
        self._workers_running = asyncio.Event()
        self._workers_running.set()
        self._ended = asyncio.Event()
        self._reset_state()

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def _is_015(self) -> bool:
        return self.version.family is Family.V0_15

    def _reset_state(self) -> None:
        self.state = SozuMainState(self.version)
        if self.config_state is not None:
            self.state.load_state_file(self.config_state, source="config")
        if self.saved_state is not None and os.path.exists(self._path(self.saved_state)):
            with open(self._path(self.saved_state), "rb") as f:
                data = f.read()
            with contextlib.suppress(StateParseError):
                self.state.load_state_file(data, source=self.saved_state)
        self._pending_events.clear()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self.crashed = False
        self.stopped = False
        self._ended.clear()
        self._server = await asyncio.start_unix_server(self._on_client, path=self.socket_path)
        os.chmod(self.socket_path, 0o600)
        _log.info("fake_sozu.started", socket=self.socket_path, version=str(self.version), simulator=True)

    async def wait_closed(self) -> None:
        """Wait until the simulated sozu crashed or was stopped by a soft/hard stop request."""
        await self._ended.wait()

    async def stop(self) -> None:
        await self._shutdown()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def restart(self, empty: bool = True) -> None:
        """sozu restarted: connections dropped; with ``empty`` the state restarts from the config
        (and ``saved_state``), else it is kept."""
        await self._shutdown()
        if empty:
            self._reset_state()
        await self.start()

    async def __aenter__(self) -> FakeSozu:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            self._close(conn)
            for task in list(conn.tasks):
                task.cancel()
        self._conns.clear()
        # Connection handlers end on the EOF of their closed transport; waiting for them here keeps
        # them from being cancelled later by the event loop's shutdown (noise, and a lost final frame).
        handlers = [t for t in self._handlers if t is not asyncio.current_task()]
        if handlers:
            _done, pending = await asyncio.wait(handlers, timeout=2.0)
            for task in pending:
                task.cancel()

    def _close(self, conn: _Conn) -> None:
        if not conn.closed:
            conn.closed = True
            conn.writer.close()
        self._conns.discard(conn)

    def _crash(self) -> None:
        """The 1.x main process panics: every connection sees EOF, nothing is served any more."""
        _log.warning("fake_sozu.crashed", socket=self.socket_path)
        self.crashed = True
        self._ended.set()
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            self._close(conn)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    # -- fault injection -------------------------------------------------------------------------

    def refuse_next(self, kind: str, worker_error: str) -> None:
        """The next ``kind`` request passes the main state (and stays there) but every worker fails it."""
        self._refuse.setdefault(kind, []).append(worker_error)

    def drop_answers(self, kind: str, count: int | None = None) -> None:
        """Requests of ``kind`` are applied but get no answer at all (``count`` times, or until
        ``stop_dropping``)."""
        self._drop[kind] = count

    def stop_dropping(self, kind: str | None = None) -> None:
        if kind is None:
            self._drop.clear()
        else:
            self._drop.pop(kind, None)

    def pause_workers(self) -> None:
        """Worker-bound requests stay in progress (after their PROCESSING frame) until ``resume_workers``."""
        self._workers_running.clear()

    def resume_workers(self) -> None:
        self._workers_running.set()

    # -- connections -----------------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        if self.crashed or self.stopped:
            writer.close()
            return
        self.connections_opened += 1
        conn = _Conn(self.connections_opened, writer)
        self._conns.add(conn)
        try:
            if self._is_015:
                await self._serve_json(conn, reader)
            else:
                await self._serve_binary(conn, reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if conn.subscribed or not conn.tasks:
                self._close(conn)
            else:
                # the client half-closed: let in-flight answers go out, then close
                for task in list(conn.tasks):
                    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                        await task
                self._close(conn)

    async def _serve_binary(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        buf = bytearray()
        while not conn.closed:
            data = await reader.read(_READ_SIZE)
            if not data:
                return
            if conn.wedged:
                continue  # sozu keeps the bytes but never parses this connection again
            buf += data
            frames: list[pb.Request] = []
            while len(buf) >= 8:
                (length,) = _PREFIX.unpack_from(buf)
                if length < 8:
                    if self.version.family is Family.V1:
                        self._crash()
                        return
                    del buf[:8]
                    continue
                if self.version.family is Family.V2 and length > self.max_command_buffer_size:
                    conn.wedged = True
                    break
                if len(buf) < length:
                    break
                payload = bytes(buf[8:length])
                req = pb.Request()
                try:
                    req.ParseFromString(payload)
                except DecodeError:
                    conn.wedged = True
                    break
                if _has_invalid_utf8(req):  # prost refuses it: the frame is never consumed
                    conn.wedged = True
                    break
                del buf[:length]
                frames.append(req)
            if frames:
                # sozu keeps only the last complete frame of one read ("more than one request at a time")
                self._spawn(conn, frames[-1])

    async def _serve_json(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        buf = bytearray()
        while not conn.closed:
            data = await reader.read(_READ_SIZE)
            if not data:
                return
            buf += data
            while True:
                end = buf.find(b"\x00")
                if end < 0:
                    break
                chunk = bytes(buf[:end])
                del buf[: end + 1]
                req = self._decode_json(chunk)
                if req is None:
                    _log.info("fake_sozu.undecodable_client_message", socket=self.socket_path)
                    self._close(conn)
                    return
                self._spawn(conn, req)

    def _decode_json(self, chunk: bytes) -> pb.Request | None:
        try:
            value = json.loads(chunk)
            req = from_json(pb.Request, value, self.version, source="client message")
        except (ValueError, TypeError, KeyError, StateParseError):
            return None  # sozu: "could not decode client message", connection closed
        kind = req.WhichOneof("request_type")
        if kind is not None and not self.version.knows_request(kind):
            return None
        return req

    def _spawn(self, conn: _Conn, req: pb.Request) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(conn, req))
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

    # -- frames out ------------------------------------------------------------------------------

    def _send(self, conn: _Conn, resp: pb.Response) -> None:
        if conn.closed:
            return
        if self._is_015:
            data = json.dumps(to_json(resp, self.version), separators=(",", ":"), ensure_ascii=False)
            conn.writer.write(data.encode() + b"\x00")
            return
        body = resp.SerializeToString(deterministic=True)
        frame = _PREFIX.pack(len(body) + 8) + body
        if self.version.family is Family.V2 and len(frame) > self.max_command_buffer_size:
            self._close(conn)  # the write fails in sozu and the session is closed
            return
        conn.writer.write(frame)

    def _answer(self, conn: _Conn, status: int, message: str, content: pb.ResponseContent | None = None) -> None:
        resp = pb.Response(status=status, message=message)  # type: ignore[arg-type]
        if content is not None:
            resp.content.CopyFrom(content)
        self._send(conn, resp)

    # -- events ------------------------------------------------------------------------------------

    def _broadcast(self, message: str, event: pb.Event) -> None:
        for conn in list(self._conns):
            if conn.subscribed:
                self._answer(conn, pb.PROCESSING, message, pb.ResponseContent(event=event))

    def _main_event(self, kind: str, req: pb.Request, accepted: bool) -> None:
        if self.version.family is not Family.V2:
            return
        event_kind = _EVENT_OF.get(kind)
        if event_kind is None:
            single = _SINGLE_EVENT_OF.get(kind)
            if single is not None and accepted:
                self._broadcast("main", pb.Event(kind=single))  # type: ignore[arg-type]
            return
        event = pb.Event(kind=event_kind)  # type: ignore[arg-type]
        body = getattr(req, kind)
        if kind == "remove_cluster":
            event.cluster_id = body
        elif kind == "add_cluster":
            event.cluster_id = body.cluster_id
        else:
            if hasattr(body, "cluster_id") and body.HasField("cluster_id"):
                event.cluster_id = body.cluster_id
            event.address.CopyFrom(body.address)
        self._broadcast("main", event)
        if accepted:
            self._pending_events.append(event)

    def _flush_pending_events(self) -> None:
        pending, self._pending_events = self._pending_events, []
        for event in pending:
            self._broadcast("main", event)

    def _backend_events(self, removed: Iterable[tuple[str, pb.SocketAddress]]) -> None:
        removed = list(removed)
        for worker in range(self.workers):
            for backend_id, address in removed:
                event = pb.Event(kind=pb.REMOVED_BACKEND_HAS_NO_CONNECTIONS, backend_id=backend_id)
                event.address.CopyFrom(address)
                self._broadcast(str(worker), event)

    # -- request handling ------------------------------------------------------------------------

    async def _handle(self, conn: _Conn, req: pb.Request) -> None:
        started = time.perf_counter()
        try:
            await self._handle_request(conn, req)
        finally:
            self.busy_s += time.perf_counter() - started

    async def _handle_request(self, conn: _Conn, req: pb.Request) -> None:
        kind = req.WhichOneof("request_type")
        if kind is not None and not self.version.knows_request(kind):
            kind = None  # decodes as an empty request in this version
        if kind is None and not self._is_015:
            return  # "empty request sent by client": no answer at all
        self._flush_pending_events()
        self.requests.append(req)
        if kind is None:
            self._answer(conn, pb.FAILURE, "Empty request")
            return
        if kind in _NO_ANSWER:
            return
        drop = kind in self._drop
        if drop:
            left = self._drop[kind]
            if left is not None:
                if left <= 1:
                    del self._drop[kind]
                else:
                    self._drop[kind] = left - 1
        # a dropped answer goes to a stand-in connection that is already "closed": nothing is written,
        # and it takes no part in the stall rule (it is not one of the server's connections)
        target = _Conn(conn.number, conn.writer, closed=True) if drop else conn
        await self._dispatch(target, kind, req)

    async def _dispatch(self, conn: _Conn, kind: str, req: pb.Request) -> None:
        m = self._msgs
        if kind in STORED_REQUESTS or kind in PASS_THROUGH_REQUESTS:
            await self._worker_request(conn, kind, req)
        elif kind == "status":
            await self._with_workers(conn, (m.status_processing,), m.status_ok, self._workers_content())
        elif kind == "list_workers":
            self._answer(conn, pb.OK, m.list_workers, self._workers_content())
        elif kind == "list_listeners":
            self._answer(conn, pb.OK, m.list_listeners, self._listeners_content())
        elif kind == "list_frontends":
            self._answer(conn, pb.OK, m.list_frontends, self._frontends_content(req.list_frontends))
        elif kind == "query_certificates_from_the_state":
            self._answer(conn, pb.OK, m.certificates, self._certificates_content(req.query_certificates_from_the_state))
        elif kind == "count_requests":
            content = pb.ResponseContent(request_counts=pb.RequestCounts(map=self.state.request_counts))
            self._answer(conn, pb.OK, m.count_requests, content)
        elif kind == "query_health_checks":
            self._answer(
                conn, pb.OK, "Successfully queried health checks", self._health_checks(req.query_health_checks)
            )
        elif kind in _WORKER_QUERIES:
            await self._with_workers(conn, (m.query_processing,), m.query_ok, self._query_content(kind, req))
        elif kind == "save_state":
            self._save_state(conn, req.save_state)
        elif kind == "load_state":
            await self._load_state(conn, req.load_state)
        elif kind == "subscribe_events":
            self._subscribe(conn)
        elif kind in ("soft_stop", "hard_stop"):
            await self._stop_request(conn, kind)
        else:
            self._answer(conn, pb.FAILURE, f"{kind} is not simulated by FakeSozu")

    async def _with_workers(
        self,
        conn: _Conn,
        processing: Iterable[str],
        final_ok: str,
        content: pb.ResponseContent | None,
        *,
        failure: str | None = None,
    ) -> None:
        """PROCESSING frame(s), the workers' round trip (stall, pause), then the final frame."""
        stalled = not self._is_015 and any(c.in_progress for c in self._conns if c is not conn)
        conn.in_progress += 1
        try:
            for text in processing:
                self._answer(conn, pb.PROCESSING, text)
            await self._workers_running.wait()
            if stalled:
                self.stalls += 1
                await asyncio.sleep(self.worker_timeout_s)  # the observed worker_timeout stall
            if failure is not None:
                self._answer(conn, pb.FAILURE, failure)
            else:
                self._answer(conn, pb.OK, final_ok, content)
        finally:
            conn.in_progress -= 1

    async def _worker_request(self, conn: _Conn, kind: str, req: pb.Request) -> None:
        m = self._msgs
        result: DispatchResult = self.state.apply(req)
        self._main_event(kind, req, result.error is None)
        if result.error is not None:
            self._answer(conn, pb.FAILURE, m.refused_prefix + result.error)
            return
        processing = list(m.worker_processing)
        if self._is_015 and self.automatic_state_save is not None:
            self._answer(conn, pb.PROCESSING, "Saving state to file")
            try:
                self._write_state(self.automatic_state_save)
            except OSError as e:
                self._answer(conn, pb.FAILURE, f"could not save state to {self.automatic_state_save}: {e.strerror}")
                return
        errors = self._worker_errors(kind, result)
        self._backend_events(result.removed_backends)
        failure: str | None = None
        if errors:
            failure = ", ".join(f"{w}: {errors.get(w) or 'OK'}" for w in range(self.workers))
        await self._with_workers(conn, processing, m.worker_ok, None, failure=failure)

    def _worker_errors(self, kind: str, result: DispatchResult) -> dict[int, str]:
        queued = self._refuse.get(kind)
        if queued:
            error = queued.pop(0)
            if not queued:
                del self._refuse[kind]
            return {w: error for w in range(self.workers)}
        return self._worker_errors_for_record(result)

    # -- contents ------------------------------------------------------------------------------

    def _workers_content(self) -> pb.ResponseContent:
        infos = [pb.WorkerInfo(id=i, pid=40000 + i, run_state=pb.RUNNING) for i in range(self.workers)]
        return pb.ResponseContent(workers=pb.WorkerInfos(vec=infos))

    def _listeners_content(self) -> pb.ResponseContent:
        out = pb.ListenersList()
        for ltype, name in (
            (pb.HTTP, "http_listeners"),
            (pb.HTTPS, "https_listeners"),
            (pb.TCP, "tcp_listeners"),
            (pb.UDP, "udp_listeners"),
        ):
            if ltype == pb.UDP and not self.version.knows_field("ListenersList", "udp_listeners"):
                continue
            target = getattr(out, name)
            for text, config in self.state.listeners[ltype].items():
                target[text].CopyFrom(config)
        return pb.ResponseContent(listeners_list=out)

    def _frontends_content(self, filters: pb.FrontendFilters) -> pb.ResponseContent:
        every = not (filters.http or filters.https or filters.tcp)
        domain = filters.domain if filters.HasField("domain") else None
        out = pb.ListedFrontends()
        for kind, front in self.state.all_frontends():
            if not every and not getattr(filters, kind, False):
                continue
            if kind in ("http", "https"):
                assert isinstance(front, pb.RequestHttpFrontend)
                if domain is not None and domain not in front.hostname:
                    continue
                (out.http_frontends if kind == "http" else out.https_frontends).append(front)
            elif domain is None:
                if kind == "tcp":
                    assert isinstance(front, pb.RequestTcpFrontend)
                    out.tcp_frontends.append(front)
                elif self.version.knows_field("ListedFrontends", "udp_frontends"):
                    assert isinstance(front, pb.RequestUdpFrontend)
                    out.udp_frontends.append(front)
        return pb.ResponseContent(frontend_list=out)

    def _names_for_query(self, cert: pb.CertificateAndKey) -> list[str] | None:
        """Names as a query reports them (0.15 derives them and skips certificates it cannot parse)."""
        if cert.names:
            return list(cert.names)
        try:
            return certificate_names(cert.certificate)
        except CertificateProblem:
            return None if self._is_015 else []

    def _certificates_content(self, filters: pb.QueryCertificatesFilters) -> pb.ResponseContent:
        out = pb.CertificatesWithFingerprints()
        for _addr, fingerprint, cert in self.state.certificate_entries():
            names = self._names_for_query(cert)
            if names is None:
                continue
            if filters.HasField("domain"):
                if filters.domain not in names:
                    continue
            elif filters.HasField("fingerprint") and filters.fingerprint != fingerprint:
                continue
            entry = out.certs[fingerprint]
            entry.CopyFrom(cert)
            if self._is_015:
                del entry.names[:]
                entry.names.extend(names)
        return pb.ResponseContent(certificates_with_fingerprints=out)

    def _worker_certificates(self, filters: pb.QueryCertificatesFilters) -> pb.ResponseContent:
        """What each worker's resolver holds: per HTTPS listener, the certificate each name resolves to."""
        out = pb.ListOfCertificatesByAddress()
        for text, listener in self.state.listeners[pb.HTTPS].items():
            chosen: dict[str, tuple[float, int, str]] = {}
            for seq, (fingerprint, cert) in enumerate(self.state.certificates.get(text, {}).items()):
                try:
                    parse_x509(cert.certificate)
                except CertificateProblem:
                    continue
                names = list(cert.names) or certificate_names(cert.certificate)
                rank = (certificate_not_after(cert.certificate), -seq if self._is_015 else seq)
                for name in names:
                    if name not in chosen or rank > chosen[name][:2]:
                        chosen[name] = (rank[0], rank[1], fingerprint)
            by_address = out.certificates.add()
            by_address.address.CopyFrom(listener.address)
            for name, (_, _, fingerprint) in chosen.items():
                if filters.HasField("domain") and filters.domain != name:
                    continue
                if filters.HasField("fingerprint") and filters.fingerprint != fingerprint:
                    continue
                by_address.certificate_summaries.add(domain=name, fingerprint=fingerprint)
        return pb.ResponseContent(certificates_by_address=out)

    def _query_content(self, kind: str, req: pb.Request) -> pb.ResponseContent:
        if kind == "query_certificates_from_workers":
            per_worker = self._worker_certificates(req.query_certificates_from_workers)
            main = None
        elif kind == "query_clusters_hashes":
            hashes = pb.ClusterHashes()
            for cluster_id, value in self.state.cluster_hashes().items():
                hashes.map[cluster_id] = value
            main = per_worker = pb.ResponseContent(cluster_hashes=hashes)
        else:
            if kind == "query_cluster_by_id":
                ids = [req.query_cluster_by_id]
            else:
                q = req.query_clusters_by_domain
                ids = self.state.clusters_for_domain(q.hostname, q.path if q.HasField("path") else None)
            infos = pb.ClusterInformations()
            for cluster_id in ids:
                info = self.state.cluster_information(cluster_id)
                if info is not None:
                    infos.vec.append(info)
            main = per_worker = pb.ResponseContent(clusters=infos)
        responses = pb.WorkerResponses()
        for w in range(self.workers):
            responses.map[str(w)].CopyFrom(per_worker)
        if main is not None:
            responses.map["main"].CopyFrom(main)
        return pb.ResponseContent(worker_responses=responses)

    def _health_checks(self, q: pb.QueryHealthChecks) -> pb.ResponseContent:
        out = pb.HealthChecksList()
        for cluster_id, cluster in self.state.clusters.items():
            if q.HasField("cluster_id") and q.cluster_id != cluster_id:
                continue
            if cluster.HasField("health_check"):
                out.map[cluster_id].CopyFrom(cluster.health_check)
        return pb.ResponseContent(health_checks_list=out)

    # -- state files ---------------------------------------------------------------------------

    def _path(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.cwd, path)

    def _write_state(self, path: str) -> int:
        """Truncate in place and write record by record (sozu's writer: no temporary file)."""
        data = self.state.generate_state_file()
        with open(self._path(path), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return data.count(b"\n\x00")

    def _read_file(self, path: str) -> bytes:
        with open(self._path(path), "rb") as f:
            return f.read()

    def _save_state(self, conn: _Conn, path: str) -> None:
        try:
            count = self._write_state(path)
        except OSError as e:
            self._answer(conn, pb.FAILURE, f"could not save state to file {path}: {e.strerror}")
            return
        self._answer(conn, pb.OK, f"{self._msgs.saved} {count} config messages to {path}")
        if self.version.family is Family.V2:
            self._broadcast("main", pb.Event(kind=pb.STATE_SAVED))

    async def _load_state(self, conn: _Conn, path: str) -> None:
        try:
            data = self._read_file(path)
        except OSError:
            if not self._is_015:  # 0.15 never answers a missing file
                self._answer(conn, pb.FAILURE, f"Cannot find file at path {path}")
            return
        if not self._is_015:
            self._answer(conn, pb.PROCESSING, f"Parsing state file from {path}...")
            self._answer(conn, pb.PROCESSING, "Applying state file...")
        ok = errors = queued = 0
        broken = False
        removed: list[tuple[str, pb.SocketAddress]] = []
        records = iter(iter_state_records(data, self.version, source=path))
        while True:
            try:
                req = next(records)
            except StopIteration:
                break
            except StateParseError:
                broken = True
                break
            kind = req.WhichOneof("request_type")
            if kind is None or not self.version.knows_request(kind):
                broken = True
                break
            result = self.state.apply(req)
            if result.error is not None:
                continue  # refused by the main state: skipped, not counted
            queued += self._queued_bytes(req)
            worker_errors = self._worker_errors_for_record(result)
            errors += len(worker_errors)
            ok += self.workers - len(worker_errors)
            removed.extend(result.removed_backends)
        if not self._is_015 and queued > self.max_command_buffer_size:
            # §11.10: the main→worker channels overflow; sozu keeps the main state, relaunches its workers
            # (which start from it) and never answers the request.
            self.load_state_overflows += 1
            return
        if self.version.family is Family.V2:
            self._pending_events.append(pb.Event(kind=pb.STATE_LOADED))
        self._backend_events(removed)  # each worker reports its whole batch in turn
        conn.in_progress += 1
        try:
            await self._workers_running.wait()
        finally:
            conn.in_progress -= 1
        if broken:
            text = "error consuming load state message" if self._is_015 else "Error consuming load state message"
            self._answer(conn, pb.FAILURE, text)
        elif self._is_015:
            if errors:
                self._answer(conn, pb.FAILURE, f"Loading state failed, ok: {ok}, error: {errors}, path: {path}")
            else:
                self._answer(conn, pb.OK, f"Successfully loaded state from path {path}, {ok} ok messages, 0 errors")
        elif errors:
            self._answer(conn, pb.FAILURE, f"loading state: {ok} ok messages, {errors} errors")
        else:
            self._answer(conn, pb.OK, f"Successfully loaded state from path {path}, {ok} ok messages, 0 errors")

    @staticmethod
    def _queued_bytes(req: pb.Request) -> int:
        """What one applied record queues to each worker (1.x/2.x: a length-prefixed WorkerRequest)."""
        return len(pb.WorkerRequest(id="LOAD-0000", content=req).SerializeToString()) + 8

    def _worker_errors_for_record(self, result: DispatchResult) -> dict[int, str]:
        error = result.worker_error
        if error is None or (error.startswith("found no listener") and not self.worker_fail_for_missing_listener):
            return {}
        return {w: error for w in range(self.workers)}

    def _subscribe(self, conn: _Conn) -> None:
        conn.subscribed = True
        if self.version.family is Family.V2:
            self._answer(conn, pb.PROCESSING, "main", pb.ResponseContent(event=pb.Event(kind=pb.EVENTS_SUBSCRIBED)))
        elif self._is_015:
            self._answer(conn, pb.OK, f"Successfully Added CL-{conn.number} to subscribers")

    async def _stop_request(self, conn: _Conn, kind: str) -> None:
        n = self.workers
        if kind == "soft_stop":
            self._answer(conn, pb.PROCESSING, "Performing soft stop...")
            for w in range(n):
                self._answer(conn, pb.PROCESSING, f"Worker {w} is processing SoftStop-{w}-x-0. ")
        else:
            self._answer(conn, pb.PROCESSING, "Performing hard stop...")
        self._answer(conn, pb.OK, f"Successfully closed {n} workers, 0 errors, stopping the main process...")
        self.stopped = True
        self._ended.set()
        if self._server is not None:
            self._server.close()
            self._server = None
        for c in list(self._conns):
            with contextlib.suppress(Exception):
                await c.writer.drain()
            self._close(c)


# --- command line ------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sozud.testing.fake_sozu",
        description=(
            "SIMULATOR of a sozu main process command socket, for tests and demos. It is NOT sozu and "
            "proxies no traffic: it answers the command protocol of the given sozu version."
        ),
    )
    parser.add_argument("--socket", required=True, help="unix socket path to serve")
    parser.add_argument(
        "--version", default="2.1.0", help="sozu version to simulate (2.1.0, 1.1.1, 0.15; default 2.1.0)"
    )
    parser.add_argument("--saved-state", default=None, help="state file loaded at start-up (sozu's saved_state)")
    parser.add_argument("--workers", type=int, default=2, help="simulated worker count (default 2)")
    parser.add_argument(
        "--worker-timeout-s", type=float, default=10.0, help="stall of concurrent requests (default 10)"
    )
    parser.add_argument("--automatic-state-save", default=None, help="0.15 only: file rewritten after each mutation")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    fake = FakeSozu(
        args.socket,
        args.version,
        workers=args.workers,
        worker_timeout_s=args.worker_timeout_s,
        saved_state=args.saved_state,
        automatic_state_save=args.automatic_state_save,
    )
    await fake.start()
    print(
        f"fake_sozu: SIMULATOR of sozu {fake.version} (for tests and demos, not a real sozu) "
        f"listening on {args.socket}",
        flush=True,
    )
    try:
        await fake.wait_closed()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
