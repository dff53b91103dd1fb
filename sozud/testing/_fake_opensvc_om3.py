"""The om3 (v3) side of the OpenSVC simulator: the REST data-key API and the event stream on ``http.sock``.

Values are opaque bytes (no expansion, no UTF-8 requirement); errors are problem objects
``{"title", "detail", "status"}`` with real HTTP codes. Writes are applied atomically (om3 serialises
them), unlike v2's lost updates.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import http
import json
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from sozud.testing._fake_opensvc_h2 import DROP, H2EventStream, H2Request, H2Response, Verdict
from sozud.testing._fake_opensvc_store import DATA_KINDS, parse_path

if TYPE_CHECKING:
    from sozud.testing.fake_opensvc import BusEvent, FakeAgent

_OBJECT_DATA = re.compile(r"^/api/object/path/([^/]+)/([^/]+)/([^/]+)/data(/key|/keys)?$")
_NODE_EVENTS = re.compile(r"^/api/node/name/([^/]+)/daemon/event$")


def problem(status: int, detail: str, title: str | None = None) -> H2Response:
    body = {"title": title or http.HTTPStatus(status).phrase, "detail": detail, "status": status}
    return H2Response(status, json.dumps(body).encode("utf-8"))


def _no_content() -> H2Response:
    return H2Response(204, b"", content_type=None)


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")


class Om3App:
    """Routes one om3 request; one instance per connection."""

    def __init__(self, agent: FakeAgent) -> None:
        self._agent = agent

    # --- body size -----------------------------------------------------------------------------

    def too_large(self) -> H2Response:
        limit = self._agent.cluster.max_key_size
        return problem(413, f"request body exceeds node.max_key_size ({limit} bytes)", "Body too large")

    def early_check(self, request: H2Request) -> H2Response | None:
        """413 from the ``content-length`` header alone, before the body arrives."""
        length = request.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self._agent.cluster.max_key_size:
            return self.too_large()
        return None

    # --- routing -------------------------------------------------------------------------------

    async def handle(self, request: H2Request) -> H2Response | H2EventStream | Verdict:
        agent = self._agent
        verdict = await agent.gate()
        if verdict == "down":
            return DROP
        if verdict == "auth":
            return problem(401, "simulated authentication failure")
        if verdict == "500":
            return problem(500, "simulated internal error (fake_opensvc fail_500 fault)")
        events = _NODE_EVENTS.match(request.path)
        if events is not None:
            return self._events(request, events.group(1))
        match = _OBJECT_DATA.match(request.path)
        if match is None:
            agent.log_request("om3", f"{request.method} {request.path}", None, None)
            return problem(404, f"no route for {request.method} {request.path}")
        path = "/".join(match.group(1, 2, 3))
        suffix = match.group(4) or ""
        name = request.query_first("name")
        agent.log_request("om3", f"{request.method} data{suffix}", path, name)
        parsed = parse_path(path)
        if parsed is None:
            return problem(400, f"invalid object path {path}")
        obj = agent.cluster.read_object(agent.nodename, path)
        if obj is None:
            return problem(404, f"object {path} not found")
        if obj.kind not in DATA_KINDS:
            return problem(400, f"object {path} is a {obj.kind}, not a data store")
        if suffix == "/keys":
            if request.method != "GET":
                return problem(405, f"{request.method} not allowed on {request.path}")
            items = [
                {"node": agent.nodename, "object": path, "name": key, "size": len(value)}
                for key, value in obj.keys.items()
            ]
            return H2Response(200, json.dumps({"kind": "DataKeyList", "items": items}).encode())
        if suffix == "/key":
            return await self._key(request, path, name)
        return await self._data(request, path)

    async def _key(self, request: H2Request, path: str, name: str | None) -> H2Response:
        agent = self._agent
        if not name:
            return problem(400, "query parameter name is required")
        obj = agent.cluster.read_object(agent.nodename, path)
        assert obj is not None
        method = request.method
        if method == "GET":
            value = obj.keys.get(name)
            if value is None:
                return problem(404, f"key {name} of {path} not found")
            return H2Response(200, value, content_type="application/octet-stream")
        if method in ("POST", "PUT"):
            if len(request.body) > agent.cluster.max_key_size:
                return self.too_large()
            if method == "POST" and name in obj.keys:
                return problem(409, f"key {name} of {path} already exists")
            if method == "PUT" and name not in obj.keys:
                return problem(404, f"key {name} of {path} not found")
            keys = dict(obj.keys)
            keys[name] = request.body
            await agent.cluster.commit(agent.nodename, path, keys)
            return _no_content()
        if method == "DELETE":
            if name in obj.keys:
                keys = dict(obj.keys)
                del keys[name]
                await agent.cluster.commit(agent.nodename, path, keys)
            return _no_content()
        return problem(405, f"{method} not allowed on {request.path}")

    async def _data(self, request: H2Request, path: str) -> H2Response:
        agent = self._agent
        obj = agent.cluster.read_object(agent.nodename, path)
        assert obj is not None
        if request.method == "GET":
            names = [value for key, value in request.query if key == "name"] or list(obj.keys)
            items = [
                {"name": n, "bytes": base64.b64encode(obj.keys[n]).decode("ascii")} for n in names if n in obj.keys
            ]
            return H2Response(200, json.dumps(items).encode())
        if request.method != "PATCH":
            return problem(405, f"{request.method} not allowed on {request.path}")
        try:
            operations = json.loads(request.body.decode("utf-8"))
        except (ValueError, RecursionError):
            return problem(400, "request body is not JSON")
        if not isinstance(operations, list):
            return problem(400, "request body must be a list of operations")
        keys = dict(obj.keys)
        for index, operation in enumerate(operations):
            error = _apply_patch(keys, operation, agent.cluster.max_key_size)
            if error is not None:
                status, detail = error
                return problem(status, f"operation {index}: {detail}")
        await agent.cluster.commit(agent.nodename, path, keys)
        return _no_content()

    # --- events --------------------------------------------------------------------------------

    def _events(self, request: H2Request, nodename: str) -> H2Response | H2EventStream:
        agent = self._agent
        agent.log_request("om3", "GET event", None, None)
        if request.method != "GET":
            return problem(405, f"{request.method} not allowed on {request.path}")
        target = agent if nodename in (agent.nodename, "localhost") else agent.cluster.started_agent(nodename)
        if target is None:
            return problem(404, f"node {nodename} not found")
        filters = [_parse_filter(value) for key, value in request.query if key == "filter"]
        return H2EventStream(200, "text/event-stream", _om3_sse(target, filters))


def _apply_patch(keys: dict[str, bytes], operation: Any, max_size: int) -> tuple[int, str] | None:
    if not isinstance(operation, dict):
        return 400, "not an object"
    action, name = operation.get("action"), operation.get("name")
    if not isinstance(name, str) or not name:
        return 400, "name is required"
    value: bytes | None = None
    if isinstance(operation.get("bytes"), str):
        try:
            value = base64.b64decode(operation["bytes"], validate=True)
        except (binascii.Error, ValueError):
            return 400, "bytes is not base64"
    elif isinstance(operation.get("string"), str):
        value = operation["string"].encode("utf-8", errors="surrogateescape")
    if value is not None and len(value) > max_size:
        return 413, "Body too large"
    if action == "add":
        if name in keys:
            return 409, f"key {name} already exists"
        keys[name] = value or b""
    elif action == "change":
        keys[name] = value or b""
    elif action == "remove":
        keys.pop(name, None)
    elif action == "rename":
        to = operation.get("to")
        if not isinstance(to, str) or not to or name not in keys:
            return 400, "rename needs an existing name and a new 'to'"
        keys[to] = keys.pop(name)
    else:
        return 400, f"unknown action {action!r}"
    return None


def _parse_filter(text: str) -> tuple[str, dict[str, str]]:
    kind, _, rest = text.partition(",")
    labels: dict[str, str] = {}
    for part in rest.split(","):
        label, sep, value = part.partition("=")
        if sep:
            labels[label.strip()] = value.strip()
    return kind.strip(), labels


def _om3_events(event: BusEvent, conf_file: str) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    labels = {"path": event.path, "node": event.node}
    return [
        ("ConfigFileUpdated", labels, {"path": event.path, "file": conf_file, "node": event.node}),
        (
            "InstanceConfigUpdated",
            labels,
            {
                "path": event.path,
                "node": event.node,
                "instance_config": {"csum": event.csum, "updated_at": _iso(event.updated)},
            },
        ),
    ]


async def _om3_sse(agent: FakeAgent, filters: list[tuple[str, dict[str, str]]]) -> AsyncIterator[bytes]:
    queue = agent.subscribe()
    number = 0
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            parsed = parse_path(item.path)
            conf_file = parsed.conf_file if parsed is not None else item.path
            for kind, labels, data in _om3_events(item, conf_file):
                if filters and not any(
                    kind == want and all(labels.get(k) == v for k, v in want_labels.items())
                    for want, want_labels in filters
                ):
                    continue
                number += 1
                message = {"kind": kind, "id": number, "at": _iso(item.updated), "data": {**data, "labels": labels}}
                yield f"id: {number}\nevent: {kind}\ndata: {json.dumps(message)}\n\n".encode()
    finally:
        agent.unsubscribe(queue)
