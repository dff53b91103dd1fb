"""The daemon's life cycle: build the pieces from a Config, run triggers → debounce → sync, stop cleanly.

Triggers (each only *asks* for a sync; the sync reads the real states):

- start-up, SIGHUP (configuration reloaded);
- sozu: configuration events (2.x), a periodic cheap probe of the live state (every version; the only
  way to notice backend changes), a re-connection (sozu may have restarted: full re-sync);
- OpenSVC: change notifications (event stream, polling, projected file);
- a periodic full re-sync (``resync_interval_s``) and retries after a failure (capped, jittered backoff).

Bursts coalesce: a sync starts ``debounce_ms`` after the last trigger, and at most ``max_wait_ms`` after
the first. SIGTERM/SIGINT stop the daemon after the sync in progress (an apply is never cut short).

The pieces it runs are built by :mod:`sozud.components` (``build_components``, ``om_settings``, re-exported
here); what each sync attempt leaves behind (``status.json``, metrics, the operator's action) is
:mod:`sozud.outcome`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

from sozud.backoff import Backoff
from sozud.components import Components, build_components, om_settings
from sozud.config import Config, values_by_place
from sozud.errors import SharedInFlightError, SozudError, UnsafePlanError
from sozud.log import configure_logging_from_settings, get_logger
from sozud.metrics import Metrics, MetricsServer
from sozud.outcome import AgentCounters, record_failure, record_success, write_status
from sozud.persist import Status
from sozud.sdnotify import Notifier
from sozud.sync import SyncReport
from sozud.versions import SozuVersion

__all__ = ["Components", "Daemon", "build_components", "om_settings", "run_daemon", "sync_retry_backoff"]

# Waits before retrying a failed sync: a ceiling from 1 s, doubling up to ``retry_max_s`` (full jitter).
SYNC_RETRY_INITIAL_S = 1.0
# Waits before restarting a trigger loop that failed: a ceiling from 0.5 s, doubling up to 30 s; a loop
# that ran this long before failing was healthy, and its next restart waits from the start again.
TRIGGER_RESTART_INITIAL_S = 0.5
TRIGGER_RESTART_MAX_S = 30.0
TRIGGER_HEALTHY_RUN_S = 60.0


def sync_retry_backoff(config: Config) -> Backoff:
    return Backoff(initial_s=SYNC_RETRY_INITIAL_S, max_s=config.sync.retry_max_s)


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
        self._agent_counters = AgentCounters()
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
        self._backoff.reset()
        record_success(self.status, self.metrics, report)
        if report.failures:
            self.log.error("sync.requests_failed", failures=report.failures[:10], count=len(report.failures))
        self.log.info("sync.done", **report.as_log())
        self.notifier.status(f"in sync (generation {report.generation})" if report.in_sync else "drift")

    def _record_failure(self, error: BaseException, reasons: str) -> None:
        self.last_report = None
        self.last_error = error
        st = self.status
        record_failure(st, self.metrics, error, self.config)
        delay = self._backoff.next_delay_s()
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
            self._agent_counters.carry(self.components.om, self.metrics)
            # What this sync read, not a probe taken now: a change made during the sync must still
            # look new to the probe loop (None after an apply: the next probe triggers one more sync).
            self._last_probe = self.components.sozu.read_fingerprint
        channel = None if self.components is None else self.components.channel
        write_status(self.status, self.config, channel, self.log)
        if self.config.metrics_textfile:
            try:
                self.metrics.write_textfile(self.config.metrics_textfile)
            except OSError as e:
                self.log.warning("metrics.textfile_failed", path=self.config.metrics_textfile, error=str(e))
        async with self.sync_done:
            self.sync_done.notify_all()

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
