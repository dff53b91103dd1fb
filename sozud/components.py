"""The daemon's long-lived pieces built from a ``Config``: the sozu channel and adapter, the OpenSVC client
and the shared state's port, the sync engine. On reload (SIGHUP) :func:`build_components` keeps every
piece whose settings did not change, connections included.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import msgspec

from sozud.adapters import SozuAdapter
from sozud.config import Config, get_place
from sozud.layout import OpenSVCShared
from sozud.om_api import OMClient, OMSettings, client_from_url, read_secret_file
from sozud.persist import BaseStore
from sozud.socket_proto import SozuChannel
from sozud.state.codec import MAX_STATE_BYTES
from sozud.sync import EngineSettings, SharedPort, SyncEngine
from sozud.versions import SozuVersion

__all__ = [
    "OPENSVC_CLIENT_KEYS",
    "SOZU_ADAPTER_KEYS",
    "SOZU_CHANNEL_KEYS",
    "Components",
    "build_components",
    "om_settings",
]


def om_settings(config: Config) -> OMSettings:
    """The OpenSVC client's settings: the ``[opensvc]`` section itself (an ``OMSettings``), with the secrets
    its ``password_file`` and ``token_file`` hold and this node's name."""
    osvc = config.opensvc
    return msgspec.structs.replace(
        osvc,
        password=read_secret_file(osvc.password_file, "configuration key 'opensvc.password_file'"),
        token=read_secret_file(osvc.token_file, "configuration key 'opensvc.token_file'"),
        nodename=config.node,
    )


# The settings each long-lived piece is built from (dotted keys): a reload (SIGHUP) rebuilds a piece only
# when one of its settings changed, so a reload that changes neither keeps the sozu and OpenSVC connections up.
SOZU_CHANNEL_KEYS = ("sozu.socket", "sozu.version", "sozu.request_timeout_s")
SOZU_ADAPTER_KEYS = ("sozu.shared_dir", "sozu.shared_dir_sozu_path", "sync.max_rounds", "sync.max_removal_ratio")
OPENSVC_CLIENT_KEYS = ("opensvc", "node")  # the whole section: the client's settings and the shared state's place


def _unchanged(old: Config, new: Config, keys: tuple[str, ...]) -> bool:
    return all(get_place(old, k) == get_place(new, k) for k in keys)


@dataclass
class Components:
    """The live objects built from one Config (on SIGHUP, a piece is rebuilt only when its settings change)."""

    config: Config
    channel: SozuChannel
    om: OMClient
    sozu: SozuAdapter
    shared: SharedPort
    engine: SyncEngine

    async def aclose(self, *, keep: Components | None = None) -> None:
        """Close the connections, except those ``keep`` (the pieces replacing these) still uses."""
        if keep is None or keep.channel is not self.channel:
            with contextlib.suppress(Exception):
                await self.channel.aclose()
        if keep is None or keep.om is not self.om:
            with contextlib.suppress(Exception):
                await self.om.aclose()


def build_components(config: Config, reuse: Components | None = None) -> Components:
    """The live objects for ``config``. With ``reuse`` (the running pieces, on reload), each of its pieces
    whose settings did not change is kept, connections included."""
    old = reuse.config if reuse is not None else None
    channel: SozuChannel
    if reuse is not None and old is not None and _unchanged(old, config, SOZU_CHANNEL_KEYS):
        channel = reuse.channel
    else:
        version = None if config.sozu.version == "auto" else SozuVersion.parse(config.sozu.version)
        channel = SozuChannel(config.sozu.socket, version=version, request_timeout_s=config.sozu.request_timeout_s)
    om: OMClient
    if reuse is not None and old is not None and _unchanged(old, config, OPENSVC_CLIENT_KEYS):
        om = reuse.om
    else:
        om = client_from_url(config.opensvc.api, om_settings(config))
    sozu: SozuAdapter
    if (
        reuse is not None
        and old is not None
        and reuse.channel is channel
        and _unchanged(old, config, SOZU_ADAPTER_KEYS)
    ):
        sozu = reuse.sozu
    else:
        sozu = SozuAdapter(
            channel,
            shared_dir=config.sozu.shared_dir,
            shared_dir_sozu_path=config.sozu.shared_dir_sozu_path,
            max_rounds=config.sync.max_rounds,
            max_removal_ratio=config.sync.max_removal_ratio,
        )
    sozu.keep_read_after_apply = config.sync.incremental  # (also on a reload that keeps the adapter)
    osvc = config.opensvc
    shared: SharedPort
    if reuse is not None and reuse.om is om:  # the client is rebuilt whenever [opensvc] changes
        shared = reuse.shared
    else:
        shared = OpenSVCShared(
            om,
            osvc.object,
            osvc.key,
            osvc.meta_key,
            max_state_bytes=MAX_STATE_BYTES,
            sharded=osvc.layout == "sharded",
        )
    settings = EngineSettings(
        node=config.node,
        object=config.opensvc.object,
        key=config.opensvc.key,
        max_removal_ratio=config.sync.max_removal_ratio,
        force=config.sync.force,
        boot_state_file=config.sozu.boot_state_file,
        incremental=config.sync.incremental,
    )
    engine: SyncEngine
    if (
        reuse is not None
        and reuse.sozu is sozu
        and reuse.shared is shared
        and reuse.engine.base.dir == Path(config.sync.state_dir)
        and reuse.engine.settings.node == settings.node
    ):
        # same ports and base: keep the engine, and what it remembers (the pushes its live held, caches)
        engine = reuse.engine
        engine.settings = settings
    else:
        engine = SyncEngine(sozu, shared, BaseStore(config.sync.state_dir), settings)
    return Components(config, channel, om, sozu, shared, engine)
