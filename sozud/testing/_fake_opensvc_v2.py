"""The v2 (agent 2.1) side of the OpenSVC simulator: handlers, raw sockets, HTTP/2 app, events.

Handlers answer ``(http_status, body)``; the raw transports send only the body, the HTTP/2 app both.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from sozud.testing._fake_opensvc_crypto import EnvelopeError, decrypt_payload, encrypt_payload, parse_envelope
from sozud.testing._fake_opensvc_h2 import DROP, HOLD, H2EventStream, H2Request, H2Response, Verdict
from sozud.testing._fake_opensvc_store import DATA_KINDS, ObjectState, csum, parse_path, v2_decoded_text

if TYPE_CHECKING:
    from sozud.testing.fake_opensvc import BusEvent, FakeAgent

Reply = tuple[int, dict[str, Any]]

# (method, handler name) -> operation; legacy aliases exist only without a method.
ROUTES: dict[tuple[str | None, str], str] = {
    ("GET", "key"): "get_key",
    ("POST", "key"): "set_key",
    ("DELETE", "key"): "del_key",
    (None, "get_key"): "get_key",
    (None, "set_key"): "set_key",
    ("GET", "object_keys"): "object_keys",
    ("GET", "whoami"): "whoami",
    ("GET", "daemon_status"): "daemon_status",
    (None, "daemon_status"): "daemon_status",
    ("POST", "wake_monitor"): "wake_monitor",
    (None, "wake_monitor"): "wake_monitor",
}
RAW_401 = {"status": 401, "error": "node None is not a cluster None node"}
HTTP_401 = {"status": 401, "error": "Not Authorized"}
SIMULATED_500 = {"status": 500, "error": "simulated internal error (fake_opensvc fail_500 fault)"}
_UXSOCK_IDENTITY: dict[str, Any] = {
    "name": "root",
    "namespace": None,
    "auth": "uxsock",
    "raw_grant": "root",
    "grant": {"root": None},
}


def _traceback(handler: str, last_line: str) -> str:
    return (
        "Traceback (most recent call last):\n"
        f'  File "<fake_opensvc>/daemon/handlers/{handler}", line 1, in action\n'
        "    (simulated traceback)\n"
        f"{last_line}\n"
    )


def _missing(option: str) -> Reply:
    return 400, {"status": 400, "error": f"required option {option} is not set"}


class _Failure(Exception):
    """A handler's error reply, raised to unwind (internal)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply[1].get("error"))
        self.reply = reply


def _lookup(agent: FakeAgent, options: dict[str, Any], handler: str, *, need_data_kind: bool) -> ObjectState:
    """The object named by ``options["path"]`` on ``agent``'s node, or a _Failure with the v2 shape."""
    path = options["path"]
    parsed = parse_path(path) if isinstance(path, str) else None
    if parsed is None:
        text = str(path)
        raise _Failure((500, {"status": 500, "error": text, "traceback": _traceback(handler, f"ValueError: {text}")}))
    obj = agent.cluster.read_object(agent.nodename, path)
    if obj is None:
        raise _Failure(
            (200, {"status": 1, "error": repr(path), "traceback": _traceback(handler, f"KeyError: {path!r}")})
        )
    if need_data_kind and obj.kind not in DATA_KINDS:
        error = f"'{obj.kind.capitalize()}' object has no attribute 'decode_key'"
        raise _Failure(
            (200, {"status": 1, "error": error, "traceback": _traceback(handler, f"AttributeError: {error}")})
        )
    parse_error = obj.parse_error(parsed)
    if parse_error is not None:
        raise _Failure((200, {"status": 1, "error": parse_error}))
    return obj


def _require(options: dict[str, Any], *names: str) -> Reply | None:
    for name in names:
        if options.get(name) is None:
            return _missing(name)
    return None


async def _get_key(agent: FakeAgent, options: dict[str, Any]) -> Reply:
    missing = _require(options, "path", "key")
    if missing is not None:
        return missing
    obj = _lookup(agent, options, "key/get.py", need_data_kind=True)
    key = options["key"]
    raw = obj.keys.get(key) if isinstance(key, str) else None
    if raw is None:
        return 200, {"status": 1, "error": f"configuration key {key} does not exist or has no value"}
    parsed = parse_path(options["path"])
    assert parsed is not None
    if obj.kind == "cfg":
        text = v2_decoded_text(raw, path=parsed, nodename=agent.nodename, clustername=agent.cluster.name)
    else:
        text = raw.decode("utf-8", errors="ignore")
    return 200, {"status": 0, "data": text}


async def _read_modify_write(agent: FakeAgent, path: str, key: str, value: bytes | None) -> None:
    """v2's unserialised write: read the whole object, wait, write the whole object back."""
    obj = agent.cluster.read_object(agent.nodename, path)
    assert obj is not None
    keys = dict(obj.keys)
    if agent.cluster.write_latency_s > 0:
        await asyncio.sleep(agent.cluster.write_latency_s)
    if agent.write_barrier is not None:
        await agent.write_barrier()
    if agent.load.cost.enabled:  # the agent rewrites and re-processes the whole object (cost model)
        size = sum(len(k) + len(v) for k, v in keys.items()) + (len(value) if value is not None else 0)
        await agent.load.write(size)
    if value is None:
        if key not in keys:
            return
        del keys[key]
    else:
        keys[key] = value
    await agent.cluster.commit(agent.nodename, path, keys, v2_api=True)


async def _set_key(agent: FakeAgent, options: dict[str, Any]) -> Reply:
    missing = _require(options, "path", "key", "data")
    if missing is not None:
        return missing
    _lookup(agent, options, "key/post.py", need_data_kind=True)
    key, data = options["key"], options["data"]
    if not isinstance(data, str):
        error = f"a bytes-like object is required, not '{type(data).__name__}'"
        return 200, {"status": 1, "error": error, "traceback": _traceback("key/post.py", f"TypeError: {error}")}
    if not isinstance(key, str):
        key = str(key)
    try:
        value = data.encode("utf-8")
    except UnicodeEncodeError as exc:
        return 200, {
            "status": 1,
            "error": str(exc),
            "traceback": _traceback("key/post.py", f"UnicodeEncodeError: {exc}"),
        }
    await _read_modify_write(agent, options["path"], key, value)
    return 200, {"status": 0, "info": f"key {key} value set"}


async def _del_key(agent: FakeAgent, options: dict[str, Any]) -> Reply:
    missing = _require(options, "path", "key")
    if missing is not None:
        return missing
    _lookup(agent, options, "key/delete.py", need_data_kind=True)
    key = str(options["key"])
    await _read_modify_write(agent, options["path"], key, None)
    return 200, {"status": 0, "info": f"key {key} value unset"}


async def _object_keys(agent: FakeAgent, options: dict[str, Any]) -> Reply:
    missing = _require(options, "path")
    if missing is not None:
        return missing
    obj = _lookup(agent, options, "object/keys.py", need_data_kind=True)
    return 200, {"status": 0, "data": list(obj.keys)}


async def _run(agent: FakeAgent, operation: str, options: dict[str, Any], identity: dict[str, Any]) -> Reply:
    try:
        if operation == "get_key":
            return await _get_key(agent, options)
        if operation == "set_key":
            return await _set_key(agent, options)
        if operation == "del_key":
            return await _del_key(agent, options)
        if operation == "object_keys":
            return await _object_keys(agent, options)
        if operation == "daemon_status":
            return 200, agent.cluster.daemon_status(options.get("selector"))
        if operation == "wake_monitor":
            agent.cluster.wake_monitor(agent.nodename)
            return 200, {"status": 0}
        return 200, dict(identity)
    except _Failure as failure:
        return failure.reply


def _select_nodes(agent: FakeAgent, selector: str) -> list[FakeAgent]:
    agents = agent.cluster.started_agents()
    if selector in ("*", "all"):
        return agents
    wanted = {part.strip() for part in selector.split(",")}
    return [a for a in agents if any(fnmatch.fnmatchcase(a.nodename, w) for w in wanted)]


async def call(
    agent: FakeAgent,
    transport: str,
    method: str | None,
    action: str,
    options: dict[str, Any],
    *,
    identity: dict[str, Any],
    relay: str | None = None,
) -> Reply:
    """Route one v2 request (faults already applied) and log it as served."""
    label = f"{method} {action}" if method is not None else action
    agent.log_request(transport, label, options.get("path"), options.get("key"))
    operation = ROUTES.get((method, action))
    if operation is None:
        return 501, {"status": 501, "error": f"handler {method} {action} is not supported"}
    if relay is None:
        return await _run(agent, operation, options, identity)
    nodes: dict[str, Any] = {}
    for peer in _select_nodes(agent, relay):
        path = options.get("path")
        if isinstance(path, str) and agent.cluster.read_object(peer.nodename, path) is None:
            continue  # nodes without an instance of the object are silently left out
        nodes[peer.nodename] = (await _run(peer, operation, options, identity))[1]
    return 200, {"nodes": nodes, "status": 0}


# --- events ------------------------------------------------------------------------------------------


def _matches(selector: str | None, path: str) -> bool:
    if not selector:
        return True
    return any(fnmatch.fnmatchcase(path, part.strip()) for part in selector.split(","))


def format_events(agent: FakeAgent, event: BusEvent) -> list[dict[str, Any]]:
    """The v2 events a change landing on this node produces (peers: an ``event``, then a ``patch``)."""
    out: list[dict[str, Any]] = []
    now = time.time()
    if event.from_node is not None:
        out.append(
            {
                "kind": "event",
                "nodename": event.node,
                "ts": now,
                "data": {
                    "id": "service_config_installed",
                    "path": event.path,
                    "from": event.from_node,
                    "monitor": {},
                    "service": {},
                    "instance": {},
                },
            }
        )
    prefix = ["monitor", "nodes", event.node, "services", "config", event.path]
    out.append(
        {
            "kind": "patch",
            "id": agent.next_patch_id(),
            "ts": now,
            "data": [[[*prefix, "updated"], event.updated], [[*prefix, "csum"], event.csum]],
        }
    )
    return out


def _full_status(agent: FakeAgent, selector: str | None) -> dict[str, Any]:
    nodes: dict[str, Any] = {}
    for peer in agent.cluster.started_agents():
        config: dict[str, Any] = {}
        for path in agent.cluster.object_paths():
            obj = agent.cluster.read_object(peer.nodename, path)
            parsed = parse_path(path)
            if obj is not None and parsed is not None and _matches(selector, path):
                config[path] = {"updated": obj.updated, "csum": csum(parsed, obj)}
        nodes[peer.nodename] = {"services": {"config": config}}
    return {"kind": "full", "nodename": agent.nodename, "ts": time.time(), "data": {"monitor": {"nodes": nodes}}}


async def v2_events(agent: FakeAgent, options: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Events for one subscriber, until the agent stops. Subscribes before the first ``await``."""
    queue = agent.subscribe()
    selector = options.get("selector") if isinstance(options.get("selector"), str) else None
    try:
        if str(options.get("full", "")).lower() in ("true", "1", "yes"):
            yield _full_status(agent, selector)
        while True:
            item = await queue.get()
            if item is None:
                return
            if not _matches(selector, item.path):
                continue
            for event in format_events(agent, item):
                yield event
    finally:
        agent.unsubscribe(queue)


# --- raw sockets ---------------------------------------------------------------------------------------


async def serve_raw(
    agent: FakeAgent,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    transport: str,
    encrypted: bool,
) -> None:
    """One request per connection: ``lsnr.sock`` (plain) or the 1214 protocol (``encrypted``)."""
    cluster = agent.cluster

    async def send(message: dict[str, Any]) -> None:
        if encrypted:
            payload = encrypt_payload(cluster.secret, cluster.name, agent.nodename, message)
        else:
            payload = json.dumps(message).encode("utf-8")
        writer.write(payload + b"\0")
        await writer.drain()

    async def reply_and_close(message: dict[str, Any]) -> None:
        await send(message)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    try:
        raw = (await reader.readuntil(b"\0"))[:-1]
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return
    message: Any
    if encrypted:
        try:
            envelope = parse_envelope(raw)
        except EnvelopeError:
            return  # not an envelope at all: closed without a reply
        try:
            if envelope.clustername != cluster.name:
                raise EnvelopeError("wrong cluster name")
            message = decrypt_payload(cluster.secret, envelope)
        except (EnvelopeError, RecursionError):
            await reply_and_close(RAW_401)
            return
    else:
        try:
            message = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            return  # garbage: closed without a reply
    verdict = await agent.gate()
    if verdict == "down":
        return
    if verdict == "auth":
        await reply_and_close(RAW_401)
        return
    if verdict == "500":
        await reply_and_close(SIMULATED_500)
        return
    if not isinstance(message, dict):
        await reply_and_close({"error": "invalid data format", "status": 1})
        return
    if "action" not in message:
        await reply_and_close({"error": "action not specified", "status": 1})
        return
    action = str(message["action"])
    method = message.get("method")
    method = None if method is None else str(method)
    options = message.get("options")
    options = dict(options) if isinstance(options, dict) else {}
    if (method, action) == ("GET", "events"):
        agent.log_request(transport, "GET events", options.get("selector"), None)
        async for event in v2_events(agent, options):
            await send(event)
        return
    relay = message.get("node")
    identity = dict(_UXSOCK_IDENTITY)
    if encrypted:
        identity["auth"] = "secret"

    async def answer() -> tuple[int, dict[str, Any]]:
        await agent.load.before_request()
        return await call(
            agent,
            transport,
            method,
            action,
            options,
            identity=identity,
            relay=relay if isinstance(relay, str) else None,
        )

    if agent.load.cost.serialise_raw:
        async with agent.load.raw_lock:  # the real raw listener serves one request at a time
            reply = await answer()
    else:
        reply = await answer()
    await reply_and_close(reply[1])


# --- HTTP/2 (h2.sock and the TLS listener) ----------------------------------------------------------


def _json(status: int, body: dict[str, Any]) -> H2Response:
    return H2Response(status, json.dumps(body).encode("utf-8"))


class H2App:
    """The v2 HTTP/2 request mapping: URL path = handler, options = JSON body + query string."""

    def __init__(self, agent: FakeAgent, transport: str) -> None:
        self._agent = agent
        self._transport = transport

    def _identity(self, request: H2Request) -> dict[str, Any] | None:
        if self._transport != "https":
            return dict(_UXSOCK_IDENTITY)
        secret = request.headers.get("o-secret")
        if secret is not None and secret == self._agent.cluster.secret[:32]:
            return {**_UXSOCK_IDENTITY, "auth": "secret"}
        if request.tls_client_cert:
            return {**_UXSOCK_IDENTITY, "auth": "x509"}
        return None

    async def handle(self, request: H2Request) -> H2Response | H2EventStream | Verdict:
        agent = self._agent
        verdict = await agent.gate()
        if verdict == "down":
            return DROP
        if verdict == "auth":
            return _json(401, HTTP_401)
        if verdict == "500":
            return _json(500, SIMULATED_500)
        identity = self._identity(request)
        if identity is None:
            return _json(401, HTTP_401)
        options: dict[str, Any] = {}
        if request.body.strip():
            try:
                decoded = json.loads(request.body.decode("utf-8"))
            except (ValueError, RecursionError):
                return DROP  # the daemon drops the whole connection
            if isinstance(decoded, dict):
                options.update(decoded)
        for name, value in request.query:
            options[name] = value
        action = request.path.lstrip("/")
        if (request.method, action) == ("GET", "events"):
            agent.log_request(self._transport, "GET events", options.get("selector"), None)
            accept = request.headers.get("accept", "")
            if "text/event-stream" not in accept:
                return HOLD  # the daemon tries server push: nothing a client can read arrives
            return H2EventStream(200, accept, _sse(v2_events(agent, options)))
        status, body = await call(
            agent,
            self._transport,
            request.method,
            action,
            options,
            identity=identity,
            relay=request.headers.get("o-node"),
        )
        return _json(status, body)


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    number = 0
    async for event in events:
        number += 1
        yield f"id: {number}\ndata: {json.dumps(event)}\n\n".encode()
