"""sozud's configuration: every setting, its default, its unit, its validation.

The TOML file (``/etc/sozud/sozud.toml`` or ``--config FILE``) has three sections and a few top-level keys::

    node = "node1"                # top level: node, log_level, log_format, metrics_address, metrics_textfile
    [sozu]                        # the local sozu (SozuSettings)
    socket = "/run/sozu/sozu.sock"
    [opensvc]                     # the shared state and the agent: the OpenSVC client's own settings
    object = "igw/sec/sozu"       # (OpenSVCSettings is an OMSettings)
    [sync]                        # when and how this node syncs (SyncSettings)
    poll_interval_s = 5

Every setting also has a *flat name*, which names its environment variable and its flag:
``poll_interval_s`` / ``SOZUD_POLL_INTERVAL_S`` / ``--poll-interval-s`` set ``[sync] poll_interval_s``
(``SETTINGS`` lists them). The flat names were the TOML keys before the sections: such a key still loads,
with a ``config.deprecated_key`` warning naming its new place; a setting given both ways in one file is an
error naming both. Sources, lowest precedence first: built-in defaults, the TOML file, environment
variables, then command-line flags. Errors name the key (``sync.poll_interval_s``) and where the bad
value came from.
"""

from __future__ import annotations

import math
import os
import re
import socket
import stat
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from sozud._om.base import OMSettings
from sozud.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/sozud/sozud.toml"
ENV_PREFIX = "SOZUD_"


class SozuSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[sozu]``: the local sozu."""

    socket: str = "/run/sozu/sozu.sock"
    version: str = "auto"
    request_timeout_s: float = 10.0
    shared_dir: str | None = None
    shared_dir_sozu_path: str | None = None
    boot_state_file: str | None = None


class OpenSVCSettings(OMSettings, forbid_unknown_fields=True, kw_only=True):
    """``[opensvc]``: where the shared state lives, and the OpenSVC client's own settings (this *is* an
    ``OMSettings``: its defaults are the client's). ``password``, ``token`` and ``nodename`` are not
    configuration keys: :func:`sozud.daemon.om_settings` fills them from ``password_file``, ``token_file``
    and the top-level ``node``."""

    api: str | None = None
    object: str = "igw/cfg/sozu"
    key: str = "state.json"
    meta_key: str = ""
    layout: Literal["sharded", "plain"] = "sharded"
    password_file: str | None = None
    token_file: str | None = None

    def __post_init__(self) -> None:
        if not self.meta_key:
            self.meta_key = f"{self.key}.meta"


class SyncSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[sync]``: when and how this node syncs."""

    state_dir: str = "/var/lib/sozud"
    poll_interval_s: float = 5.0
    resync_interval_s: float = 300.0
    debounce_ms: int = 300
    max_wait_ms: int = 5000
    max_removal_ratio: float = 0.5
    force: bool = False
    max_rounds: int = 3
    retry_max_s: float = 60.0
    incremental: bool = True


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """All settings. ``FIELD_HELP`` documents each (README "Configuration" is generated from it)."""

    node: str = ""
    sozu: SozuSettings = msgspec.field(default_factory=SozuSettings)
    opensvc: OpenSVCSettings = msgspec.field(default_factory=OpenSVCSettings)
    sync: SyncSettings = msgspec.field(default_factory=SyncSettings)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    metrics_address: str | None = None
    metrics_textfile: str | None = None

    def __post_init__(self) -> None:
        if not self.node:
            self.node = socket.gethostname()
        for place, (low, high) in RANGES.items():
            value = get_place(self, place)
            _check(
                math.isfinite(value) and low <= value <= high,
                place,
                f"{value!r} is outside the accepted range {low:g} to {high:g}",
            )
        sync, osvc = self.sync, self.opensvc
        _check(0.0 <= sync.max_removal_ratio <= 1.0, "sync.max_removal_ratio", "must be between 0 and 1")
        _check(sync.max_wait_ms >= sync.debounce_ms, "sync.max_wait_ms", "must be >= debounce_ms")
        for name in ("key", "meta_key"):
            value = getattr(osvc, name)
            _check(
                bool(_KEY_NAME.fullmatch(value)),
                f"opensvc.{name}",
                f"{value!r} is not a key name (1 to 255 letters, digits, '.', '_', '-', '/'; not starting with '.')",
            )
        _check(osvc.meta_key != osvc.key, "opensvc.meta_key", "must differ from key")
        parts = osvc.object.split("/")
        _check(
            len(parts) == 3 and parts[1] in ("cfg", "sec") and all(_NAME.fullmatch(p) for p in (parts[0], parts[2])),
            "opensvc.object",
            f"{osvc.object!r} is not a NAMESPACE/cfg/NAME or NAMESPACE/sec/NAME path",
        )
        if self.metrics_address is not None:
            host, sep, port = self.metrics_address.rpartition(":")
            _check(
                bool(sep and host and port.isdigit() and 0 <= int(port) <= 65535),
                "metrics_address",
                f"{self.metrics_address!r} is not HOST:PORT with a port from 0 to 65535",
            )


SECTIONS: dict[str, type[msgspec.Struct]] = {"sozu": SozuSettings, "opensvc": OpenSVCSettings, "sync": SyncSettings}
# Fields of a section that are not configuration keys (the OpenSVC client's, filled by sozud itself).
_NOT_KEYS = frozenset({"opensvc.password", "opensvc.token", "opensvc.nodename"})
# Flat names that are not the field's own name (the field's name alone would be ambiguous or repetitive).
_RENAMED = {"sozu.version": "sozu_version", "opensvc.poll_interval_s": "opensvc_poll_interval_s"}

# Accepted ranges of the numeric settings: finite, and neither so small that a loop spins nor so large
# that a wait never ends (a request timeout of inf made --once hang and run ignore SIGTERM).
RANGES: dict[str, tuple[float, float]] = {
    "sozu.request_timeout_s": (0.1, 3600.0),
    "opensvc.request_timeout_s": (0.1, 3600.0),
    "opensvc.poll_interval_s": (0.01, 86400.0),
    "opensvc.events_max_idle_s": (1.0, 7 * 86400.0),
    "opensvc.retry_attempts": (1, 100),
    "opensvc.reconnect_max_s": (0.01, 86400.0),
    "sync.poll_interval_s": (0.01, 86400.0),
    "sync.resync_interval_s": (1.0, 7 * 86400.0),
    "sync.retry_max_s": (0.01, 86400.0),
    "sync.debounce_ms": (0, 600_000),
    "sync.max_wait_ms": (0, 3_600_000),
    "sync.max_rounds": (1, 100),
}
_KEY_NAME = re.compile(r"[A-Za-z0-9_\-/][A-Za-z0-9._\-/]{0,254}")
_NAME = re.compile(r"[a-z0-9]([a-z0-9.\-]{0,61}[a-z0-9])?")
MAX_CONFIG_BYTES = 1024 * 1024  # a sozud.toml is a few hundred bytes


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"configuration key {key!r}: {reason}", key=key)


# One line of help per setting, by flat name: --help, the README reference and tests read it from here.
FIELD_HELP: dict[str, str] = {
    "socket": "sozu's command socket (``command_socket`` in sozu's config).",
    "sozu_version": "``auto`` (detect on connect), or the version of the local sozu: ``0.15``, ``1.1.1``, ``2.1.0``...",
    "request_timeout_s": "Time allowed for each request's final answer, from sozu (which sends none for some requests) or from the agent; the variable and the flag set both keys.",
    "shared_dir": "A directory shared with sozu's main process (e.g. ``/run/sozu``): enables one-request live reads (SaveState) and batch application of large plans (LoadState).",
    "shared_dir_sozu_path": "The same directory as sozu's main process sees it, when it differs (container mount).",
    "boot_state_file": "A plain sozu state file kept equal to what sozu runs once in sync, for sozu's ``saved_state`` (e.g. ``/run/sozu/state.json``): a restarted sozu boots with the routes.",
    "api": "OpenSVC agent URL (``unix://``, ``raw://``, ``h2+unix://``, ``https://``, ``om3+unix://``, ``om3+https://``); unset = the local agent's sockets, whichever exist.",
    "object": "The config map (``cfg``) or secret (``sec``) object holding the shared state.",
    "key": "The key holding the shared sozu state file.",
    "meta_key": "The key holding sozud's metadata (generation, origin, parent hash); default ``<key>.meta``.",
    "layout": "How this node writes the shared state: ``sharded`` (compressed shards and a manifest: a change rewrites one or two shards) or ``plain`` (one state-file key, read by sozud before 0.2: use it during a rolling upgrade from those, see README). Both are always read.",
    "password_file": "File holding the om3+https:// basic authentication password.",
    "token_file": "File holding an om3+https:// bearer token.",
    "cluster_name": "Cluster name for ``raw://`` (default: from the local agent's configuration).",
    "secret_file": "File holding the cluster secret for ``raw://`` and ``https://`` (o-secret).",
    "cluster_conf_file": "The agent's cluster configuration, read for the cluster name and secret that ``cluster_name``/``secret_file`` leave unset.",
    "ca_file": "CA bundle to verify the agent on https:// and om3+https://.",
    "cert_file": "Client certificate (PEM) for https:// (x509 authentication).",
    "key_file": "Private key of cert_file.",
    "username": "om3+https:// basic authentication user.",
    "opensvc_poll_interval_s": "How often the shared key is read when no change notification arrives.",
    "retry_attempts": "Tries of a failing read or write of a key while the agent is unreachable.",
    "reconnect_max_s": "Cap of the backoff between reconnections to the agent's event stream (and between poll retries).",
    "events_max_idle_s": "An agent event stream that brought nothing about the key for this long is reopened (also a slow periodic re-read).",
    "projected_file": "The file the agent projects the key into (optional extra change trigger; never read as data).",
    "allow_private_keys_in_cfg": "Whether a state holding TLS private keys may be written into a guest-readable ``cfg`` object (default: refused; use a ``sec`` object).",
    "run_dir": "Where the local agent's sockets are (``lsnr.sock``, ``h2.sock``, ``http.sock``), used when ``api`` is unset.",
    "state_dir": "Where sozud persists its base state and status.",
    "poll_interval_s": "How often the live sozu is probed for local changes (sozu >= 1.0 never rewrites its state file).",
    "resync_interval_s": "A full sync at least this often, whatever the triggers said.",
    "debounce_ms": "Quiet time after a trigger before syncing (bursts coalesce).",
    "max_wait_ms": "Upper bound on the debounce: a sync starts at most this long after the first trigger.",
    "max_removal_ratio": "A plan removing more than this share of the live (or shared) objects is refused unless forced.",
    "force": "Apply/push plans that the removal safety valve refuses.",
    "max_rounds": "Apply rounds (apply, re-read, re-plan) before giving up on convergence.",
    "retry_max_s": "Cap of the backoff between failed syncs.",
    "incremental": "A step after a settled one costs what changed, not the whole state (docs/sync.md, "
    '"Incremental steps"); every periodic resync and every 100th step is a full check. Off: every step '
    "reads, merges and plans the whole state.",
    "node": "This node's name (default: the host name).",
    "log_level": "debug, info, warning or error.",
    "log_format": "auto (JSON unless stderr is a terminal), json or console.",
    "metrics_address": "``HOST:PORT`` to serve Prometheus metrics on (keep it on loopback).",
    "metrics_textfile": "A file to write Prometheus metrics to after each sync (node_exporter textfile collector).",
}


@dataclass(frozen=True)
class Setting:
    """One setting as the environment and the command line name it."""

    name: str  # flat name: SOZUD_<NAME>, --<name-with-dashes>, and its TOML key before the sections
    places: tuple[str, ...]  # the TOML keys it sets, dotted ("sync.poll_interval_s"; "node" at top level)
    type: Any
    default: Any
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _settings_table() -> dict[str, Setting]:
    """Every setting, in the order of the sections (the [opensvc] section's own keys before the client's)."""
    found: dict[str, tuple[list[str], Any, Any]] = {}

    def add(place: str, tp: Any, default: Any) -> None:
        name = _RENAMED.get(place, place.rsplit(".", 1)[-1])
        places = found.setdefault(name, ([], tp, default))[0]
        places.append(place)

    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        fields = msgspec.structs.fields(cls)
        if cls is OpenSVCSettings:  # the section's own keys first: where the state lives, then the client's
            fields = tuple(sorted(fields, key=lambda f: f.name in OMSettings.__struct_fields__))
        for f in fields:
            if f"{section}.{f.name}" not in _NOT_KEYS:
                add(f"{section}.{f.name}", hints[f.name], f.default)
    hints = typing.get_type_hints(Config)
    for f in msgspec.structs.fields(Config):
        if f.name not in SECTIONS:
            add(f.name, hints[f.name], f.default)
    return {
        name: Setting(name, tuple(places), tp, default, FIELD_HELP[name])
        for name, (places, tp, default) in found.items()
    }


SETTINGS: dict[str, Setting] = _settings_table()
FIELDS: tuple[str, ...] = tuple(SETTINGS)  # the flat names
PLACES: frozenset[str] = frozenset(p for s in SETTINGS.values() for p in s.places)


def get_place(config: Config, place: str) -> Any:
    """The value of the dotted key ``place`` (``sync.poll_interval_s``, ``node``)."""
    value: Any = config
    for part in place.split("."):
        value = getattr(value, part)
    return value


def values_by_place(config: Config) -> dict[str, Any]:
    """Every configuration key's value, by dotted key (what a reload compares)."""
    return {place: get_place(config, place) for place in sorted(PLACES)}


def _put(data: dict[str, Any], place: str, value: Any) -> None:
    section, _, name = place.rpartition(".")
    (data.setdefault(section, {}) if section else data)[name] = value


def with_settings(config: Config, **changes: Any) -> Config:
    """``config`` with the settings named by their flat names changed (tests, the simulated cluster).
    A changed ``key`` keeps the ``meta_key`` already derived from the old one."""
    data = msgspec.to_builtins(config)
    for name, value in changes.items():
        if name not in SETTINGS:
            raise ConfigError(f"unknown setting {name!r}")
        for place in SETTINGS[name].places:
            _put(data, place, value)
    return msgspec.convert(data, Config, strict=False)


def config_from_settings(settings: Mapping[str, Any]) -> Config:
    """A configuration from defaults and ``settings`` by their flat names (no file, no environment)."""
    return with_settings(Config(), **settings)


@dataclass(frozen=True)
class Deprecation:
    """A flat TOML key that loaded at its new place (``config.deprecated_key``, with ``old_key`` and
    ``new_key``: a log field named ``key`` is redacted as a secret)."""

    key: str
    new_keys: tuple[str, ...]
    file: str

    def log(self) -> None:
        from sozud.log import get_logger

        sections = sorted({p.split(".")[0] for p in self.new_keys if "." in p})
        get_logger().warning(
            "config.deprecated_key",
            old_key=self.key,
            new_key=" and ".join(self.new_keys),
            file=self.file,
            action=f"move it under [{'] and ['.join(sections)}] as {self.new_keys[0].rsplit('.', 1)[-1]}",
        )


def load_config(
    path: str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    deprecations: list[Deprecation] | None = None,
) -> Config:
    """Defaults < TOML file < environment < ``overrides`` (the command-line flags that were given, by flat
    name). ``path=None`` reads ``/etc/sozud/sozud.toml`` when it exists; an explicit path must exist.

    Flat TOML keys found in the file are added to ``deprecations``, or logged at once when it is None.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    found: list[Deprecation] = []
    file_path = path or environ.get(ENV_PREFIX + "CONFIG") or None
    if file_path is None and Path(DEFAULT_CONFIG_PATH).exists():
        file_path = DEFAULT_CONFIG_PATH
    if file_path is not None:
        _merge_file(_read_toml(file_path), file_path, data, origin, found)
    for s in SETTINGS.values():
        if s.env in environ:
            for place in s.places:
                _put(data, place, environ[s.env])
                origin[place] = f"environment variable {s.env}"
    for k, v in (overrides or {}).items():
        if k not in SETTINGS:
            raise ConfigError(f"unknown setting {k!r}")
        for place in SETTINGS[k].places:
            _put(data, place, v)
            origin[place] = f"flag {SETTINGS[k].flag}"
    config = _convert(data, origin)
    if deprecations is None:
        for d in found:
            d.log()
    else:
        deprecations.extend(found)
    return config


def _merge_file(
    table: dict[str, Any], file_path: str, data: dict[str, Any], origin: dict[str, str], found: list[Deprecation]
) -> None:
    """The file's keys into ``data``: sections and top-level keys first, then the old flat keys (each
    refused when its new place is also in the file)."""
    source = f"configuration file {file_path}"
    flat: dict[str, Any] = {}
    for k, v in table.items():
        if k in SECTIONS:
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: [{k}] must be a table", key=k)
            for name, value in v.items():
                if f"{k}.{name}" not in PLACES:
                    raise ConfigError(f"{source}: unknown key {name!r} in [{k}]", key=f"{k}.{name}")
                _put(data, f"{k}.{name}", value)
                origin[f"{k}.{name}"] = source
        elif k in PLACES:
            _put(data, k, v)
            origin[k] = source
        elif k in SETTINGS:
            flat[k] = v
        else:
            raise ConfigError(f"{source}: unknown key {k!r}")
    for k, v in flat.items():
        places = SETTINGS[k].places
        for place in places:
            if place in origin:
                raise ConfigError(
                    f"{source}: {k!r} (the old flat key) and {place!r} set the same setting: keep only {place!r}",
                    key=place,
                )
            _put(data, place, v)
            origin[place] = f"{source}, old flat key {k!r}"
        found.append(Deprecation(k, places, file_path))


def _convert(data: dict[str, Any], origin: Mapping[str, str]) -> Config:
    # strict=False: environment values are strings ("5", "true") and convert to the field's type.
    try:
        return msgspec.convert(data, Config, strict=False)
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
    known = {s.env for s in SETTINGS.values()} | {ENV_PREFIX + "CONFIG"}
    return sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)


def _key_from_msgspec(message: str) -> str:
    # msgspec: "Expected `float`, got `str` - at `$.sync.poll_interval_s`"
    marker = "at `$."
    if marker in message:
        return message.split(marker, 1)[1].split("`", 1)[0].split("[", 1)[0]
    return "?"
