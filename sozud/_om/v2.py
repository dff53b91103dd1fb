"""What every OpenSVC v2 transport shares: requests as ``action``/``method``/``options``, reply
status mapping (opensvc-api.md §2.1), the text-only value rule (§3.2) and event filtering (§4.3)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncIterator
from typing import Any, Final

from sozud._om.base import Transport, describe
from sozud.errors import (
    OpenSVCAuthError,
    OpenSVCError,
    OpenSVCNotFoundError,
    OpenSVCRefusedError,
)

KEY_MISSING_TEXT: Final = "does not exist or has no value"

# Marker a v2 event source yields once its subscription is established.
CONNECTED: Final = object()


class KeyMissing(OpenSVCNotFoundError):
    """Internal: the object exists but the key does not (GET answered "does not exist or has no value")."""


def check_reply(reply: Any, *, transport: str, obj: str | None, key: str | None) -> Any:
    """The reply's ``data`` when ``status == 0``; otherwise the matching ``OpenSVCError``."""
    if not isinstance(reply, dict):
        raise OpenSVCRefusedError(
            f"unexpected reply (not a JSON object): {describe(reply)}", transport=transport, obj=obj, key=key
        )
    status = reply.get("status")
    if status == 0:
        return reply.get("data")
    error = reply.get("error")
    error_text = error if isinstance(error, str) else ""
    traceback = reply.get("traceback")
    traceback_text = traceback if isinstance(traceback, str) else ""
    if status in (401, 403):
        raise OpenSVCAuthError(
            f"agent refused our credentials (status {status}): {describe(error_text)}",
            transport=transport,
            obj=obj,
            key=key,
        )
    if obj is not None and (f"KeyError: '{obj}'" in traceback_text or error_text == f"'{obj}'"):
        raise OpenSVCNotFoundError("object does not exist", transport=transport, obj=obj, key=key)
    if KEY_MISSING_TEXT in error_text:
        raise KeyMissing("key does not exist", transport=transport, obj=obj, key=key)
    raise OpenSVCRefusedError(
        f"agent answered status {status!r}: {describe(error_text or reply)}",
        transport=transport,
        obj=obj,
        key=key,
    )


def check_text_value(value: bytes, *, transport: str, obj: str, key: str) -> str:
    """The value as text, if the v2 agent stores it unaltered (opensvc-api.md §3.2)."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OpenSVCRefusedError(
            f"value is not valid UTF-8 (byte {exc.start}): the v2 agent carries values as JSON strings "
            "and would lose such bytes",
            transport=transport,
            obj=obj,
            key=key,
        ) from None
    if "\n" not in text:
        raise OpenSVCRefusedError(
            "value contains no newline: the v2 agent would expand it as config references "
            "({name}, $(...)) or corrupt the object on '\\r'; add a trailing newline",
            transport=transport,
            obj=obj,
            key=key,
        )
    return text


def event_concerns(event: Any, obj: str) -> bool:
    """Whether a v2 event says the config of ``obj`` may have changed (opensvc-api.md §4.3)."""
    if not isinstance(event, dict):
        return False
    kind = event.get("kind")
    if kind == "full":
        return True
    if kind == "event":
        data = event.get("data")
        return isinstance(data, dict) and data.get("id") == "service_config_installed" and data.get("path") == obj
    if kind != "patch":
        return False
    entries = event.get("data")
    if not isinstance(entries, list):
        return False
    for entry in entries:
        if not isinstance(entry, list) or not entry or not isinstance(entry[0], list):
            continue
        path = entry[0]
        if "config" not in path or obj not in path:
            continue
        if "updated" in path or "csum" in path:
            return True
        # The whole config entry of the object replaced at once (new object on this node).
        if len(entry) > 1 and isinstance(entry[1], dict) and ("updated" in entry[1] or "csum" in entry[1]):
            return True
    return False


class V2Transport(Transport):
    """Key operations over any v2 transport; subclasses move one request and one reply."""

    carries_text = True

    @abstractmethod
    async def call(self, action: str, method: str, options: dict[str, Any], *, obj: str, key: str | None) -> Any:
        """Send one request and return the decoded reply (a JSON value), not yet status-checked."""

    async def get_key(self, obj: str, key: str) -> bytes | None:
        reply = await self.call("key", "GET", {"path": obj, "key": key}, obj=obj, key=key)
        try:
            data = check_reply(reply, transport=self.name, obj=obj, key=key)
        except KeyMissing:
            return None
        if not isinstance(data, str):
            raise OpenSVCRefusedError(
                f"reply data is not a string: {describe(data)}", transport=self.name, obj=obj, key=key
            )
        return data.encode("utf-8")

    async def put_key(self, obj: str, key: str, value: bytes) -> None:
        text = check_text_value(value, transport=self.name, obj=obj, key=key)
        reply = await self.call("key", "POST", {"path": obj, "key": key, "data": text}, obj=obj, key=key)
        try:
            check_reply(reply, transport=self.name, obj=obj, key=key)
        except KeyMissing as exc:  # not expected on a write: report as a refusal
            raise OpenSVCRefusedError(str(exc), transport=self.name, obj=obj, key=key) from None

    async def list_keys(self, obj: str) -> list[str]:
        reply = await self.call("object_keys", "GET", {"path": obj}, obj=obj, key=None)
        try:
            data = check_reply(reply, transport=self.name, obj=obj, key=None)
        except KeyMissing as exc:
            raise OpenSVCNotFoundError(str(exc), transport=self.name, obj=obj) from None
        if not isinstance(data, list) or not all(isinstance(k, str) for k in data):
            raise OpenSVCRefusedError(
                f"reply data is not a list of key names: {describe(data)}", transport=self.name, obj=obj
            )
        return list(data)

    async def daemon_status(self, selector: str) -> Any:
        reply = await self.call("daemon_status", "GET", {"selector": selector}, obj=selector, key=None)
        if isinstance(reply, dict) and "status" in reply and "monitor" not in reply:
            return check_reply(reply, transport=self.name, obj=selector, key=None)
        return reply

    async def wake_monitor(self, obj: str, reason: str) -> bool:
        """``POST wake_monitor``: the v2 agent replicates an object changed through the API only when its
        monitor thread next loops (10-15 s later); this wakes it at once (opensvc handler
        ``daemon/handlers/wakemonitor/post.py``: options path, reason, immediate; reply ``{"status": 0}``)."""
        options = {"path": obj, "reason": reason, "immediate": True}
        reply = await self.call("wake_monitor", "POST", options, obj=obj, key=None)
        check_reply(reply, transport=self.name, obj=obj, key=None)
        return True

    def check_value(self, obj: str, key: str, value: bytes) -> None:
        check_text_value(value, transport=self.name, obj=obj, key=key)

    def event_source(self, obj: str) -> AsyncIterator[Any]:
        """Yield ``CONNECTED`` once subscribed, then every decoded event; end with an OpenSVCError."""
        raise OpenSVCError("this transport has no event stream", transport=self.name, obj=obj)

    async def events(self, obj: str, key: str) -> AsyncIterator[None]:
        async for event in self.event_source(obj):
            if event is CONNECTED:
                yield None
            elif isinstance(event, dict) and event.get("status") not in (None, 0) and "kind" not in event:
                check_reply(event, transport=self.name, obj=obj, key=key)  # an error instead of events
            elif event_concerns(event, obj):
                yield None


def parse_resource_status(data: Any, path: str, rid: str) -> dict[str, tuple[str, str]]:
    """``monitor.nodes.<node>.services.status.<path>.resources.<rid>`` of v2 daemon status data: (status,
    last log line) per node. Anything else in the reply is ignored; a malformed entry reads as n/a."""
    out: dict[str, tuple[str, str]] = {}
    monitor = data.get("monitor") if isinstance(data, dict) else None
    nodes = monitor.get("nodes") if isinstance(monitor, dict) else None
    if not isinstance(nodes, dict):
        return out
    for node, ndata in nodes.items():
        services = ndata.get("services") if isinstance(ndata, dict) else None
        status = services.get("status") if isinstance(services, dict) else None
        instance = status.get(path) if isinstance(status, dict) else None
        resources = instance.get("resources") if isinstance(instance, dict) else None
        res = resources.get(rid) if isinstance(resources, dict) else None
        if not isinstance(res, dict):
            continue
        state = res.get("status")
        log = res.get("log")
        last = log[-1] if isinstance(log, list) and log else ""
        if isinstance(last, dict):
            last = last.get("message", "")
        out[str(node)] = (state if isinstance(state, str) else "n/a", str(last)[:500])
    return out
