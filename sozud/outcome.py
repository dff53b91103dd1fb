"""What each sync attempt leaves behind: the fields of ``status.json`` (:class:`~sozud.persist.Status`), the
metrics, and, for a failure that retrying alone will not fix, what the operator must do.

The daemon (:mod:`sozud.daemon`) calls these after every attempt; it keeps the logging, the retry
schedule and the systemd notifications.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import msgspec

from sozud.config import Config
from sozud.errors import StateParseError, UnsafePlanError, VersionMismatchError
from sozud.metrics import Metrics
from sozud.om_api import OMClient
from sozud.persist import BaseMeta, BaseStore, Status, StatusFile
from sozud.socket_proto import SozuChannel
from sozud.sync import SyncReport

__all__ = ["AgentCounters", "operator_action", "record_failure", "record_success", "write_status"]


def record_success(status: Status, metrics: Metrics, report: SyncReport) -> None:
    """Count a sync that ended with ``report`` in ``status`` and ``metrics``."""
    st = status
    st.action = None
    st.last_error_type = None
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
    m = metrics
    m.syncs.inc(outcome=report.outcome)
    m.steps.inc(path="incremental" if report.incremental else "full")
    if report.incremental_disagreed:
        m.incremental_disagreements.inc()
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


def record_failure(status: Status, metrics: Metrics, error: BaseException, config: Config) -> None:
    """Count a sync that failed with ``error`` in ``status`` and ``metrics``, with the operator's action."""
    st = status
    st.last_outcome = "failed"
    st.last_error = str(error)
    st.last_error_type = type(error).__name__
    st.consecutive_failures += 1
    metrics.sync_failures.inc(error=type(error).__name__)
    st.action = operator_action(error, config)


def operator_action(error: BaseException, config: Config) -> str | None:
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


class AgentCounters:
    """Carries an ``OMClient``'s counters (wake_monitor calls, agent latency) into the metrics, counting
    only what is new since the last call; the client is rebuilt on reload and its counters start again."""

    def __init__(self) -> None:
        self._wake_counts: tuple[OMClient | None, int, int] = (None, 0, 0)
        self._latency_seen: dict[tuple[int, str], tuple[int, float]] = {}

    def carry(self, om: OMClient, metrics: Metrics) -> None:
        if self._wake_counts[0] is not om:
            self._wake_counts = (om, 0, 0)
        _, wakes, failures = self._wake_counts
        metrics.wakes.inc(om.wakes - wakes, outcome="ok")
        metrics.wakes.inc(om.wake_failures - failures, outcome="failed")
        self._wake_counts = (om, om.wakes, om.wake_failures)
        for operation, (count, total) in om.latency.items():
            seen_count, seen_total = self._latency_seen.get((id(om), operation), (0, 0.0))
            metrics.agent_requests.inc(count - seen_count, operation=operation)
            metrics.agent_seconds.inc(total - seen_total, operation=operation)
            self._latency_seen[(id(om), operation)] = (count, total)


def write_status(status: Status, config: Config, channel: SozuChannel | None, log: Any) -> None:
    """Fill in what ``status`` reports about this process and its configuration, and write ``status.json``
    (a failure to write is logged, never raised)."""
    st = status
    st.pid = os.getpid()
    st.base_generation = None
    with contextlib.suppress(OSError, msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError):
        meta_path = BaseStore(config.sync.state_dir).meta_path
        st.base_generation = msgspec.json.decode(meta_path.read_bytes(), type=BaseMeta).generation
    st.socket, st.api = config.sozu.socket, config.opensvc.api
    st.object, st.key = config.opensvc.object, config.opensvc.key
    st.sozu_version = str(channel.version) if channel is not None and _has_version(channel) else None
    try:
        StatusFile(config.sync.state_dir).write(st)
    except OSError as e:
        log.warning("status.write_failed", path=config.sync.state_dir, error=str(e))


def _has_version(channel: SozuChannel) -> bool:
    try:
        channel.version  # noqa: B018 - raises before the first connection
    except Exception:
        return False
    return True
