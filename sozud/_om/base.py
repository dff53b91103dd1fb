"""The transport interface of the OpenSVC client, its settings, and helpers shared by the transports.

A transport knows one wire protocol (v2 raw, v2 HTTP/2, om3 REST, in-memory) and does one request per
call: no retries, no locking, no value policy. ``OMClient`` (``sozud/om_api.py``) does the rest.
"""

from __future__ import annotations

import configparser
import contextlib
import contextvars
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec

from sozud.errors import ConfigError, OpenSVCError, OpenSVCRefusedError
from sozud.redact import redact_text

# Largest reply (or event) accepted from the agent. Values are expected well under 1 MB (opensvc-api.md
# §3.3); this only bounds memory when a peer misbehaves.
MAX_REPLY_BYTES = 256 * 1024 * 1024

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# The deadline of the request being sent, when the client set one (``OMClient`` sizes it to what the
# request carries and lengthens it after a timeout); transports fall back on their own ``timeout_s``.
_DEADLINE_S: contextvars.ContextVar[float | None] = contextvars.ContextVar("sozud_om_deadline_s", default=None)


def request_deadline_s(default_s: float) -> float:
    """How long the request being sent may take: the client's deadline for it, else ``default_s``."""
    deadline = _DEADLINE_S.get()
    return default_s if deadline is None else deadline


@contextlib.contextmanager
def request_deadline(seconds: float) -> Iterator[None]:
    """Requests sent inside this block (in this task) may take ``seconds``."""
    token = _DEADLINE_S.set(seconds)
    try:
        yield
    finally:
        _DEADLINE_S.reset(token)


class OMSettings(msgspec.Struct, kw_only=True):
    """How to reach and authenticate to the OpenSVC agent.

    ``cluster_name``/``secret_file``: for ``raw://`` (AES) and the ``o-secret`` header of ``https://``;
    when unset they are read from ``cluster_conf_file`` (INI section ``[cluster]``, ``name``/``secret``).
    ``ca_file``: CA that signed the agent's TLS certificate. ``cert_file``/``key_file``: client
    certificate (instead of ``o-secret``). ``username``/``password`` or ``token``: om3 basic/bearer auth.
    ``poll_interval_s``: how often ``changes()`` reads the key when the transport has no event stream.
    ``request_timeout_s``: bound on every request. ``retry_attempts``: tries of a failing safe request
    (get, list, put) while the agent is unreachable. ``reconnect_max_s``: cap of the backoff between
    event-stream reconnections (and poll retries). ``events_max_idle_s``: an event stream that
    brought nothing about the key for this long is reopened (a peer that vanished without closing the
    TCP connection is otherwise noticed only by keepalive); reopening is a "may have changed" signal,
    so this is also a slow periodic re-read. ``projected_file``: a file the agent projects the
    key into; its changes are extra "may have changed" signals. ``run_dir``: where the local agent's
    sockets live (``lsnr.sock``, ``h2.sock``, ``http.sock``). ``nodename``: the name sent in raw
    envelopes and used in om3 node routes (default: this host's name for raw, ``localhost`` for om3).
    """

    cluster_name: str | None = None
    secret_file: str | None = None
    cluster_conf_file: str = "/etc/opensvc/cluster.conf"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    token: str | None = None
    nodename: str | None = None
    poll_interval_s: float = 30.0
    request_timeout_s: float = 10.0
    retry_attempts: int = 3
    reconnect_max_s: float = 30.0
    events_max_idle_s: float = 300.0
    projected_file: str | None = None
    allow_private_keys_in_cfg: bool = False
    run_dir: str = "/var/lib/opensvc/lsnr"

    def __repr__(self) -> str:  # never show password or token
        return (
            f"OMSettings(cluster_name={self.cluster_name!r}, secret_file={self.secret_file!r}, "
            f"run_dir={self.run_dir!r}, auth={'set' if (self.password or self.token) else 'none'})"
        )


def cluster_identity(settings: OMSettings, *, need_name: bool = True) -> tuple[str, str]:
    """The cluster name and secret: from ``settings`` first, then from the agent's cluster config.

    With ``need_name=False`` (the ``o-secret`` header needs only the secret) the name is not looked
    up and comes back empty. Raises ``ConfigError`` naming the file and key that is missing; never
    puts the secret (or a line of the config file) in a message.
    """
    name = settings.cluster_name if need_name else (settings.cluster_name or "")
    secret: str | None = None
    if settings.secret_file:
        try:
            secret = Path(settings.secret_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"secret_file {settings.secret_file}: cannot read: {reason}") from None
        if not secret:
            raise ConfigError(f"secret_file {settings.secret_file}: empty")
    if name is None or secret is None:
        path = settings.cluster_conf_file
        conf = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            read = conf.read(path, encoding="utf-8")
        except configparser.Error as exc:
            # The parser's message quotes the offending line, which may be the secret: name the line only.
            lines = [str(n) for n, _ in getattr(exc, "errors", [])] or [str(getattr(exc, "lineno", "?"))]
            raise ConfigError(f"cluster_conf_file {path}: does not parse (line {', '.join(lines)})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"cluster_conf_file {path}: not UTF-8 text") from None
        if not read:
            missing = "cluster_name" if name is None else "secret_file"
            raise ConfigError(f"{missing} not set and {path} cannot be read; set --cluster-name/--secret-file")
        if name is None:
            # The agent lower-cases the name and defaults it to "default".
            name = conf.get("cluster", "name", fallback="default").strip().lower() or "default"
        if secret is None:
            secret = conf.get("cluster", "secret", fallback="").strip()
            if not secret:
                raise ConfigError(f"{path}: [cluster] secret is not set")
    return name, secret


def split_path(obj: str, *, transport: str) -> tuple[str, str, str]:
    """``ns/kind/name`` (or ``kind/name`` in the root namespace) as its three parts."""
    parts = obj.split("/")
    if len(parts) == 2:
        parts = ["root", *parts]
    if len(parts) != 3 or not all(_PART.match(p) for p in parts):
        raise OpenSVCRefusedError(
            "not an object path (expected <namespace>/<kind>/<name>)", transport=transport, obj=obj
        )
    return parts[0], parts[1], parts[2]


def describe(value: object, limit: int = 300) -> str:
    """A short, redacted rendering of something the agent sent, for an error message."""
    text = redact_text(str(value))
    return text if len(text) <= limit else text[:limit] + "..."


class Transport(ABC):
    """One wire protocol to one agent. Every method does at most one request (``put`` of om3: two).

    ``name`` is the URL the transport was made from; it prefixes every error.
    ``carries_text``: values travel as JSON strings (v2), so they must be UTF-8 text.
    ``has_events``: ``events()`` is implemented.
    """

    name: str
    carries_text: bool = False
    has_events: bool = False

    @abstractmethod
    async def get_key(self, obj: str, key: str) -> bytes | None:
        """The value, or None when the object exists but has no such key."""

    @abstractmethod
    async def put_key(self, obj: str, key: str, value: bytes) -> None:
        """Create or replace the key."""

    @abstractmethod
    async def list_keys(self, obj: str) -> list[str]:
        """The object's key names."""

    def check_value(self, obj: str, key: str, value: bytes) -> None:  # noqa: B027 - optional hook
        """Raise (OpenSVCRefusedError, OpenSVCTooLargeError) if ``put_key`` must not send ``value``."""

    def events(self, obj: str, key: str) -> AsyncIterator[None]:
        """Subscribe to the agent's event stream: yield once when the subscription is established,
        then once per event that says ``obj`` may have changed. Ends with an ``OpenSVCError`` (usually
        ``OpenSVCUnreachableError``) when the stream breaks; the caller reconnects."""
        raise OpenSVCError("this transport has no event stream", transport=self.name, obj=obj, key=key)

    async def daemon_status(self, selector: str) -> Any:
        """The agent's cluster status data for the objects ``selector`` names (v2 ``GET daemon_status``)."""
        raise OpenSVCError("this transport cannot read the agent's cluster status", transport=self.name, obj=selector)

    async def wake_monitor(self, obj: str, reason: str) -> bool:
        """Ask the agent to replicate ``obj`` now rather than at its next monitor loop; False when this
        agent needs no such call (om3: its config-file watcher publishes a change at once)."""
        return False

    async def aclose(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections."""


def read_secret_file(path: str | None, setting: str) -> str | None:
    """The content (stripped) of a file holding a password or token; ``None`` when no file is set.

    Errors name the setting and the path, never the content.
    """
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{setting} {path}: cannot read: {reason}") from None
