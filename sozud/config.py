"""sozud's configuration: every setting, its default, its unit, its validation.

Sources, lowest precedence first: built-in defaults, the TOML file (``/etc/sozud/sozud.toml`` or
``--config FILE``), environment variables ``SOZUD_<KEY>`` (e.g. ``SOZUD_POLL_INTERVAL_S=5``), then
command-line flags (``--poll-interval-s 5``). TOML keys, environment names and flags are the same words:
``poll_interval_s`` / ``SOZUD_POLL_INTERVAL_S`` / ``--poll-interval-s``. Errors name the key and where
the bad value came from.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from sozud.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/sozud/sozud.toml"
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
    opensvc_poll_interval_s: float = 30.0
    projected_file: str | None = None
    allow_private_keys_in_cfg: bool = True

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
        _check(self.poll_interval_s > 0, "poll_interval_s", "must be > 0")
        _check(self.opensvc_poll_interval_s > 0, "opensvc_poll_interval_s", "must be > 0")
        _check(self.resync_interval_s > 0, "resync_interval_s", "must be > 0")
        _check(self.request_timeout_s > 0, "request_timeout_s", "must be > 0")
        _check(0.0 <= self.max_removal_ratio <= 1.0, "max_removal_ratio", "must be between 0 and 1")
        _check(self.debounce_ms >= 0, "debounce_ms", "must be >= 0")
        _check(self.max_wait_ms >= self.debounce_ms, "max_wait_ms", "must be >= debounce_ms")
        _check(self.max_rounds >= 1, "max_rounds", "must be >= 1")
        _check(self.retry_max_s > 0, "retry_max_s", "must be > 0")
        _check(self.meta_key != self.key, "meta_key", "must differ from key")
        parts = self.object.split("/")
        _check(
            len(parts) == 3 and parts[1] in ("cfg", "sec") and all(parts),
            "object",
            f"{self.object!r} is not a NAMESPACE/cfg/NAME or NAMESPACE/sec/NAME path",
        )
        if self.metrics_address is not None:
            host, sep, port = self.metrics_address.rpartition(":")
            _check(bool(sep and host and port.isdigit()), "metrics_address", "must be HOST:PORT")


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"configuration key {key!r}: {reason}")


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
    "allow_private_keys_in_cfg": "Whether a state holding TLS private keys may be written into a guest-readable ``cfg`` object.",
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
        try:
            with open(file_path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {file_path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"configuration file {file_path}: {e}") from None
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
        raise ConfigError(f"configuration key {key!r}{where}: {e}") from None


def _key_from_msgspec(message: str) -> str:
    # msgspec: "Expected `float`, got `str` - at `$.poll_interval_s`"
    marker = "at `$."
    if marker in message:
        return message.split(marker, 1)[1].split("`", 1)[0].split(".", 1)[0].split("[", 1)[0]
    return "?"


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")
