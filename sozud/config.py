"""sozud's configuration: every setting, its default, its unit, its validation.

Sources, lowest precedence first: built-in defaults, the TOML file (``/etc/sozud/sozud.toml`` or
``--config FILE``), environment variables ``SOZUD_<KEY>`` (e.g. ``SOZUD_POLL_INTERVAL_S=5``), then
command-line flags (``--poll-interval-s 5``). TOML keys, environment names and flags are the same words:
``poll_interval_s`` / ``SOZUD_POLL_INTERVAL_S`` / ``--poll-interval-s``. Errors name the key and where
the bad value came from.
"""

from __future__ import annotations

import math
import os
import re
import socket
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from sozud._om.base import OMSettings
from sozud.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/sozud/sozud.toml"
# The OpenSVC client's defaults are its own (sozud.om_api.OMSettings): defined once, there.
_OM = OMSettings()
ENV_PREFIX = "SOZUD_"


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """All settings. Field docs are the reference (README "Configuration" mirrors them)."""

    # --- sozu
    socket: str = "/run/sozu/sozu.sock"
    sozu_version: str = "auto"
    request_timeout_s: float = 10.0
    shared_dir: str | None = None
    shared_dir_sozu_path: str | None = None

    # --- OpenSVC
    api: str | None = None
    object: str = "igw/cfg/sozu"
    key: str = "state.json"
    meta_key: str = ""
    cluster_name: str | None = None
    secret_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    token_file: str | None = None
    opensvc_poll_interval_s: float = _OM.poll_interval_s
    projected_file: str | None = None
    allow_private_keys_in_cfg: bool = False
    layout: Literal["sharded", "plain"] = "plain"
    boot_state_file: str | None = None
    run_dir: str = _OM.run_dir
    cluster_conf_file: str = _OM.cluster_conf_file
    events_max_idle_s: float = _OM.events_max_idle_s
    retry_attempts: int = _OM.retry_attempts
    reconnect_max_s: float = _OM.reconnect_max_s

    # --- sync
    node: str = ""
    state_dir: str = "/var/lib/sozud"
    poll_interval_s: float = 5.0
    resync_interval_s: float = 300.0
    debounce_ms: int = 300
    max_wait_ms: int = 5000
    max_removal_ratio: float = 0.5
    force: bool = False
    max_rounds: int = 3
    retry_max_s: float = 60.0

    # --- observability
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    metrics_address: str | None = None
    metrics_textfile: str | None = None

    def __post_init__(self) -> None:
        if not self.node:
            self.node = socket.gethostname()
        if not self.meta_key:
            self.meta_key = f"{self.key}.meta"
        for name, (low, high) in RANGES.items():
            value = getattr(self, name)
            _check(
                math.isfinite(value) and low <= value <= high,
                name,
                f"{value!r} is outside the accepted range {low:g} to {high:g}",
            )
        _check(0.0 <= self.max_removal_ratio <= 1.0, "max_removal_ratio", "must be between 0 and 1")
        _check(self.max_wait_ms >= self.debounce_ms, "max_wait_ms", "must be >= debounce_ms")
        for name in ("key", "meta_key"):
            value = getattr(self, name)
            _check(
                bool(_KEY_NAME.fullmatch(value)),
                name,
                f"{value!r} is not a key name (1 to 255 letters, digits, '.', '_', '-', '/'; not starting with '.')",
            )
        _check(self.meta_key != self.key, "meta_key", "must differ from key")
        parts = self.object.split("/")
        _check(
            len(parts) == 3 and parts[1] in ("cfg", "sec") and all(_NAME.fullmatch(p) for p in (parts[0], parts[2])),
            "object",
            f"{self.object!r} is not a NAMESPACE/cfg/NAME or NAMESPACE/sec/NAME path",
        )
        if self.metrics_address is not None:
            host, sep, port = self.metrics_address.rpartition(":")
            _check(
                bool(sep and host and port.isdigit() and 0 <= int(port) <= 65535),
                "metrics_address",
                f"{self.metrics_address!r} is not HOST:PORT with a port from 0 to 65535",
            )


# Accepted ranges of the numeric settings: finite, and neither so small that a loop spins nor so large
# that a wait never ends (a request timeout of inf made --once hang and run ignore SIGTERM).
RANGES: dict[str, tuple[float, float]] = {
    "request_timeout_s": (0.1, 3600.0),
    "poll_interval_s": (0.01, 86400.0),
    "opensvc_poll_interval_s": (0.01, 86400.0),
    "resync_interval_s": (1.0, 7 * 86400.0),
    "retry_max_s": (0.01, 86400.0),
    "debounce_ms": (0, 600_000),
    "max_wait_ms": (0, 3_600_000),
    "max_rounds": (1, 100),
    "events_max_idle_s": (1.0, 7 * 86400.0),
    "retry_attempts": (1, 100),
    "reconnect_max_s": (0.01, 86400.0),
}
_KEY_NAME = re.compile(r"[A-Za-z0-9_\-/][A-Za-z0-9._\-/]{0,254}")
_NAME = re.compile(r"[a-z0-9]([a-z0-9.\-]{0,61}[a-z0-9])?")
MAX_CONFIG_BYTES = 1024 * 1024  # a sozud.toml is a few hundred bytes


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"configuration key {key!r}: {reason}", key=key)


# One line of help per setting: --help, the README reference and tests read it from here.
FIELD_HELP: dict[str, str] = {
    "socket": "sozu's command socket (``command_socket`` in sozu's config).",
    "sozu_version": "``auto`` (detect on connect), or the version of the local sozu: ``0.15``, ``1.1.1``, ``2.1.0``...",
    "request_timeout_s": "Time allowed for each sozu request's final answer (sozu sends none for some requests).",
    "shared_dir": "A directory shared with sozu's main process (e.g. ``/run/sozu``): enables one-request live reads (SaveState) and batch application of large plans (LoadState).",
    "shared_dir_sozu_path": "The same directory as sozu's main process sees it, when it differs (container mount).",
    "api": "OpenSVC agent URL (``unix://``, ``raw://``, ``h2+unix://``, ``https://``, ``om3+unix://``, ``om3+https://``); unset = the local agent's sockets, whichever exist.",
    "object": "The config map (``cfg``) or secret (``sec``) object holding the shared state.",
    "key": "The key holding the shared sozu state file.",
    "meta_key": "The key holding sozud's metadata (generation, origin, parent hash); default ``<key>.meta``.",
    "cluster_name": "Cluster name for ``raw://`` (default: from the local agent's configuration).",
    "secret_file": "File holding the cluster secret for ``raw://`` and ``https://`` (o-secret).",
    "opensvc_poll_interval_s": "How often the shared key is read when no change notification arrives.",
    "projected_file": "The file the agent projects the key into (optional extra change trigger; never read as data).",
    "allow_private_keys_in_cfg": "Whether a state holding TLS private keys may be written into a guest-readable ``cfg`` object (default: refused; use a ``sec`` object).",
    "layout": "How the shared state is stored: ``plain`` (one state-file key) or ``sharded`` (compressed shards and a manifest, written per change; EXPERIMENTAL, see README).",
    "boot_state_file": "A plain sozu state file kept equal to what sozu runs once in sync, for sozu's ``saved_state`` (e.g. ``/run/sozu/state.json``): a restarted sozu boots with the routes.",
    "run_dir": "Where the local agent's sockets are (``lsnr.sock``, ``h2.sock``, ``http.sock``), used when ``api`` is unset.",
    "cluster_conf_file": "The agent's cluster configuration, read for the cluster name and secret that ``cluster_name``/``secret_file`` leave unset.",
    "events_max_idle_s": "An agent event stream that brought nothing about the key for this long is reopened (also a slow periodic re-read).",
    "retry_attempts": "Tries of a failing read or write of a key while the agent is unreachable.",
    "reconnect_max_s": "Cap of the backoff between reconnections to the agent's event stream (and between poll retries).",
    "node": "This node's name (default: the host name).",
    "state_dir": "Where sozud persists its base state and status.",
    "poll_interval_s": "How often the live sozu is probed for local changes (sozu >= 1.0 never rewrites its state file).",
    "resync_interval_s": "A full sync at least this often, whatever the triggers said.",
    "debounce_ms": "Quiet time after a trigger before syncing (bursts coalesce).",
    "max_wait_ms": "Upper bound on the debounce: a sync starts at most this long after the first trigger.",
    "max_removal_ratio": "A plan removing more than this share of the live (or shared) objects is refused unless forced.",
    "force": "Apply/push plans that the removal safety valve refuses.",
    "max_rounds": "Apply rounds (apply, re-read, re-plan) before giving up on convergence.",
    "retry_max_s": "Cap of the backoff between failed syncs.",
    "metrics_address": "``HOST:PORT`` to serve Prometheus metrics on (keep it on loopback).",
    "metrics_textfile": "A file to write Prometheus metrics to after each sync (node_exporter textfile collector).",
    "ca_file": "CA bundle to verify the agent on https:// and om3+https://.",
    "cert_file": "Client certificate (PEM) for https:// (x509 authentication).",
    "key_file": "Private key of cert_file.",
    "username": "om3+https:// basic authentication user.",
    "password_file": "File holding the om3+https:// basic authentication password.",
    "token_file": "File holding an om3+https:// bearer token.",
    "log_level": "debug, info, warning or error.",
    "log_format": "auto (JSON unless stderr is a terminal), json or console.",
}

FIELDS: tuple[str, ...] = Config.__struct_fields__


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """``SOZUD_*`` variables as raw strings (converted by msgspec with ``strict=False``)."""
    out: dict[str, Any] = {}
    for name in FIELDS:
        env = ENV_PREFIX + name.upper()
        if env in environ:
            out[name] = environ[env]
    return out


def load_config(
    path: str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Defaults < TOML file < environment < ``overrides`` (the command-line flags that were given).

    ``path=None`` reads ``/etc/sozud/sozud.toml`` when it exists; an explicit path must exist.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    file_path = path or environ.get(ENV_PREFIX + "CONFIG") or None
    if file_path is None and Path(DEFAULT_CONFIG_PATH).exists():
        file_path = DEFAULT_CONFIG_PATH
    if file_path is not None:
        data = _read_toml(file_path)
        for k, v in data.items():
            if k not in FIELDS:
                raise ConfigError(f"configuration file {file_path}: unknown key {k!r}")
            merged[k] = v
            origin[k] = f"configuration file {file_path}"
    for k, v in _env_values(environ).items():
        merged[k] = v
        origin[k] = f"environment variable {ENV_PREFIX}{k.upper()}"
    for k, v in (overrides or {}).items():
        if k not in FIELDS:
            raise ConfigError(f"unknown setting {k!r}")
        merged[k] = v
        origin[k] = f"flag --{k.replace('_', '-')}"
    # strict=False: environment values are strings ("5", "true") and convert to the field's type.
    try:
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as e:
        key = _key_from_msgspec(str(e))
        where = f" (from {origin[key]})" if key in origin else ""
        raise ConfigError(f"configuration key {key!r}{where}: {e}", key=key) from None
    except ConfigError as e:
        if e.key is not None and e.key in origin:
            raise ConfigError(f"{e} (from {origin[e.key]})", key=e.key) from None
        raise


def _read_toml(file_path: str) -> dict[str, Any]:
    """The TOML file's table; only a regular file of at most MAX_CONFIG_BYTES, in UTF-8."""
    try:
        with open(file_path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"configuration file {file_path} is not a regular file")
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {file_path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"configuration file {file_path}: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"configuration file {file_path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"configuration file {file_path}: not UTF-8 (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"configuration file {file_path}: {e}") from None
    except RecursionError:
        raise ConfigError(f"configuration file {file_path}: nested too deeply") from None


def unknown_env_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """``SOZUD_*`` variables that name no setting (a misspelling is otherwise silently ignored)."""
    environ = os.environ if environ is None else environ
    known = {ENV_PREFIX + name.upper() for name in FIELDS} | {ENV_PREFIX + "CONFIG"}
    return sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)


def _key_from_msgspec(message: str) -> str:
    # msgspec: "Expected `float`, got `str` - at `$.poll_interval_s`"
    marker = "at `$."
    if marker in message:
        return message.split(marker, 1)[1].split("`", 1)[0].split(".", 1)[0].split("[", 1)[0]
    return "?"


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")
