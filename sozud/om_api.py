"""OpenSVC agent API client: read and write a config-map key, and watch it for changes.

    client = client_from_url("unix:///var/lib/opensvc/lsnr/lsnr.sock", OMSettings())
    value = await client.get_key("igw/cfg/sozu", "state.json")        # bytes, or None if absent
    await client.put_key("igw/cfg/sozu", "state.json", new_value)
    async for _ in client.changes("igw/cfg/sozu", "state.json"):     # "may have changed": read it
        ...

URL forms (``--api``), one transport class each (``sozud/_om/``):

    unix:///var/lib/opensvc/lsnr/lsnr.sock     v2 raw, local, clear          RawUnixTransport
    raw://HOST:1214                            v2 raw, TCP, AES envelope     RawTcpTransport
    h2+unix:///var/lib/opensvc/lsnr/h2.sock    v2 HTTP/2, local              H2Transport
    https://HOST:1215                          v2 HTTP/2 over TLS            H2Transport
    om3+unix:///var/lib/opensvc/lsnr/http.sock om3 REST, local               Om3Transport
    om3+https://HOST:1215                      om3 REST over TLS             Om3Transport

Without a URL, ``client_from_url`` looks for the local agent's sockets in ``settings.run_dir``.

The client adds to the transports: one write at a time per object (the v2 agent loses concurrent
writes), retries of get/list/put with capped jittered backoff while the agent is unreachable, the
value policy (v2 text rule, private keys in ``cfg`` objects), and the change watch
(``sozud/_om/watch.py``). ``sozud/_om/url.py`` turns a URL into its transport.

Errors (``sozud.errors``): OpenSVCUnreachableError, OpenSVCAuthError, OpenSVCNotFoundError,
OpenSVCRefusedError, OpenSVCTooLargeError; every message names transport, object and key.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from sozud._om.base import OMSettings, Transport, read_secret_file, request_deadline
from sozud._om.h2 import H2_WINDOW_BYTES, H2Transport
from sozud._om.memory import MemoryTransport
from sozud._om.om3 import Om3Transport
from sozud._om.raw import RawTcpTransport, RawUnixTransport
from sozud._om.url import transport_from_url
from sozud._om.v2 import parse_resource_status
from sozud._om.watch import ChangeWatch
from sozud.backoff import Backoff
from sozud.errors import OpenSVCError, OpenSVCRefusedError, OpenSVCUnreachableError
from sozud.log import get_logger

__all__ = [
    "H2_WINDOW_BYTES",
    "H2Transport",
    "MemoryTransport",
    "OMClient",
    "OMSettings",
    "Om3Transport",
    "RawTcpTransport",
    "RawUnixTransport",
    "Transport",
    "client_from_url",
    "read_secret_file",
    "transport_from_url",
]

_T = TypeVar("_T")
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


SLOW_REQUEST_S = 1.0  # an agent request at least this long is logged (opensvc.slow_request)
# A request's deadline grows with what it carries (the real v2 agent rewrote a 10.8 MB value in 2.2 s,
# and stayed slow for ~11 s after) and doubles after each timeout, up to MAX_DEADLINE_S: a loaded agent
# delays a sync instead of failing it; an agent that refuses connections still fails fast.
AGENT_MIN_BYTES_PER_S = 1_000_000
MAX_DEADLINE_S = 300.0
# Waits between the attempts of a get/list/put while the agent is unreachable (``retry_attempts`` in all):
# from RETRY_INITIAL_S, doubling up to RETRY_MAX_S, full jitter.
RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 2.0


def _log() -> Any:
    # Looked up at each use: a logger bound at import time would ignore configure_logging() (stderr,
    # redaction) done later by the command line.
    return get_logger()


def _is_cfg(obj: str) -> bool:
    parts = obj.split("/")
    return len(parts) in (2, 3) and parts[-2] == "cfg"


class OMClient:
    """What the rest of sozud uses to talk to the agent.

    ``transport`` serves get/put/list; ``events_transport`` (default: ``transport`` if it has an
    event stream) serves ``changes()``. ``settings`` gives the timing knobs and the value policy.
    """

    def __init__(
        self,
        transport: Transport,
        settings: OMSettings | None = None,
        *,
        events_transport: Transport | None = None,
    ) -> None:
        self.transport = transport
        self.settings = settings or OMSettings()
        if events_transport is None and transport.has_events:
            events_transport = transport
        self.events_transport = events_transport
        self.reconnect_max_s = self.settings.reconnect_max_s
        self._locks: dict[str, asyncio.Lock] = {}
        self._warned_private_keys: set[tuple[str, str]] = set()
        self.latency: dict[str, tuple[int, float]] = {}  # operation -> (answered requests, total seconds)
        self.wakes = 0  # wake_monitor calls the agent accepted
        self.wake_failures = 0  # wake_monitor calls that failed (replication then waits for the loop)

    def __repr__(self) -> str:
        events = self.events_transport.name if self.events_transport else None
        return f"OMClient(transport={self.transport.name!r}, events={events!r})"

    def lock(self, obj: str) -> asyncio.Lock:
        """The lock that keeps writes to ``obj`` one at a time (held by ``put_key``)."""
        return self._locks.setdefault(obj, asyncio.Lock())

    # --- values ---------------------------------------------------------------------------------

    def check_value(self, obj: str, key: str, value: bytes) -> None:
        """Raise the error ``put_key`` would raise before sending anything (policy and size)."""
        if _is_cfg(obj) and _PRIVATE_KEY.search(value):
            if not self.settings.allow_private_keys_in_cfg:
                raise OpenSVCRefusedError(
                    "value contains a PEM private key and cfg objects are readable by guests; "
                    "use a sec object, or allow it with allow_private_keys_in_cfg",
                    transport=self.transport.name,
                    obj=obj,
                    key=key,
                )
            if (obj, key) not in self._warned_private_keys:
                self._warned_private_keys.add((obj, key))
                _log().warning(
                    "opensvc.private_key_in_cfg",
                    obj=obj,
                    key_name=key,
                    hint="cfg objects are readable by guests; store certificates' keys in a sec object",
                )
        self.transport.check_value(obj, key, value)

    async def get_key(self, obj: str, key: str) -> bytes | None:
        """The key's value; None when the object exists without that key."""
        return await self._retrying("get", obj, key, lambda: self.transport.get_key(obj, key))

    def deadline_s(self, attempt: int, payload_bytes: int = 0) -> float:
        """The deadline of a request's ``attempt`` (1, 2, ...) carrying ``payload_bytes``."""
        base = self.settings.request_timeout_s + payload_bytes / AGENT_MIN_BYTES_PER_S
        return min(MAX_DEADLINE_S, base * 2.0 ** (attempt - 1))

    async def put_key(self, obj: str, key: str, value: bytes) -> None:
        """Create or replace the key, one write per object at a time."""
        self.check_value(obj, key, value)
        async with self.lock(obj):
            await self._retrying("put", obj, key, lambda: self.transport.put_key(obj, key, value), len(value))

    async def resource_status(self, path: str, rid: str) -> dict[str, tuple[str, str]]:
        """Per node, the status of resource ``rid`` of ``path`` and its last status-log line, as the agent
        reports it (``om mon`` data); nodes without that instance are left out."""
        data = await self._retrying("daemon_status", path, None, lambda: self.transport.daemon_status(path))
        return parse_resource_status(data, path, rid)

    async def wake_monitor(self, obj: str, reason: str) -> bool:
        """Ask the local agent to replicate ``obj`` now (v2: its monitor loop would take 10-15 s). Never
        raises: a failure is logged and counted (``wake_failures``); replication then waits for the loop."""
        try:
            woken = await self.transport.wake_monitor(obj, reason)
        except OpenSVCError as exc:
            self.wake_failures += 1
            _log().warning(
                "opensvc.wake_failed",
                transport=self.transport.name,
                obj=obj,
                error=str(exc),
                action="replication waits for the agent's next monitor loop",
            )
            return False
        if woken:
            self.wakes += 1
        return woken

    async def list_keys(self, obj: str) -> list[str]:
        """The object's key names, in the agent's order."""
        return await self._retrying("list", obj, None, lambda: self.transport.list_keys(obj))

    def _observe(self, operation: str, obj: str, key: str | None, seconds: float) -> None:
        """Agent latency per operation (count, total seconds), and a log line when the agent is slow."""
        count, total = self.latency.get(operation, (0, 0.0))
        self.latency[operation] = (count + 1, total + seconds)
        if seconds >= SLOW_REQUEST_S:
            _log().info(
                "opensvc.slow_request",
                operation=operation,
                obj=obj,
                key_name=key,
                duration_ms=round(seconds * 1000, 1),
                transport=self.transport.name,
            )

    async def _retrying(
        self,
        operation: str,
        obj: str,
        key: str | None,
        call: Callable[[], Awaitable[_T]],
        payload_bytes: int = 0,
    ) -> _T:
        """Run ``call``, again after a backoff delay while the agent is unreachable (``retry_attempts``),
        each attempt with its deadline (:meth:`deadline_s`)."""
        backoff = Backoff(initial_s=RETRY_INITIAL_S, max_s=RETRY_MAX_S)
        attempts = max(1, self.settings.retry_attempts)
        for attempt in range(1, attempts + 1):
            started = time.monotonic()
            try:
                with request_deadline(self.deadline_s(attempt, payload_bytes)):
                    result = await call()
                self._observe(operation, obj, key, time.monotonic() - started)
                return result
            except OpenSVCUnreachableError as exc:
                if attempt == attempts:
                    raise
                delay_s = backoff.next_delay_s()
                _log().info(
                    "opensvc.retry",
                    operation=operation,
                    transport=self.transport.name,
                    obj=obj,
                    key_name=key,
                    attempt=attempt,
                    delay_s=round(delay_s, 3),
                    next_deadline_s=round(self.deadline_s(attempt + 1, payload_bytes), 1),
                    error=str(exc),
                )
                await asyncio.sleep(delay_s)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- change watch ---------------------------------------------------------------------------

    def changes(self, obj: str, key: str) -> AsyncGenerator[None, None]:
        """Yield each time ``obj``/``key`` may have changed; never ends by itself.

        The first yield comes once the watch is in place (read the key then, so no change is missed
        between reading and subscribing), and one more after every reconnection. Sources: the event
        stream of ``events_transport`` (reconnected with capped, jittered backoff), or else a read of
        the key every ``settings.poll_interval_s`` (yielding when the value differs); plus, when
        ``settings.projected_file`` is set, every change of that file. An async generator: close it
        with ``aclose()`` to stop the watch.
        """
        projected = os.path.abspath(self.settings.projected_file) if self.settings.projected_file else None
        return ChangeWatch(self.transport, self.events_transport, self.settings, self.reconnect_max_s).run(
            obj, key, projected
        )

    async def aclose(self) -> None:
        """Close the transports' connections."""
        await self.transport.aclose()
        if self.events_transport is not None and self.events_transport is not self.transport:
            await self.events_transport.aclose()

    async def __aenter__(self) -> OMClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# --- construction from a URL ---------------------------------------------------------------------


def client_from_url(api_url: str | None, settings: OMSettings) -> OMClient:
    """An ``OMClient`` for ``api_url``, or for the local agent's sockets when it is None.

    Local choice, in ``settings.run_dir``: ``lsnr.sock`` (v2 raw) for reads and writes, with
    ``h2.sock`` for the event stream when it exists too; else ``h2.sock`` alone; else om3's
    ``http.sock``. Raises OpenSVCUnreachableError when none exists (the agent is not running).
    """
    if api_url:
        return OMClient(transport_from_url(api_url, settings), settings)
    run_dir = Path(settings.run_dir)
    lsnr, h2, om3 = run_dir / "lsnr.sock", run_dir / "h2.sock", run_dir / "http.sock"
    main_url: str
    events_url: str | None = None
    if os.path.exists(lsnr):
        main_url = f"unix://{lsnr}"
        if os.path.exists(h2):
            events_url = f"h2+unix://{h2}"
    elif os.path.exists(h2):
        main_url = f"h2+unix://{h2}"
    elif os.path.exists(om3):
        main_url = f"om3+unix://{om3}"
    else:
        raise OpenSVCUnreachableError(
            f"no agent socket in {run_dir} (looked for lsnr.sock, h2.sock, http.sock); "
            "is the OpenSVC agent running? (or pass an API URL)",
            transport="local",
        )
    _log().info("opensvc.transport_selected", transport=main_url, events=events_url or main_url)
    transport = transport_from_url(main_url, settings)
    events = transport_from_url(events_url, settings) if events_url else None
    return OMClient(transport, settings, events_transport=events)
