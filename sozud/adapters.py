"""The sync engine's ports, implemented over the real peers: sozu's command channel and the OpenSVC API."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Collection

from google.protobuf.message import Message

from sozud.errors import LiveChangedError, SozuError
from sozud.log import get_logger
from sozud.socket_proto import SozuChannel
from sozud.state.apply import ApplyReport, apply_plan
from sozud.state.codec import RecordCache
from sozud.state.live import ClusterReplies, Fingerprint, LiveRead, counts_explained, probe, read_live_report
from sozud.state.model import ConfigState, ObjKey, decode_value
from sozud.state.plan import diff
from sozud.sync import ApplyOutcome
from sozud.versions import SozuVersion


class SozuAdapter:
    """:class:`~sozud.sync.SozuPort` over a :class:`~sozud.socket_proto.SozuChannel`.

    A full live read costs one request per cluster (or one SaveState with a shared directory), so the
    last read is cached and reused while a cheap probe says nothing changed on the same connection.

    With ``keep_read_after_apply`` (set by the daemon from ``[sync] incremental``, see docs/sync.md
    "Incremental steps"), an apply keeps what it predicts sozu holds as the cached read, with the
    fingerprint probed after it, only when that prediction is certain: every request accepted, no re-read
    (it worked from the exact SaveState read it was given, no batch mode), the same connection, and
    request counters that rose by exactly our requests of each type, for types sozu had counted before
    (:func:`sozud.state.live.counts_explained`). Else the next read is a full one (an operator's request
    that landed during the apply is then seen).

    Without a shared directory some objects cannot be read back (backends of removed clusters,
    certificates no worker listener serves). Objects of that kind that sozud itself made sozu accept are
    remembered ("assumed") and added to later reads until sozu reconnects, so they are neither re-sent
    every sync nor mistaken for removals; :meth:`hides` tells the engine what the last read could not see.
    """

    def __init__(
        self,
        channel: SozuChannel,
        *,
        shared_dir: str | None = None,
        shared_dir_sozu_path: str | None = None,
        max_rounds: int = 3,
        max_removal_ratio: float = 0.5,
    ) -> None:
        self.channel = channel
        self.shared_dir = shared_dir
        self.shared_dir_sozu_path = shared_dir_sozu_path
        self.max_rounds = max_rounds
        self.max_removal_ratio = max_removal_ratio
        self._cache: tuple[int, object, ConfigState] | None = None
        self._last_read: LiveRead | None = None
        self._assumed: dict[ObjKey, Message] = {}
        self._assumed_epoch: int | None = None
        self._last_fingerprint: Fingerprint | None = None
        # The fingerprint taken just before the read that produced the last live state: anything that
        # changed after it is not in that state, so the daemon compares later probes against this one.
        self.read_fingerprint: Fingerprint | None = None
        self.restarts = 0
        self.stale_reads = 0  # fresh reads that found the cached one wrong (sozud.sync.SozuPort.stale_reads)
        self.live_version = 0  # bumped by every full read and every apply (sozud.sync.SozuPort.live_version)
        # Keep the live read after an apply that the request counters prove was ours alone: the daemon sets
        # it from ``[sync] incremental`` (default on); off for adapters built directly.
        self.keep_read_after_apply = False
        self._records = RecordCache()  # SaveState records of the last live read (a re-read decodes the new ones)
        self._clusters = ClusterReplies()  # without shared_dir: the cluster replies of the last read (by hash)
        self._restart_unverified = False  # the connection was lost before the counters after an apply were seen
        self.log = get_logger(socket=channel.socket_path)
        self._lock = asyncio.Lock()

    @property
    def version(self) -> SozuVersion:
        return self.channel.version

    @property
    def epoch(self) -> int:
        return self.channel.epoch

    async def probe(self) -> object:
        return self._observe(await probe(self.channel))

    def _observe(self, fp: Fingerprint) -> Fingerprint:
        """Count sozu restarts: after a re-connection, request counters that went backwards mean a new
        sozu main process (its counters start again from its configuration and saved state). A
        re-connection alone (a timeout, a protocol error) is not a restart."""
        last = self._last_fingerprint
        if last is not None and fp.epoch != last.epoch:
            before, now = dict(last.request_counts), dict(fp.request_counts)
            went_back = sum(now.values()) < sum(before.values()) or any(now.get(k, 0) < v for k, v in before.items())
            if went_back or self._restart_unverified:
                self._restart_unverified = False
                self.restarts += 1
                self.log.warning("sozu.restarted", epoch=fp.epoch, action="the shared state wins for the next sync")
        self._last_fingerprint = fp
        return fp

    async def _observe_after_apply(self) -> Fingerprint:
        """Take the counters again once an apply is done: they now include its requests, so a sozu that
        restarts right after (before any probe) still shows counters that went backwards. When that
        probe fails the connection went with it: the next re-connection counts as a restart."""
        try:
            return self._observe(await probe(self.channel))
        except SozuError:
            self._restart_unverified = True
            raise

    @property
    def records(self) -> RecordCache:
        """The SaveState records of the last live read (:attr:`sozud.sync_model.SozuPort.records`)."""
        return self._records

    @property
    def sees_all(self) -> bool:
        """The last live read saw everything (:attr:`sozud.sync_model.SozuPort.sees_all`)."""
        return self._last_read is None or self._last_read.exact

    def hides(self, key: ObjKey, value: Message | bytes) -> bool:
        """Whether the last live read could not have seen ``key`` even if sozu holds it."""
        return self._last_read is not None and self._last_read.hides(key, value)

    async def _read(self, *, fresh: bool = False) -> ConfigState:
        if fresh:
            self._clusters.forget()  # a full read trusts no cluster hash
        report = await read_live_report(
            self.channel,
            shared_dir=self.shared_dir,
            shared_dir_sozu_path=self.shared_dir_sozu_path,
            records=self._records,
            clusters=self._clusters,
        )
        self._last_read = report
        self.live_version += 1
        if self._assumed_epoch != self.channel.epoch:
            self._assumed.clear()  # sozu may have restarted: assume nothing
            self._assumed_epoch = self.channel.epoch
        state = report.state
        for k, v in self._assumed.items():
            if k not in state and report.hides(k, v):
                state.put(k, v)
        return state

    async def read_live(self, *, fresh: bool = False) -> ConfigState:
        """sozu's live state: the cached read while the probe says nothing changed, unless ``fresh``. The
        state is the cached one itself (no copy of the mapping per step): callers never modify it (they
        copy it first, see :meth:`~sozud.state.model.ConfigState.shallow_copy`)."""
        async with self._lock:
            # No explicit connect(): requests reconnect within their own timeout, so a sozu that is down
            # ends this read with an error naming the socket instead of waiting forever.
            fingerprint = self._observe(await probe(self.channel))
            self.read_fingerprint = fingerprint
            epoch = self.channel.epoch
            c = self._cache
            vouched = c if c is not None and c[0] == epoch and c[1] == fingerprint else None
            if vouched is not None and not fresh:
                return vouched[2]
            state = await self._read(fresh=fresh)
            if vouched is not None and not state.same_as(vouched[2]):
                self.stale_reads += 1
                self.log.warning(
                    "sozu.cached_read_stale",
                    differing_objects=len(diff(state, vouched[2])),
                    action="the fresh read is used; the probe did not show this change",
                )
            # The probe is taken before the read: a change racing with the read shows up next time.
            self._cache = (epoch, fingerprint, state)
            return state

    async def apply(
        self,
        desired: ConfigState,
        *,
        force: bool,
        desired_is_complete: bool,
        scope: Collection[ObjKey] | None = None,
    ) -> ApplyOutcome:
        async with self._lock:
            self.live_version += 1
            # Optimistic concurrency: the merged state was computed from the last read; if sozu changed
            # since (an operator's request), applying would revert that change. Send nothing; the next
            # sync reads it as a local change.
            snapshot = self._cache
            now = self._observe(await probe(self.channel))
            if snapshot is None or snapshot[0] != self.channel.epoch or snapshot[1] != now:
                self._cache = None
                raise LiveChangedError(
                    f"sozu at {self.channel.socket_path} changed while sozud was syncing; nothing was sent, "
                    "the next sync merges the change"
                )
            report = await apply_plan(
                self.channel,
                desired,
                max_rounds=self.max_rounds,
                shared_dir=self.shared_dir,
                shared_dir_sozu_path=self.shared_dir_sozu_path,
                max_removal_ratio=self.max_removal_ratio,
                force=force,
                desired_is_complete=desired_is_complete,
                initial=self._last_read,
                records=self._records,
                scope=scope,
                clusters=self._clusters,
            )
            after = await self._observe_after_apply()
            by_type: Counter[str] = Counter(report.requests_by_type)
            failures = [f"{f.summary}: {f.message}" for f in report.failures]
            if report.last_read is not None:
                self._last_read = report.last_read
            # the state the cache may keep: the caller's only as a copy when something is added to it
            live_after = report.live_after
            if self._last_read is not None and self._last_read.exact:
                self._assumed = {}  # an exact read hides nothing
            else:
                # converged (apply_plan raises otherwise): what sozu accepted from us but a read cannot
                # show is remembered for later reads
                self._assumed = {k: decode_value(k, v) for k, v in desired.raw_items() if self.hides(k, v)}
                hidden = {k: v for k, v in self._assumed.items() if k not in live_after and self.hides(k, v)}
                if hidden:
                    live_after = live_after.shallow_copy()
                    live_after.update(hidden)
            self._assumed_epoch = self.channel.epoch
            # Keep the prediction as the cached read only when nothing but our requests can have changed
            # sozu since the read it was predicted from (class docstring); else the next read is full.
            keep = self.keep_read_after_apply and self._prediction_holds(report, now, after)
            self._cache = (self.channel.epoch, after, report.live_after) if keep else None
            # the daemon's probe loop compares with this: None makes its next probe trigger one more sync
            self.read_fingerprint = None
            self.log.debug("sozu.apply_cache", kept=keep)
            return ApplyOutcome(
                requests_sent=sum(by_type.values()),
                requests_by_type=dict(by_type),
                plan_digest=report.plan_digest,
                live_after=live_after,
                failures=failures,
            )

    def _prediction_holds(self, report: ApplyReport, before: Fingerprint, after: Fingerprint) -> bool:
        """Whether ``report.live_after`` is what sozu holds at ``after``: every request accepted, nothing
        read again (every round predicted from an exact read), no batch, the same connection, and the
        request counters moved by exactly our requests (:func:`sozud.state.live.counts_explained`)."""
        last = report.last_read
        return (
            report.converged
            and not report.failures
            and not report.batches
            and report.live_reads == 0
            and last is not None
            and last.exact
            and before.epoch == after.epoch == self.channel.epoch
            and counts_explained(before, after, report.requests_by_type)
        )
