"""om3 (OpenSVC v3) REST API: ``om3+unix://<http.sock>`` and ``om3+https://HOST:1215`` (opensvc-api.md §7).

Values are raw bytes (no JSON string, no UTF-8 rule). Replace is ``PUT`` (404 when the key is absent),
create is ``POST`` (409 when present). Errors are problem objects with real HTTP statuses; a value over
the agent's ``node.max_key_size`` answers 413.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import msgspec

from sozud._om.base import Transport, describe, request_deadline_s, split_path
from sozud._om.http import ReusedClient, TransportFactory, unreachable_on_transport_errors
from sozud._om.sse import json_events
from sozud.errors import (
    OpenSVCAuthError,
    OpenSVCNotFoundError,
    OpenSVCRefusedError,
    OpenSVCTooLargeError,
    OpenSVCUnreachableError,
)

EVENT_KIND = "InstanceConfigUpdated"


def _problem(response: httpx.Response) -> str:
    try:
        body = msgspec.json.decode(response.content)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return describe(response.text)
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("title", "detail") if body.get(k)]
        if parts:
            return describe(": ".join(parts))
    return describe(body)


def _event_path(payload: Any) -> str | None:
    """The object path an om3 event is about, wherever this version puts it."""
    if not isinstance(payload, dict):
        return None
    for holder in (payload, payload.get("data"), payload.get("labels")):
        if isinstance(holder, dict):
            path = holder.get("path")
            if isinstance(path, str):
                return path
            labels = holder.get("labels")
            if isinstance(labels, dict) and isinstance(labels.get("path"), str):
                return str(labels["path"])
    return None


class Om3Transport(Transport):
    """The om3 daemon API; ``make_transport`` opens HTTP/2 connections (unix socket or TLS)."""

    has_events = True

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        make_transport: TransportFactory,
        headers: dict[str, str] | None = None,
        auth: httpx.Auth | None = None,
        nodename: str = "localhost",
        timeout_s: float = 10.0,
    ) -> None:
        self.name = name
        self.base_url = base_url
        self.nodename = nodename
        self.timeout_s = timeout_s
        self._make_transport = make_transport
        self._headers = dict(headers or {})
        self._auth = auth
        # every om3 request we send is idempotent (POST answers 409 if it did land): all share one
        # connection, once more on a new one if it had died (agent restarted)
        self._client = ReusedClient(lambda: self._new_client(read_timeout_s=self.timeout_s))

    def __repr__(self) -> str:  # headers/auth may hold a token or password
        return f"Om3Transport({self.name!r})"

    def _new_client(self, *, read_timeout_s: float | None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=self._make_transport(),
            base_url=self.base_url,
            headers=self._headers,
            auth=self._auth,
            timeout=httpx.Timeout(self.timeout_s, read=read_timeout_s),
        )

    def _object_url(self, obj: str) -> str:
        ns, kind, name = split_path(obj, transport=self.name)
        return f"/api/object/path/{quote(ns, safe='')}/{quote(kind, safe='')}/{quote(name, safe='')}"

    async def _request(
        self, method: str, url: str, *, obj: str, key: str | None, params: Any = None, content: bytes | None = None
    ) -> httpx.Response:
        headers = {"content-type": "application/octet-stream"} if content is not None else None
        with unreachable_on_transport_errors(self.name, obj, key):
            return await self._client.request(
                method, url, params=params, content=content, headers=headers, timeout=request_deadline_s(self.timeout_s)
            )

    def _raise_for(self, response: httpx.Response, *, obj: str, key: str | None) -> None:
        status = response.status_code
        if status < 300:
            return
        detail = _problem(response)
        if status in (401, 403):
            raise OpenSVCAuthError(
                f"agent refused our credentials (HTTP {status}): {detail}", transport=self.name, obj=obj, key=key
            )
        if status == 404:
            raise OpenSVCNotFoundError(f"not found (HTTP 404): {detail}", transport=self.name, obj=obj, key=key)
        if status == 413:
            raise OpenSVCTooLargeError(
                f"value larger than the agent's node.max_key_size (HTTP 413, default 1mb): {detail}",
                transport=self.name,
                obj=obj,
                key=key,
            )
        if status in (502, 503, 504):
            raise OpenSVCUnreachableError(
                f"agent unavailable (HTTP {status}): {detail}", transport=self.name, obj=obj, key=key
            )
        raise OpenSVCRefusedError(f"agent answered HTTP {status}: {detail}", transport=self.name, obj=obj, key=key)

    async def get_key(self, obj: str, key: str) -> bytes | None:
        url = self._object_url(obj) + "/data/key"
        response = await self._request("GET", url, params={"name": key}, obj=obj, key=key)
        if response.status_code == 404:
            # Absent key or absent object: the object's key list tells which.
            await self.list_keys(obj)
            return None
        self._raise_for(response, obj=obj, key=key)
        return response.content

    async def put_key(self, obj: str, key: str, value: bytes) -> None:
        url = self._object_url(obj) + "/data/key"
        params = {"name": key}
        response = await self._request("PUT", url, params=params, content=value, obj=obj, key=key)
        if response.status_code == 404:  # no such key yet: create it
            response = await self._request("POST", url, params=params, content=value, obj=obj, key=key)
            if response.status_code == 409:  # created meanwhile by someone else: replace it
                response = await self._request("PUT", url, params=params, content=value, obj=obj, key=key)
        self._raise_for(response, obj=obj, key=key)

    async def list_keys(self, obj: str) -> list[str]:
        response = await self._request("GET", self._object_url(obj) + "/data/keys", obj=obj, key=None)
        self._raise_for(response, obj=obj, key=None)
        try:
            body = msgspec.json.decode(response.content)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            body = None
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise OpenSVCRefusedError(
                f"key list reply has no items: {describe(response.text)}", transport=self.name, obj=obj
            )
        names: list[str] = []
        for item in items:  # one item per node holding the object: keep each name once, in order
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str):
                raise OpenSVCRefusedError(
                    f"key list item without a name: {describe(item)}", transport=self.name, obj=obj
                )
            if name not in names:
                names.append(name)
        return names

    async def events(self, obj: str, key: str) -> AsyncIterator[None]:
        split_path(obj, transport=self.name)
        client = self._new_client(read_timeout_s=None)
        url = f"/api/node/name/{quote(self.nodename, safe='')}/daemon/event"
        try:
            with unreachable_on_transport_errors(self.name, obj, key):
                async with client.stream(
                    "GET", url, params={"filter": f"{EVENT_KIND},path={obj}"}, headers={"accept": "text/event-stream"}
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        self._raise_for(response, obj=obj, key=key)
                        raise OpenSVCRefusedError(
                            f"event stream answered HTTP {response.status_code}", transport=self.name, obj=obj
                        )
                    yield None  # subscribed
                    async for event, payload in json_events(response, transport=self.name, obj=obj):
                        kind = payload.get("kind") if isinstance(payload, dict) else None
                        if EVENT_KIND not in (event.event, kind):
                            continue
                        path = _event_path(payload)
                        if path is None or path == obj:  # the server filtered on the path already
                            yield None
            raise OpenSVCUnreachableError("event stream ended", transport=self.name, obj=obj)
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()
