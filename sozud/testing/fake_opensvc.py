"""SIMULATED OpenSVC agents (v2.1 and om3 key APIs) for sozud's tests and a local demo.

THIS IS NOT OPENSVC. It reproduces, over real sockets, what ``docs/opensvc-api.md`` documents about
the agent's config-map key API, odd parts included, so that sozud's client can be tested against it.
Several ``FakeAgent`` of one ``FakeOpenSVCCluster`` share one store and form a cluster in one process.

Simulated (doc section in brackets):

- v2 raw unix socket ``lsnr.sock`` [1, 1.2]: one JSON request + NUL, one reply + NUL, then the
  connection is closed; actions ``key`` (GET/POST/DELETE), ``object_keys``, ``whoami``, ``events``
  (NUL-separated events on the same connection), legacy ``set_key``/``get_key`` only without
  ``method`` (with a method: 501 ``handler POST set_key is not supported``), missing action →
  ``{"error": "action not specified", "status": 1}``, ``node`` option relays (``{"nodes": ...}``).
- v2 raw encrypted TCP on 127.0.0.1 (the 1214 protocol) [1.2]: AES-256-CBC / PKCS7 / zlib / URL-safe
  base64 envelope; ``nodename`` unchecked; wrong cluster name or secret → 401 envelope encrypted with
  the daemon's secret (``node None is not a cluster None node``); events too.
- v2 HTTP/2 cleartext prior knowledge on ``h2.sock`` [1.3, 2, 4]: ``/key``, ``/object_keys``,
  ``/whoami``, ``/events`` (SSE only with ``accept: text/event-stream``, nothing at all without),
  options = JSON body merged with the query string (query wins), invalid JSON body → whole connection
  dropped, ``o-node`` relay, HTTP/1.1 refused, response headers, and the flow-control quirk: no
  WINDOW_UPDATE is ever sent, so 65,535 bytes of request bodies per connection, ever; the request
  crossing it is never answered.
- v2 HTTPS on 127.0.0.1 (the 1215 listener) [1.1]: same HTTP/2 app over TLS with a throw-away CA made
  at start-up (``ca_file``); ALPN ``h2`` mandatory (else closed after the handshake); ``o-secret``
  (first 32 characters of the secret) or a client certificate signed by the cluster CA
  (``FakeOpenSVCCluster.issue_client_cert``) gives root; otherwise 401 ``Not Authorized``.
- v2 error shapes [2.1]: unknown object (``"'igw/cfg/nope'"`` + traceback with ``KeyError``), unknown
  key, missing option (400), malformed path (500), non-string ``data``, non-data kind
  (``'Svc' object has no attribute 'decode_key'``), unparsable object file, 501 for unknown
  handler/method; success replies ``info``/``data`` texts.
- v2 value quirks [3.2]: values kept as bytes; GET returns decoded text with invalid UTF-8 dropped; a
  single-line value has ``{name}``, ``{nodename}`` (also ``{namespace}``, ``{kind}``,
  ``{clustername}``) expanded and ``$(integer + - * arithmetic)`` evaluated on read; a value with
  ``\\r`` and no ``\\n`` breaks the object for every later call on every node holding that file, until
  ``FakeOpenSVCCluster.repair``.
- Lost updates [2.2]: every v2 write reads the object, waits ``write_latency_s`` (and the agent's
  ``write_barrier`` hook, if set), then writes the whole object back, without serialisation.
- Objects must exist (``create_object``) before keys can be set; the v2 API never creates them.
- Replication [4.3, 5]: a write is visible on its node at once and on each peer after
  ``replication_delay_s`` (newest write wins the whole object file, like the real file install);
  ``set_value`` is an out-of-band CLI write replicated the same way. A write through the v2 API (raw or
  HTTP/2) waits for its node's monitor loop (``monitor_interval_s``, 15 s by default like the real
  agent's 10-15 s; 0 = at once) unless ``POST wake_monitor`` (reply ``{"status": 0}``) runs the loop
  now. When a change lands on a node: projections refreshed, then on peers an ``event``
  ``service_config_installed`` (path, from), then a ``patch`` with ``updated`` and ``csum`` (MD5 of the
  rendered object file); om3 subscribers get ``ConfigFileUpdated`` then ``InstanceConfigUpdated``
  (labels path, node).
- Projection [5]: ``FakeAgent.project`` registers a file; it is rewritten in place (open with
  truncation, chunked writes, close; never renamed) when its value changes on that node, before a
  local ``POST`` returns, when a replicated change lands, and at agent start; unchanged content is not
  rewritten. ``projection_hook`` is awaited after truncation and after every chunk, so a test can
  look at the truncated or partial file deterministically.
- om3 REST on ``http.sock`` [7]: HTTP/2 cleartext prior knowledge with normal flow control;
  ``.../data/key`` GET/POST(409 if exists)/PUT(404 if missing)/DELETE → 204, ``.../data/keys``
  (``DataKeyList``), ``.../data?name=..`` (several, base64), ``PATCH .../data`` (batch, one
  transaction), problem-JSON errors with real codes, 413 ``Body too large`` over ``max_key_size``,
  event stream ``/api/node/name/{node}/daemon/event`` with ``filter``.
- Faults per agent: ``down`` (connections closed, new ones closed at once), ``delay_s``, ``fail_500``
  (the next N calls answer 500), ``auth_failure`` (401, raw 401 envelope); ``stop()``/``start()``
  restart on the same paths; event subscribers see their connection closed when the agent stops.

Not simulated: RBAC users and grants (``system/usr``, 403), HTTP Basic and JWT, the secret-strike
blacklist, ``/api`` manifest, server push, the 5 s HTTP/2 event flush bursts and the 2-16 s monitor
latency (events follow the landing at once), ``sec`` encryption at rest, the daemon's in-memory view
lagging the file, object creation/deletion through the API, om3 RBAC/proxying/replay/duration/limit
options, the exact om3 event JSON (only kind, labels and ``instance_config`` come from the doc).
Not simulated either: node-to-node raw protocol over the TLS port, ``listener.addr``/``tls_addr``
binding (everything listens on 127.0.0.1), the ``.conf`` file itself (only its MD5 is reproduced, over
a rendering of our own).

Assumed where the doc is silent: projected content is what v2 ``GET`` returns for single-line values
and the raw bytes otherwise; a deleted key leaves its projected file alone; the raw sockets close the
connection after the reply, close without a reply on undecodable JSON, and answer
``{"error": "invalid data format", "status": 1}`` to JSON that is not an object; ``whoami`` says
``"auth": "secret"`` / ``"x509"`` on the TLS listener and the raw TCP port; references are
case-sensitive; om3 writes are serialised and never expanded; SSE ids count from 1 per stream.

Test hooks (beyond the sockets): ``FakeOpenSVCCluster.settle()`` (pending replications, projections
and events), ``set_value``/``delete_value``/``value``/``keys`` (direct access to one node's copy),
``repair``, ``issue_client_cert``; ``FakeAgent.requests`` (served requests, after faults),
``faults``, ``wait_for_subscribers(n)`` (a raw ``events`` request is never acknowledged),
``projection_hook``, ``projection_chunk_bytes``, ``write_barrier`` (e.g. ``asyncio.Barrier(2).wait``
to make two concurrent writes lose one update deterministically).

Run one agent by hand (labelled as a simulator)::

    python -m sozud.testing.fake_opensvc --run-dir /tmp/fake-osvc --node node1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import os
import pathlib
import secrets
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, NamedTuple

from sozud.errors import OpenSVCError, OpenSVCNotFoundError, OpenSVCRefusedError
from sozud.log import configure_logging, get_logger
from sozud.testing import _fake_opensvc_om3 as om3
from sozud.testing import _fake_opensvc_v2 as v2
from sozud.testing._fake_opensvc_cost import AgentCost, AgentLoad
from sozud.testing._fake_opensvc_crypto import ClusterCA, TlsFiles
from sozud.testing._fake_opensvc_h2 import H2ServerConnection
from sozud.testing._fake_opensvc_store import ObjectState, csum, parse_path, v2_decoded_text

__all__ = [
    "BusEvent",
    "FakeAgent",
    "FakeFaults",
    "FakeOpenSVCCluster",
    "ProjectionStep",
    "ServedRequest",
]

_TRANSPORT = "fake-opensvc"
_log = get_logger(component="fake_opensvc")
PROJECTION_CHUNK_BYTES = 64 * 1024


class ServedRequest(NamedTuple):
    """One request the simulator served (after fault injection), e.g. ``("lsnr", "POST key", p, k)``.

    ``transport`` is ``lsnr``, ``raw_tcp``, ``h2``, ``https`` or ``om3``; ``action`` is
    ``"<METHOD> <handler>"`` (v2: ``POST key``, ``GET object_keys``, legacy ``set_key``; om3:
    ``PUT data/key``, ``GET data/keys``, ``GET event``).
    """

    transport: str
    action: str
    path: str | None
    key: str | None


@dataclass(frozen=True)
class ProjectionStep:
    """What ``FakeAgent.projection_hook`` is told: ``stage`` is ``truncated``, ``chunk`` or ``closed``;
    ``size`` the bytes written so far (the file is still open for the first two stages)."""

    file_path: pathlib.Path
    stage: str
    size: int
    total: int


@dataclass(frozen=True)
class BusEvent:
    """A change of an object file that landed on ``node`` (``from_node`` set when installed from a peer)."""

    node: str
    path: str
    updated: float
    csum: str
    from_node: str | None


class FakeFaults:
    """Injectable faults of one agent.

    ``down``: while true, existing connections are closed and new ones closed as soon as accepted.
    ``delay_s``: every request waits that long first. ``fail_500``: the next N requests answer 500.
    ``auth_failure``: every request answers 401 (raw: the 401 envelope).
    """

    def __init__(self, on_down: Callable[[], None]) -> None:
        self._on_down = on_down
        self._down = False
        self.delay_s = 0.0
        self.fail_500 = 0
        self.auth_failure = False

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        self._down = value
        if value:
            self._on_down()


def _default_secret() -> str:
    return secrets.token_hex(24)


class FakeOpenSVCCluster:
    """One simulated cluster: the shared store, replication, and the agents (one per node).

    ``replication_delay_s``: how long a write takes to reach every other node (the real range is
    0.2-14 s; 0 = peers' views change synchronously). ``max_key_size``: om3 ``node.max_key_size`` in
    bytes. ``write_latency_s``: time between a v2 write's read and its write-back (lost updates).
    """

    def __init__(
        self,
        name: str = "default",
        secret: str | None = None,
        *,
        replication_delay_s: float = 0.0,
        max_key_size: int = 1_000_000,
        write_latency_s: float = 0.0,
        monitor_interval_s: float = 15.0,
        cost: AgentCost | None = None,
    ) -> None:
        self.name = name
        self.secret = secret if secret is not None else _default_secret()
        if len(self.secret.encode("utf-8")) < 32:
            raise OpenSVCRefusedError("cluster secret must be at least 32 bytes", transport=_TRANSPORT)
        self.replication_delay_s = replication_delay_s
        self.max_key_size = max_key_size
        self.write_latency_s = write_latency_s
        self.monitor_interval_s = monitor_interval_s
        self.cost = cost or AgentCost()  # what a write costs each agent (sozud/testing/_fake_opensvc_cost.py)
        # v2 API writes waiting for their node's monitor loop: (node, path) -> object; and each node's
        # pending loop tick, and the time its loop started (ticks are that plus multiples of the interval)
        self._unreplicated: dict[tuple[str, str], ObjectState] = {}
        self._ticks: dict[str, asyncio.Task[None]] = {}
        self._loop_origin: dict[str, float] = {}
        self._resources: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}  # node -> path -> rid -> status
        self._kinds: dict[str, str] = {}
        self._latest: dict[str, ObjectState] = {}
        self._views: dict[str, dict[str, ObjectState]] = {}
        self._agents: dict[str, FakeAgent] = {}
        self._version = 0
        self._pending: set[asyncio.Task[None]] = set()
        self._ca: ClusterCA | None = None

    def __repr__(self) -> str:  # never show the secret
        return f"FakeOpenSVCCluster(name={self.name!r}, nodes={sorted(self._views)!r})"

    # --- contract ----------------------------------------------------------------------------------

    def create_object(self, path: str) -> None:
        """Create an (empty) object on every node, like ``om <path> create`` followed by replication."""
        parsed = parse_path(path)
        if parsed is None:
            raise OpenSVCRefusedError("malformed object path", transport=_TRANSPORT, obj=path)
        if path in self._kinds:
            return
        self._kinds[path] = parsed.kind
        self._version += 1
        obj = ObjectState(parsed.kind, {}, self._version, time.time())
        self._latest[path] = obj
        for view in self._views.values():
            view[path] = obj.copy()

    def agent(self, nodename: str, run_dir: pathlib.Path) -> FakeAgent:
        """The agent of ``nodename`` with its sockets under ``run_dir`` (not started yet)."""
        existing = self._agents.get(nodename)
        if existing is not None:
            if existing.run_dir != pathlib.Path(run_dir):
                raise OpenSVCRefusedError(
                    f"node {nodename} already has an agent in {existing.run_dir}", transport=_TRANSPORT
                )
            return existing
        self._view(nodename)
        agent = FakeAgent(self, nodename, pathlib.Path(run_dir))
        self._agents[nodename] = agent
        return agent

    def value(self, nodename: str, path: str, key: str) -> bytes | None:
        """The raw bytes stored for ``key`` in ``nodename``'s copy of ``path`` (None if absent)."""
        obj = self._views.get(nodename, {}).get(path)
        return None if obj is None else obj.keys.get(key)

    def set_value(self, nodename: str, path: str, key: str, value: bytes) -> None:
        """Write ``key`` on ``nodename`` out of band (like ``om <path> change``), replicated as usual."""
        obj = self._view(nodename).get(path)
        if obj is None:
            raise OpenSVCNotFoundError("no such object", transport=_TRANSPORT, obj=path, key=key)
        keys = dict(obj.keys)
        keys[key] = bytes(value)
        self.commit(nodename, path, keys)

    async def settle(self) -> None:
        """Wait until every pending replication, projection and event emission has finished."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # --- extras ------------------------------------------------------------------------------------

    def repair(self, path: str) -> None:
        """Remove the key(s) that broke ``path``'s file on every node (the manual fix of §3.2)."""
        for view in [*self._views.values(), self._latest]:
            obj = view.get(path)
            while obj is not None and (bad := obj.corrupt_key()) is not None:
                del obj.keys[bad]

    def delete_value(self, nodename: str, path: str, key: str) -> None:
        """Remove ``key`` on ``nodename`` out of band, replicated as usual."""
        obj = self._view(nodename).get(path)
        if obj is not None and key in obj.keys:
            keys = dict(obj.keys)
            del keys[key]
            self.commit(nodename, path, keys)

    def keys(self, nodename: str, path: str) -> list[str] | None:
        """The key names of ``nodename``'s copy of ``path`` in file order (None if no such object)."""
        obj = self._views.get(nodename, {}).get(path)
        return None if obj is None else list(obj.keys)

    def issue_client_cert(self, cn: str, directory: pathlib.Path) -> TlsFiles:
        """A client certificate signed by the cluster CA (for the HTTPS listener's x509 auth)."""
        return self.ca.issue(pathlib.Path(directory), cn, server=False)

    @property
    def ca(self) -> ClusterCA:
        if self._ca is None:
            self._ca = ClusterCA(self.name)
        return self._ca

    # --- simulator internals (used by the transport modules) ----------------------------------------

    def started_agents(self) -> list[FakeAgent]:
        return [agent for agent in self._agents.values() if agent.started and not agent.faults.down]

    def started_agent(self, nodename: str) -> FakeAgent | None:
        agent = self._agents.get(nodename)
        return agent if agent is not None and agent.started else None

    def object_paths(self) -> list[str]:
        return list(self._kinds)

    def _view(self, nodename: str) -> dict[str, ObjectState]:
        view = self._views.get(nodename)
        if view is None:
            view = {path: obj.copy() for path, obj in self._latest.items()}
            self._views[nodename] = view
        return view

    def read_object(self, nodename: str, path: str) -> ObjectState | None:
        return self._view(nodename).get(path)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    def commit(self, nodename: str, path: str, keys: dict[str, bytes], *, v2_api: bool = False) -> Awaitable[None]:
        """Replace ``nodename``'s copy of ``path`` with ``keys`` and replicate it.

        A write through the v2 API (``v2_api``) reaches the peers only when that node's monitor loop next
        runs (every ``monitor_interval_s``; 0 = at once), or right after a ``wake_monitor`` request; other
        writes (the CLI's ``set_value``, om3) are replicated at once. Returns an awaitable that completes
        when the local landing (projections, events) is done.
        """
        kind = self._kinds.get(path, "cfg")
        self._version += 1
        obj = ObjectState(kind, dict(keys), self._version, time.time())
        self._view(nodename)[path] = obj
        latest = self._latest.get(path)
        if latest is None or latest.version < obj.version:
            self._latest[path] = obj.copy()
        local = self._land(nodename, path, obj, None)
        if v2_api and self.monitor_interval_s > 0 and _loop_running():
            self._unreplicated[(nodename, path)] = obj.copy()
            if nodename not in self._ticks:
                # not in _pending: settle() does not wait for a monitor loop 15 s away
                self._ticks[nodename] = asyncio.get_running_loop().create_task(self._next_monitor_loop(nodename))
            return local
        self._replicate(nodename, path, obj)
        return local

    def set_resource_status(self, nodename: str, path: str, rid: str, status: str, log: list[str]) -> None:
        """What node ``nodename``'s monitor reports of resource ``rid`` of ``path`` (status and status log),
        as the real agent does from the resource's check (an app's check output, with ``status_log``)."""
        self._resources.setdefault(nodename, {}).setdefault(path, {})[rid] = {
            "status": status,
            "label": rid,
            "log": list(log),
        }

    def daemon_status(self, selector: object) -> dict[str, Any]:
        """The ``monitor`` part of v2 ``GET daemon_status``: per node, the instance status of the objects
        ``selector`` names (a path, or all), with the resources set by :meth:`set_resource_status`."""
        nodes: dict[str, Any] = {}
        for node in sorted(self._views):
            status = {
                path: {"resources": dict(resources)}
                for path, resources in self._resources.get(node, {}).items()
                if not isinstance(selector, str) or not selector or fnmatch.fnmatchcase(path, selector)
            }
            nodes[node] = {"services": {"status": status}}
        return {"monitor": {"nodes": nodes}}

    def wake_monitor(self, nodename: str) -> None:
        """``POST wake_monitor`` on ``nodename``: its monitor loop runs now and replicates what waits."""
        for (node, path), obj in list(self._unreplicated.items()):
            if node == nodename:
                del self._unreplicated[(node, path)]
                self._replicate(node, path, obj)

    def loop_started(self, nodename: str) -> None:
        """An agent started: its monitor loop ticks from now on."""
        self._loop_origin[nodename] = time.monotonic()

    def loop_stopped(self, nodename: str) -> None:
        """An agent stopped: its pending loop tick is dropped (what waits replicates after a restart)."""
        tick = self._ticks.pop(nodename, None)
        if tick is not None:
            tick.cancel()

    async def _next_monitor_loop(self, nodename: str) -> None:
        origin = self._loop_origin.setdefault(nodename, time.monotonic())
        elapsed = time.monotonic() - origin
        ticks = int(elapsed // self.monitor_interval_s) + 1
        try:
            await asyncio.sleep(origin + ticks * self.monitor_interval_s - time.monotonic())
        finally:
            self._ticks.pop(nodename, None)
        self.wake_monitor(nodename)

    def _replicate(self, nodename: str, path: str, obj: ObjectState) -> None:
        for peer in list(self._views):
            if peer == nodename:
                continue
            if self.replication_delay_s <= 0 or not _loop_running():
                if self._install(peer, path, obj):
                    self._land(peer, path, obj, nodename)
            else:
                self.spawn(self._replicate_later(peer, path, obj.copy(), nodename))

    def _install(self, nodename: str, path: str, obj: ObjectState) -> bool:
        view = self._view(nodename)
        current = view.get(path)
        if current is not None and current.version >= obj.version:
            return False
        view[path] = obj.copy()
        return True

    async def _replicate_later(self, nodename: str, path: str, obj: ObjectState, from_node: str) -> None:
        await asyncio.sleep(self.replication_delay_s)
        if self._install(nodename, path, obj):
            await self._land(nodename, path, obj, from_node)

    def _land(self, nodename: str, path: str, obj: ObjectState, from_node: str | None) -> Awaitable[None]:
        agent = self._agents.get(nodename)
        parsed = parse_path(path)
        if agent is None or parsed is None:
            return _done()
        event = BusEvent(nodename, path, obj.updated, csum(parsed, obj), from_node)
        if not _loop_running():  # a synchronous set-up call: no subscribers can exist
            agent.refresh_projections_sync(path)
            return _done()
        return self.spawn(agent.land(event))


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _Done:
    """An awaitable that is already complete (usable without a running loop)."""

    def __await__(self) -> Generator[Any, None, None]:
        yield from ()


def _done() -> Awaitable[None]:
    return _Done()


class FakeAgent:
    """One simulated agent: its sockets, its faults, its projections and its request log."""

    def __init__(self, cluster: FakeOpenSVCCluster, nodename: str, run_dir: pathlib.Path) -> None:
        self.cluster = cluster
        self.nodename = nodename
        self.run_dir = run_dir
        self.load = AgentLoad(cluster.cost)
        self.lsnr_sock = run_dir / "lsnr.sock"
        self.h2_sock = run_dir / "h2.sock"
        self.om3_sock = run_dir / "http.sock"
        self.raw_tcp_port = 0
        self.https_port: int | None = None
        self.ca_file: pathlib.Path | None = None
        self.faults = FakeFaults(self._close_connections)
        self.requests: list[ServedRequest] = []
        self.projection_hook: Callable[[ProjectionStep], Awaitable[None]] | None = None
        self.write_barrier: Callable[[], Awaitable[object]] | None = None
        self.projection_chunk_bytes = PROJECTION_CHUNK_BYTES
        self._projections: list[tuple[str, str, pathlib.Path]] = []
        self._servers: list[asyncio.Server] = []
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._closers: set[Callable[[], None]] = set()
        self._subscribers: set[asyncio.Queue[BusEvent | None]] = set()
        self._subscribers_changed = asyncio.Event()
        self._landing_lock = asyncio.Lock()
        self._patch_id = 0
        self._started = False
        self._tls: TlsFiles | None = None

    def __repr__(self) -> str:
        return f"FakeAgent(node={self.nodename!r}, run_dir={str(self.run_dir)!r}, started={self._started})"

    @property
    def started(self) -> bool:
        return self._started

    # --- life cycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on ``lsnr.sock``, ``h2.sock``, ``http.sock``, the raw TCP and the HTTPS ports."""
        if self._started:
            return
        self.cluster.loop_started(self.nodename)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for sock in (self.lsnr_sock, self.h2_sock, self.om3_sock):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        limit = 64 * 1024 * 1024
        self._servers.append(
            await asyncio.start_unix_server(self._tracked(self._serve_lsnr), path=str(self.lsnr_sock), limit=limit)
        )
        self._servers.append(await asyncio.start_unix_server(self._tracked(self._serve_h2), path=str(self.h2_sock)))
        self._servers.append(await asyncio.start_unix_server(self._tracked(self._serve_om3), path=str(self.om3_sock)))
        raw = await asyncio.start_server(
            self._tracked(self._serve_raw_tcp), host="127.0.0.1", port=self.raw_tcp_port, limit=limit
        )
        self._servers.append(raw)
        self.raw_tcp_port = raw.sockets[0].getsockname()[1]
        if self._tls is None:
            self._tls = self.cluster.ca.issue(self.run_dir / "certs", self.nodename, server=True)
        self.ca_file = self._tls.ca_file
        tls = await asyncio.start_server(
            self._tracked(self._serve_https),
            host="127.0.0.1",
            port=self.https_port or 0,
            ssl=self._server_ssl_context(self._tls),
        )
        self._servers.append(tls)
        self.https_port = tls.sockets[0].getsockname()[1]
        self._started = True
        _log.info(
            "fake_opensvc.started",
            node=self.nodename,
            run_dir=str(self.run_dir),
            raw_tcp_port=self.raw_tcp_port,
            https_port=self.https_port,
        )
        for path, _key, _file in list(self._projections):
            await self._refresh_projection_files(path)

    async def stop(self) -> None:
        """Stop listening, close every connection (event streams included), remove the sockets."""
        if not self._started:
            return
        self._started = False
        self.cluster.loop_stopped(self.nodename)
        for server in self._servers:
            server.close()
        self._close_connections()
        for subscriber in list(self._subscribers):
            subscriber.put_nowait(None)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self._servers.clear()
        tasks = [t for t in self._conn_tasks if t is not _current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in (self.lsnr_sock, self.h2_sock, self.om3_sock):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        _log.info("fake_opensvc.stopped", node=self.nodename)

    async def __aenter__(self) -> FakeAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _close_connections(self) -> None:
        """Abort every open connection and cancel its handler (event streams included)."""
        for closer in list(self._closers):
            with contextlib.suppress(Exception):
                closer()
        current = _current_task()
        for task in list(self._conn_tasks):
            if task is not current:
                task.cancel()

    def _tracked(
        self, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._conn_tasks.add(task)
            closer = writer.transport.abort
            self._closers.add(closer)
            try:
                if self.faults.down or not self._started:
                    return
                await serve(reader, writer)
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # hostile input must never take the simulator down
                _log.warning("fake_opensvc.connection_failed", node=self.nodename, error=repr(exc))
            finally:
                self._closers.discard(closer)
                if task is not None:
                    self._conn_tasks.discard(task)
                with contextlib.suppress(Exception):
                    writer.transport.abort()

        return run

    def _server_ssl_context(self, files: TlsFiles) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(files.cert_file, files.key_file)
        context.load_verify_locations(cafile=str(files.ca_file))
        context.verify_mode = ssl.CERT_OPTIONAL
        context.set_alpn_protocols(["h2"])
        return context

    # --- per-request gate ---------------------------------------------------------------------------

    async def gate(self) -> str | None:
        """Apply the faults to one request: ``"down"``, ``"auth"``, ``"500"`` or None (serve it)."""
        if self.faults.down:
            return "down"
        if self.faults.delay_s > 0:
            await asyncio.sleep(self.faults.delay_s)
            if self.faults.down:
                return "down"
        if self.faults.auth_failure:
            return "auth"
        if self.faults.fail_500 > 0:
            self.faults.fail_500 -= 1
            return "500"
        return None

    def log_request(self, transport: str, action: str, path: object, key: object) -> None:
        self.requests.append(
            ServedRequest(
                transport,
                action,
                path if isinstance(path, str) else None,
                key if isinstance(key, str) else None,
            )
        )

    # --- transports ---------------------------------------------------------------------------------

    async def _serve_lsnr(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await v2.serve_raw(self, reader, writer, transport="lsnr", encrypted=False)

    async def _serve_raw_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await v2.serve_raw(self, reader, writer, transport="raw_tcp", encrypted=True)

    async def _serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._run_h2(v2.H2App(self, "h2"), reader, writer, ack=False)

    async def _serve_https(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            return  # ALPN h2 is mandatory: closed right after the handshake
        has_cert = ssl_object.getpeercert() not in (None, {})
        await self._run_h2(v2.H2App(self, "https"), reader, writer, ack=False, tls_client_cert=has_cert)

    async def _serve_om3(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        app = om3.Om3App(self)
        conn = H2ServerConnection(
            reader,
            writer,
            app.handle,
            ack_received_data=True,
            max_body_bytes=self.cluster.max_key_size,
            early_check=app.early_check,
            too_large=app.too_large,
        )
        self._closers.add(conn.close)
        try:
            await conn.run()
        finally:
            self._closers.discard(conn.close)

    async def _run_h2(
        self,
        app: v2.H2App,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        ack: bool,
        tls_client_cert: bool = False,
    ) -> None:
        conn = H2ServerConnection(reader, writer, app.handle, ack_received_data=ack, tls_client_cert=tls_client_cert)
        self._closers.add(conn.close)
        try:
            await conn.run()
        finally:
            self._closers.discard(conn.close)

    # --- events -------------------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[BusEvent | None]:
        """A queue receiving every change landing on this node; None means the agent stopped."""
        queue: asyncio.Queue[BusEvent | None] = asyncio.Queue()
        self._subscribers.add(queue)
        self._subscribers_changed.set()
        return queue

    def unsubscribe(self, queue: asyncio.Queue[BusEvent | None]) -> None:
        self._subscribers.discard(queue)
        self._subscribers_changed.set()

    @property
    def subscriber_count(self) -> int:
        """Event subscribers currently attached (any transport)."""
        return len(self._subscribers)

    async def wait_for_subscribers(self, count: int = 1) -> None:
        """Return once at least ``count`` event subscribers are attached (a raw ``events`` request gets
        no acknowledgement, so tests wait here before making the change they expect to see)."""
        while len(self._subscribers) < count:
            self._subscribers_changed.clear()
            await self._subscribers_changed.wait()

    def next_patch_id(self) -> int:
        self._patch_id += 1
        return self._patch_id

    async def land(self, event: BusEvent) -> None:
        """A change reached this node: refresh projections, then tell the subscribers."""
        async with self._landing_lock:
            if self._started:
                await self._refresh_projection_files(event.path)
            for queue in list(self._subscribers):
                queue.put_nowait(event)

    # --- projections --------------------------------------------------------------------------------

    def project(self, path: str, key: str, file_path: pathlib.Path) -> None:
        """Project ``key`` of ``path`` into ``file_path`` (a volume ``configs`` entry of a started volume).

        The file is written at the next ``start()``, or now (in the background) if already started.
        """
        self._projections.append((path, key, pathlib.Path(file_path)))
        if self._started:
            with contextlib.suppress(RuntimeError):
                self.cluster.spawn(self._locked_refresh(path))

    async def _locked_refresh(self, path: str) -> None:
        async with self._landing_lock:
            await self._refresh_projection_files(path)

    def _projected_bytes(self, path: str, key: str) -> bytes | None:
        obj = self.cluster.read_object(self.nodename, path)
        parsed = parse_path(path)
        if obj is None or parsed is None or obj.corrupt_key() is not None or key not in obj.keys:
            return None
        raw = obj.keys[key]
        if obj.kind == "cfg" and b"\n" not in raw:
            text = v2_decoded_text(raw, path=parsed, nodename=self.nodename, clustername=self.cluster.name)
            return text.encode("utf-8")
        return raw

    async def _refresh_projection_files(self, path: str) -> None:
        for obj_path, key, file_path in list(self._projections):
            if obj_path != path:
                continue
            data = self._projected_bytes(obj_path, key)
            if data is None:
                continue
            await self._write_in_place(file_path, data)

    def refresh_projections_sync(self, path: str) -> None:
        """Projection refresh without an event loop (synchronous set-up calls); no hook, one write."""
        if not self._started:
            return
        for obj_path, key, file_path in list(self._projections):
            data = self._projected_bytes(obj_path, key) if obj_path == path else None
            if data is not None and _read_or_none(file_path) != data:
                file_path.parent.mkdir(parents=True, exist_ok=True)
                with open(file_path, "wb") as handle:
                    handle.write(data)

    async def _write_in_place(self, file_path: pathlib.Path, data: bytes) -> None:
        if _read_or_none(file_path) == data:
            return  # unchanged content is not rewritten
        file_path.parent.mkdir(parents=True, exist_ok=True)
        hook = self.projection_hook
        # Truncate and rewrite the same inode (never a rename), in chunks, like the agent.
        with open(file_path, "wb") as handle:  # noqa: ASYNC230 - small local files, deterministic steps
            if hook is not None:
                await hook(ProjectionStep(file_path, "truncated", 0, len(data)))
            written = 0
            step = max(1, self.projection_chunk_bytes)
            while written < len(data):
                handle.write(data[written : written + step])
                handle.flush()
                written = min(len(data), written + step)
                if hook is not None:
                    await hook(ProjectionStep(file_path, "chunk", written, len(data)))
        if hook is not None:
            await hook(ProjectionStep(file_path, "closed", len(data), len(data)))


def _read_or_none(path: pathlib.Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


# --- command line ----------------------------------------------------------------------------------

_BANNER = "SIMULATED OpenSVC agent (sozud test simulator, NOT a real OpenSVC agent)"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sozud.testing.fake_opensvc",
        description=_BANNER
        + ": serves lsnr.sock, h2.sock and http.sock under --run-dir, the encrypted raw protocol and"
        " HTTPS on 127.0.0.1, with an in-memory store. For local trials and demos only.",
    )
    parser.add_argument("--run-dir", type=pathlib.Path, required=True, help="directory for the sockets")
    parser.add_argument("--node", required=True, help="simulated node name")
    parser.add_argument("--cluster-name", default="default", help="cluster name (default: default)")
    parser.add_argument(
        "--object",
        action="append",
        default=None,
        help="object to create at start (repeatable; default: igw/cfg/sozu)",
    )
    parser.add_argument("--raw-tcp-port", type=int, default=0, help="raw encrypted port (default: ephemeral)")
    parser.add_argument("--https-port", type=int, default=0, help="HTTPS port (default: ephemeral)")
    return parser.parse_args(argv)


async def _amain(args: argparse.Namespace) -> None:
    print(_BANNER, flush=True)
    cluster = FakeOpenSVCCluster(args.cluster_name)
    for path in args.object or ["igw/cfg/sozu"]:
        cluster.create_object(path)
    agent = cluster.agent(args.node, args.run_dir)
    agent.raw_tcp_port = args.raw_tcp_port
    agent.https_port = args.https_port or None
    await agent.start()
    secret_file = args.run_dir / "cluster.secret"
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(cluster.secret + "\n")
    print(f"  node {agent.nodename}, cluster {cluster.name}")
    print(f"  v2 raw unix:   {agent.lsnr_sock}")
    print(f"  v2 HTTP/2:     {agent.h2_sock}")
    print(f"  om3 HTTP/2:    {agent.om3_sock}")
    print(f"  v2 raw TCP:    127.0.0.1:{agent.raw_tcp_port} (secret in {secret_file}, mode 0600)")
    print(f"  v2 HTTPS:      127.0.0.1:{agent.https_port} (CA {agent.ca_file})")
    print("  Ctrl-C to stop.", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await agent.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    configure_logging("info")
    try:
        asyncio.run(_amain(args))
    except OpenSVCError as exc:
        print(f"fake_opensvc: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
