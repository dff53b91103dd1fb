"""v2 over HTTP/2: ``h2+unix://<h2.sock>`` (prior knowledge) and ``https://HOST:1215`` (TLS, ALPN h2).

The agent never re-opens its HTTP/2 receive window (opensvc-api.md §1.3): a connection carries at most
65,535 bytes of request bodies in its whole life, and a request that crosses the limit is never
answered. So reads (no body) share one connection, every write opens a fresh one, and a write whose
body would not fit is refused before anything is sent. Large values go over the raw transports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final

import httpx
import msgspec

from sozud._om.base import describe, request_deadline_s
from sozud._om.http import ReusedClient, TransportFactory, unreachable_on_transport_errors
from sozud._om.sse import json_events
from sozud._om.v2 import CONNECTED, V2Transport, check_text_value
from sozud.errors import OpenSVCAuthError, OpenSVCRefusedError, OpenSVCTooLargeError, OpenSVCUnreachableError

# The agent's initial (and only) HTTP/2 receive window, per connection.
H2_WINDOW_BYTES: Final = 65_535

_json_encoder = msgspec.json.Encoder()


def post_body(obj: str, key: str, text: str) -> bytes:
    """The exact JSON body of a key write."""
    return _json_encoder.encode({"path": obj, "key": key, "data": text})


class H2Transport(V2Transport):
    """The v2 agent's HTTP/2 API; ``make_transport`` opens connections (unix socket or TLS)."""

    has_events = True

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        make_transport: TransportFactory,
        headers: dict[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.name = name
        self.base_url = base_url
        self._make_transport = make_transport
        self._headers = dict(headers or {})
        self.timeout_s = timeout_s
        # reads (no body) share one connection, once more on a new one if it had died (agent restarted)
        self._reads = ReusedClient(lambda: self._client(read_timeout_s=self.timeout_s))

    def __repr__(self) -> str:  # headers may hold o-secret
        return f"H2Transport({self.name!r})"

    def _client(self, *, read_timeout_s: float | None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=self._make_transport(),
            base_url=self.base_url,
            headers=self._headers,
            timeout=httpx.Timeout(self.timeout_s, read=read_timeout_s),
        )

    def check_value(self, obj: str, key: str, value: bytes) -> None:
        text = check_text_value(value, transport=self.name, obj=obj, key=key)
        size = len(post_body(obj, key, text))
        if size > H2_WINDOW_BYTES:
            raise OpenSVCTooLargeError(
                f"value needs a {size}-byte request body; the v2 agent's HTTP/2 listeners accept at most "
                f"{H2_WINDOW_BYTES} bytes per connection: write it over a raw transport instead "
                "(unix:///var/lib/opensvc/lsnr/lsnr.sock locally, or raw://HOST:1214)",
                transport=self.name,
                obj=obj,
                key=key,
            )

    async def put_key(self, obj: str, key: str, value: bytes) -> None:
        self.check_value(obj, key, value)
        await super().put_key(obj, key, value)

    async def call(self, action: str, method: str, options: dict[str, Any], *, obj: str, key: str | None) -> Any:
        with unreachable_on_transport_errors(self.name, obj, key):
            if method == "GET":
                response = await self._reads.request(
                    "GET", f"/{action}", params=options, timeout=request_deadline_s(self.timeout_s)
                )
            else:
                body = _json_encoder.encode(options)
                if len(body) > H2_WINDOW_BYTES:  # never send what the agent would leave unanswered
                    raise OpenSVCTooLargeError(
                        f"request body of {len(body)} bytes exceeds the HTTP/2 window ({H2_WINDOW_BYTES})",
                        transport=self.name,
                        obj=obj,
                        key=key,
                    )
                # A fresh connection for every write: each one starts with a full receive window.
                async with self._client(read_timeout_s=self.timeout_s) as client:
                    response = await client.request(
                        method,
                        f"/{action}",
                        content=body,
                        headers={"content-type": "application/json"},
                        timeout=request_deadline_s(self.timeout_s),
                    )
        return self._reply(response, obj=obj, key=key)

    def _reply(self, response: httpx.Response, *, obj: str, key: str | None) -> Any:
        try:
            reply = msgspec.json.decode(response.content)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            reply = None
        if response.status_code in (401, 403):
            error = reply.get("error") if isinstance(reply, dict) else response.text
            raise OpenSVCAuthError(
                f"agent refused our credentials (HTTP {response.status_code}): {describe(error)}",
                transport=self.name,
                obj=obj,
                key=key,
            )
        if not isinstance(reply, dict):
            raise OpenSVCRefusedError(
                f"HTTP {response.status_code} with a body that is not a JSON object: {describe(response.text)}",
                transport=self.name,
                obj=obj,
                key=key,
            )
        if response.status_code != 200 and reply.get("status") == 0:
            reply = {**reply, "status": response.status_code}
        return reply

    async def event_source(self, obj: str) -> AsyncIterator[Any]:
        client = self._client(read_timeout_s=None)
        try:
            with unreachable_on_transport_errors(self.name, obj, None):
                async with client.stream("GET", "/events", headers={"accept": "text/event-stream"}) as response:
                    if response.status_code != 200:
                        await response.aread()
                        yield self._reply(response, obj=obj, key=None)
                        raise OpenSVCRefusedError(
                            f"event stream refused (HTTP {response.status_code})", transport=self.name, obj=obj
                        )
                    yield CONNECTED
                    async for _event, payload in json_events(response, transport=self.name, obj=obj):
                        if payload is not None:  # not JSON: not an event we understand; the stream goes on
                            yield payload
            raise OpenSVCUnreachableError("event stream ended", transport=self.name, obj=obj)
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        await self._reads.aclose()
