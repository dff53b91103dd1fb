"""The daemon's life cycle: build the pieces from a Config, run triggers → debounce → sync, stop cleanly.

Triggers (each only *asks* for a sync; the sync reads the real states):

- start-up, SIGHUP (configuration reloaded);
- sozu: configuration events (2.x), a periodic cheap probe of the live state (every version; the only
  way to notice backend changes), a re-connection (sozu may have restarted: full re-sync);
- OpenSVC: change notifications (event stream, polling, projected file);
- a periodic full re-sync (``resync_interval_s``) and retries after a failure (capped, jittered backoff).

Bursts coalesce: a sync starts ``debounce_ms`` after the last trigger, and at most ``max_wait_ms`` after
the first. SIGTERM/SIGINT stop the daemon after the sync in progress (an apply is never cut short).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from sozud.adapters import SozuAdapter
from sozud.backoff import Backoff
from sozud.config import Config, get_place, values_by_place
from sozud.errors import (
    SharedInFlightError,
    SozudError,
    StateParseError,
    UnsafePlanError,
    VersionMismatchError,
)
from sozud.layout import OpenSVCShared
from sozud.log import configure_logging_from_settings, get_logger
from sozud.metrics import Metrics, MetricsServer
from sozud.om_api import OMClient, OMSettings, client_from_url, read_secret_file
from sozud.persist import BaseMeta, BaseStore, Status, StatusFile
from sozud.sdnotify import Notifier
from sozud.socket_proto import SozuChannel
from sozud.state.codec import MAX_STATE_BYTES
from sozud.sync import EngineSettings, SharedPort, SyncEngine, SyncReport
from sozud.versions import SozuVersion

# Waits before retrying a failed sync: a ceiling from 1 s, doubling up to ``retry_max_s`` (full jitter).
SYNC_RETRY_INITIAL_S = 1.0
# Waits before restarting a trigger loop that failed: a ceiling from 0.5 s, doubling up to 30 s; a loop
# that ran this long before failing was healthy, and its next restart waits from the start again.
TRIGGER_RESTART_INITIAL_S = 0.5
TRIGGER_RESTART_MAX_S = 30.0
TRIGGER_HEALTHY_RUN_S = 60.0


def sync_retry_backoff(config: Config) -> Backoff:
    return Backoff(initial_s=SYNC_RETRY_INITIAL_S, max_s=config.sync.retry_max_s)


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


class Daemon:
    """start → run (until stop) → stop. ``build`` is injectable so tests can use simulators."""

    def __init__(
        self,
        config: Config,
        *,
        reload_config: Callable[[], Config] | None = None,
        build: Callable[[Config, Components | None], Components] = build_components,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self._reload_config = reload_config
        self._build = build
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self.status = Status(node=config.node, started_at=time.time())
        self.log = get_logger(node=config.node)
        self.components: Components | None = None
        self._trigger = asyncio.Event()
        self._reasons: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._reload = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._metrics_server: MetricsServer | None = None
        self._backoff = sync_retry_backoff(config)
        self._retry_handle: asyncio.TimerHandle | None = None
        self._last_probe: object | None = None
        self.sync_done = asyncio.Condition()  # notified after every sync attempt (tests wait on it)
        self.syncs_attempted = 0
        self.last_report: SyncReport | None = None
        self.last_error: BaseException | None = None
        self._wake_counts: tuple[OMClient | None, int, int] = (None, 0, 0)
        self._latency_seen: dict[tuple[int, str], tuple[int, float]] = {}
        self.last_refusal: str | None = None  # the last removal-valve refusal reported (each is logged once)

    # --- triggers

    def trigger(self, reason: str) -> None:
        self._reasons[reason] += 1
        self._trigger.set()

    def request_stop(self) -> None:
        self._stop.set()
        self._trigger.set()

    def request_reload(self) -> None:
        self._reload = True
        self.trigger("reload")

    # --- life cycle

    async def start(self) -> None:
        self.components = self._build(self.config, None)
        self.components.channel.add_reconnect_listener(self._on_reconnect)
        if self.config.metrics_address:
            await self._serve_metrics(self.config.metrics_address)
        self._start_trigger_tasks()
        self.trigger("startup")

    async def _serve_metrics(self, address: str | None) -> None:
        """Serve the metrics on ``address`` (None: nowhere) instead of where they are served now. Raises
        ``OSError`` when ``address`` cannot be bound; the previous server, if any, then serves again."""
        previous, self._metrics_server = self._metrics_server, None
        if previous is not None:
            await previous.stop()
        if address is None:
            return
        server = MetricsServer(self.metrics, address)
        try:
            await server.start()
        except OSError:
            if previous is not None:
                with contextlib.suppress(OSError):
                    await previous.start()
                    self._metrics_server = previous
            raise
        self._metrics_server = server
        self.log.info("metrics.serving", address=f"{server.host}:{server.port}")

    def _on_reconnect(self, epoch: int) -> None:
        # the channel logs sozu.reconnected; the re-sync it triggers is logged with its reason
        self.metrics.reconnects.inc()
        self.trigger("sozu_reconnected")

    def _start_trigger_tasks(self, names: Collection[str] | None = None) -> None:
        """Start the trigger loops (only those named in ``names``, when given)."""
        assert self.components is not None
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            "probe": self._probe_loop,
            "sozu_events": self._events_loop,
            "opensvc_changes": self._opensvc_loop,
            "resync": self._resync_loop,
        }
        if self.notifier.watchdog_interval_s:
            loops["watchdog"] = self._watchdog_loop
        for name, loop in loops.items():
            if names is None or name in names:
                self._tasks[name] = asyncio.create_task(self._guard(name, loop))

    async def _stop_trigger_tasks(self, names: Collection[str] | None = None) -> None:
        """Stop the trigger loops (only those named in ``names``, when given)."""
        tasks = [self._tasks.pop(n) for n in list(self._tasks) if names is None or n in names]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def stop(self) -> None:
        self.notifier.stopping()
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        await self._stop_trigger_tasks()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        if self.components is not None:
            await self.components.aclose()
        self.log.info("daemon.stopped")

    async def run(self) -> None:
        """Run until :meth:`request_stop`. Call :meth:`start` first."""
        self.notifier.ready("started; waiting for the first sync")
        self.log.info("daemon.started", socket=self.config.sozu.socket, api=self.config.opensvc.api or "auto")
        while not self._stop.is_set():
            await self._trigger.wait()
            if self._stop.is_set():
                break
            await self._debounce()
            if self._stop.is_set():
                break
            if self._reload:
                await self._do_reload()
            reasons = ",".join(sorted(self._reasons)) or "unknown"
            self._reasons.clear()
            # An apply in progress is never cut short: the sync runs in its own task, shielded.
            await asyncio.shield(asyncio.ensure_future(self._sync(reasons)))

    async def _debounce(self) -> None:
        first = time.monotonic()
        debounce_s = self.config.sync.debounce_ms / 1000
        max_wait_s = self.config.sync.max_wait_ms / 1000
        while True:
            self._trigger.clear()
            remaining = max_wait_s - (time.monotonic() - first)
            quiet = min(debounce_s, remaining)
            if quiet <= 0 or self._stop.is_set():
                return
            try:
                await asyncio.wait_for(self._trigger.wait(), timeout=quiet)
            except TimeoutError:
                return

    async def _sync(self, reasons: str) -> None:
        c = self.components
        assert c is not None
        self.status.last_sync_at = time.time()
        self.status.last_reason = reasons
        try:
            report = await c.engine.sync_once(reasons)
        except SozudError as e:
            self._record_failure(e, reasons)
        except Exception as e:  # a bug must not kill the daemon: report it, back off, retry
            self.log.exception("sync.crashed", reason=reasons)
            self._record_failure(e, reasons)
        else:
            self._record_success(report)
        finally:
            await self._after_sync()

    def _record_success(self, report: SyncReport) -> None:
        self.last_report = report
        self.last_error = None
        self.last_refusal = None
        self.status.action = None
        self.status.last_error_type = None
        self._backoff.reset()
        st = self.status
        st.last_success_at = time.time()
        st.last_outcome = report.outcome if not report.failures else f"{report.outcome}, with failures"
        st.last_error = "; ".join(report.failures[:3]) or None
        st.consecutive_failures = 0
        st.drift = report.drift
        st.shared_generation = report.generation
        st.shared_origin = report.origin or None
        st.conflicts_total += len(report.conflicts)
        for kind, n in report.requests_by_type.items():
            st.requests_total[kind] = st.requests_total.get(kind, 0) + n
        st.pushes_total += int(report.pushed)
        m = self.metrics
        m.syncs.inc(outcome=report.outcome)
        m.conflicts.inc(len(report.conflicts))
        for kind, n in report.requests_by_type.items():
            m.requests.inc(n, type=kind)
        if report.pushed:
            m.pushes.inc()
        m.drift.set(report.drift)
        m.last_success.set(st.last_success_at)
        m.generation.set(report.generation)
        m.sync_duration.set(report.duration_s)
        if report.failures:
            m.sync_failures.inc(len(report.failures), error="SozuRequestFailure")
            self.log.error("sync.requests_failed", failures=report.failures[:10], count=len(report.failures))
        self.log.info("sync.done", **report.as_log())
        self.notifier.status(f"in sync (generation {report.generation})" if report.in_sync else "drift")

    def _record_failure(self, error: BaseException, reasons: str) -> None:
        self.last_report = None
        self.last_error = error
        st = self.status
        st.last_outcome = "failed"
        st.last_error = str(error)
        st.last_error_type = type(error).__name__
        st.consecutive_failures += 1
        self.metrics.sync_failures.inc(error=type(error).__name__)
        delay = self._backoff.next_delay_s()
        st.action = _operator_action(error, self.config)
        if isinstance(error, UnsafePlanError):
            # A refusal repeats identically until something changes: report each distinct one once.
            if str(error) != self.last_refusal:
                self.last_refusal = str(error)
                self.log.error(
                    "sync.refused",
                    reason=reasons,
                    error=str(error),
                    action=st.action,
                    consecutive_failures=st.consecutive_failures,
                )
            else:
                self.log.debug("sync.refused_again", retry_in_s=round(delay, 2))
        elif isinstance(error, SharedInFlightError):
            self.log.info("sync.deferred", reason=reasons, error=str(error), retry_in_s=round(delay, 2))
        else:
            level = "error" if st.consecutive_failures > 3 else "warning"
            getattr(self.log, level)(
                "sync.failed",
                reason=reasons,
                error=str(error),
                error_type=type(error).__name__,
                retry_in_s=round(delay, 2),
                consecutive_failures=st.consecutive_failures,
            )
        self.notifier.status(f"sync failing: {error}")
        loop = asyncio.get_running_loop()
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        self._retry_handle = loop.call_later(delay, self.trigger, "retry")

    async def _after_sync(self) -> None:
        self.syncs_attempted += 1
        if self.components is not None:
            self._count_wakes(self.components.om)
            # What this sync read, not a probe taken now: a change made during the sync must still
            # look new to the probe loop (None after an apply: the next probe triggers one more sync).
            self._last_probe = self.components.sozu.read_fingerprint
        self._write_status()
        if self.config.metrics_textfile:
            try:
                self.metrics.write_textfile(self.config.metrics_textfile)
            except OSError as e:
                self.log.warning("metrics.textfile_failed", path=self.config.metrics_textfile, error=str(e))
        async with self.sync_done:
            self.sync_done.notify_all()

    def _count_wakes(self, om: OMClient) -> None:
        """Carry the client's wake_monitor counts into the metrics (the client is rebuilt on reload)."""
        if self._wake_counts[0] is not om:
            self._wake_counts = (om, 0, 0)
        _, wakes, failures = self._wake_counts
        self.metrics.wakes.inc(om.wakes - wakes, outcome="ok")
        self.metrics.wakes.inc(om.wake_failures - failures, outcome="failed")
        self._wake_counts = (om, om.wakes, om.wake_failures)
        for operation, (count, total) in om.latency.items():
            seen_count, seen_total = self._latency_seen.get((id(om), operation), (0, 0.0))
            self.metrics.agent_requests.inc(count - seen_count, operation=operation)
            self.metrics.agent_seconds.inc(total - seen_total, operation=operation)
            self._latency_seen[(id(om), operation)] = (count, total)

    def _write_status(self) -> None:
        st, c, config = self.status, self.components, self.config
        st.pid = os.getpid()
        st.base_generation = None
        with contextlib.suppress(OSError, msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError):
            meta_path = BaseStore(config.sync.state_dir).meta_path
            st.base_generation = msgspec.json.decode(meta_path.read_bytes(), type=BaseMeta).generation
        st.socket, st.api = config.sozu.socket, config.opensvc.api
        st.object, st.key = config.opensvc.object, config.opensvc.key
        st.sozu_version = str(c.channel.version) if c is not None and _has_version(c.channel) else None
        try:
            StatusFile(config.sync.state_dir).write(st)
        except OSError as e:
            self.log.warning("status.write_failed", path=config.sync.state_dir, error=str(e))

    async def _do_reload(self) -> None:
        """Apply a re-read configuration: every changed key takes effect now; only the pieces whose
        settings changed are rebuilt (a connection whose settings did not change stays up). A key that
        could not be applied is logged by name under ``not_applied``, with why."""
        self._reload = False
        if self._reload_config is None:
            return
        old, running = self.config, self.components
        try:
            new = self._reload_config()
            components = self._build(new, running)
        except SozudError as e:
            self.log.error("config.reload_failed", error=str(e), action="keeping the running configuration")
            return
        self.notifier.reloading()
        old_values, new_values = values_by_place(old), values_by_place(new)
        changed = [k for k, v in new_values.items() if old_values[k] != v]
        self.config = new
        not_applied: dict[str, str] = {}
        if "log_level" in changed or "log_format" in changed:
            configure_logging_from_settings(new.log_level, new.log_format)
        if "node" in changed:
            self.status.node = new.node
            self.log = get_logger(node=new.node)
        if "sync.retry_max_s" in changed:
            self._backoff = sync_retry_backoff(new)
        if "metrics_address" in changed:
            try:
                await self._serve_metrics(new.metrics_address)
            except OSError as e:
                not_applied["metrics_address"] = f"cannot serve on {new.metrics_address}: {e.strerror or e}"
        new_channel = running is None or components.channel is not running.channel
        new_om = running is None or components.om is not running.om
        restart = {
            name
            for name, needed in (
                ("sozu_events", new_channel),
                ("opensvc_changes", new_om),
                ("probe", "sync.poll_interval_s" in changed),
                ("resync", "sync.resync_interval_s" in changed),
            )
            if needed
        }
        await self._stop_trigger_tasks(restart)
        self.components = components
        if new_channel:
            components.channel.add_reconnect_listener(self._on_reconnect)
        self._start_trigger_tasks(restart)
        if running is not None:
            await running.aclose(keep=components)
        fields: dict[str, Any] = {
            "applied": [k for k in changed if k not in not_applied],
            "reconnected": [name for name, new_piece in (("sozu", new_channel), ("opensvc", new_om)) if new_piece],
        }
        if not_applied:
            fields["not_applied"] = not_applied
            self.log.error("config.reloaded", **fields, action="fix the keys named in not_applied and reload")
        else:
            self.log.info("config.reloaded", **fields)
        self.notifier.ready("configuration reloaded")

    # --- trigger loops

    async def _guard(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a trigger loop forever; a failure, or a cancellation that is not the daemon's own (a stray
        CancelledError from inside a library), is logged and the loop restarts after a backoff."""
        backoff = Backoff(initial_s=TRIGGER_RESTART_INITIAL_S, max_s=TRIGGER_RESTART_MAX_S)
        while True:
            started = time.monotonic()
            try:
                await loop()
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # the daemon is stopping or reloading
                error = "cancelled from inside"
            except Exception as e:
                error = str(e) or type(e).__name__
            if time.monotonic() - started >= TRIGGER_HEALTHY_RUN_S:
                backoff.reset()
            delay = backoff.next_delay_s()
            self.log.warning("trigger.failed", trigger=name, error=error, retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sync.poll_interval_s)
            c = self.components
            if c is None:
                continue
            try:
                fingerprint = await c.sozu.probe()
            except SozudError as e:
                self.log.debug("sozu.probe_failed", error=str(e))
                self.trigger("sozu_unreachable")
                continue
            if fingerprint != self._last_probe:
                self._last_probe = fingerprint
                self.trigger("sozu_probe")

    async def _events_loop(self) -> None:
        c = self.components
        assert c is not None
        await c.channel.connect()
        if c.channel.version < SozuVersion(2, 0, 0):
            return  # 1.x and 0.15 send only backend-health events: the probe covers their changes
        events: AsyncIterator[Any] = c.channel.subscribe_events()
        async for _event in events:
            self.trigger("sozu_event")

    async def _opensvc_loop(self) -> None:
        c = self.components
        assert c is not None
        async for _ in c.om.changes(self.config.opensvc.object, self.config.opensvc.key):
            self.trigger("opensvc_change")

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sync.resync_interval_s)
            self.trigger("periodic_resync")

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval_s
        assert interval is not None
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)


def _operator_action(error: BaseException, config: Config) -> str | None:
    """What an operator must do about a failure that retrying alone will not fix (None: sozud retries)."""
    where = f"{config.opensvc.object} key {config.opensvc.key}"
    shared = f"opensvc {where}"
    unusable = (isinstance(error, StateParseError) and error.source.startswith(shared)) or isinstance(
        error, VersionMismatchError
    )
    if unusable:
        return (
            f"the shared state ({where}) cannot be used here (see last_error) and "
            "sozud never overwrites it by itself: on a node whose sozu holds the right configuration, run "
            "`sozud push --from-live` with the daemon's configuration (add --force if it removes many objects), "
            "or write a valid state file with `sozud key put`"
        )
    if isinstance(error, UnsafePlanError):
        return (
            "a plan or push was refused by the removal safety valve (max_removal_ratio) and is retried as "
            "the states change; check the objects named in last_error: if the removal is intended, run "
            "`sozud --once --force` on this node with the daemon's configuration, otherwise restore them"
        )
    return None


def _has_version(channel: SozuChannel) -> bool:
    try:
        channel.version  # noqa: B018 - raises before the first connection
    except Exception:
        return False
    return True


async def run_daemon(daemon: Daemon) -> None:
    """Install signal handlers, start, run until SIGTERM/SIGINT, stop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
    try:
        await daemon.start()
        await daemon.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await daemon.stop()
