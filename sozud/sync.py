"""The sync engine: one step of keeping this node's sozu and the cluster's shared state identical.

Three states (docs: design.md), each a :class:`~sozud.state.model.ConfigState`:

- **live**: what the local sozu runs now (read over its command socket);
- **shared**: the cluster-wide copy in the OpenSVC config map key;
- **base**: the last shared state this node read *from OpenSVC* while its live sozu equalled it. It moves
  forward only when shared and live agree, never from this node's own push: if another node's push
  overwrote ours, ``diff(base, live)`` still holds our change and the next step pushes it again.

One step: ``local = live - base``, ``remote = shared - base``, ``merged = merge(base, live, shared)``;
apply ``merged - live`` to sozu; push ``merged`` when it differs from ``shared``; move base forward
when live and shared agree. A state already live and already shared causes no request and no push (echo
suppression). Bootstrap: shared missing or empty → live bootstraps it. No base yet (first start, or a base
file lost or damaged) → the union of live and shared (a merge against an empty base: nothing is removed, and
a key both sides hold with different values is a conflict resolved by the usual rule); base then moves
forward once this node reads back a shared state equal to its live one. Removals propagate only from a
known base, so a node never reverts a change its operator made while it was starting.

Safety: a shared state that does not parse is never applied; a shared state with fewer records than
its metadata promises (truncated) propagates no removal; an empty live state is never pushed; after a
sozu restart seen by this running sozud (sozu may have restarted empty or from a stale file) shared wins
for that step; plans
that remove more than ``max_removal_ratio`` of the live objects, or pushes that would drop more than
that share of the shared objects, are refused unless forced. A shared state written by a node of
another sozu family (0.15 vs 1.x vs 2.x: their state files differ) is refused: no mixed fleets.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import msgspec

from sozud.decision import Branch, Decision, decide, decide_own_push, decide_settled, drift, same_decision
from sozud.errors import SharedInFlightError, StateError, UnsafePlanError, VersionMismatchError
from sozud.layout import SharedData
from sozud.lineage import HISTORY, Lineage
from sozud.log import get_logger
from sozud.persist import BaseMeta, BaseStore, atomic_write
from sozud.state.codec import RecordCache, write_state_file
from sozud.state.model import ConfigState, ObjKey
from sozud.state.parts import PartsParse, PartsParser
from sozud.sync_model import (
    META_FORMAT,
    ApplyOutcome,
    SharedMeta,
    SharedPort,
    SozuPort,
    SyncInputs,
    SyncReport,
)
from sozud.versions import SozuVersion

__all__ = [
    "HISTORY",
    "META_FORMAT",
    "ApplyOutcome",
    "EngineSettings",
    "SharedData",
    "SharedMeta",
    "SharedPort",
    "SozuPort",
    "SyncEngine",
    "SyncInputs",
    "SyncReport",
]

# --- the engine ----------------------------------------------------------------------------------------


@dataclass
class EngineSettings:
    node: str
    object: str = "igw/cfg/sozu"
    key: str = "state.json"
    max_removal_ratio: float = 0.5
    force: bool = False
    # How long a shared state that does not match its metadata is taken for a write in progress (nothing
    # done) before it is handled as truncated (fewer records: additions only) or edited by hand.
    mismatch_grace_s: float = 5.0
    # A plain state file kept equal to the state sozu runs once in sync (sozu's saved_state: a restarted
    # sozu boots from it, since the shared state itself is sharded in OpenSVC).
    boot_state_file: str | None = None
    # Steps after a settled one cost what changed (docs/sync.md, "Incremental steps"); every periodic
    # resync and every ``full_check_every``-th step reads sozu in full and takes the full path. The daemon
    # takes it from ``[sync] incremental`` (default on); off here for engines built directly (tests).
    incremental: bool = False
    full_check_every: int = 100
    # Compute the full decision beside every incremental one and compare (tests; costs O(state)).
    verify_incremental: bool = False


@dataclass(frozen=True)
class _Settled:
    """What the last step left settled: live, the shared state it parsed and the base held the same
    objects; the adapter's ``live_version`` then (unchanged: its live read is the one that step ended
    with)."""

    shared: ConfigState
    equal: tuple[ConfigState, ...]  # states known to hold the same objects as ``shared`` (the base)
    live_version: int


@dataclass(frozen=True)
class _OwnPush:
    """What the last step left after a push that live holds (no drift, no refused request): the push's
    id and state, the shared state it replaced (the parser's previous state), the adapter's
    ``live_version`` then."""

    id: str
    state: ConfigState
    replaced: ConfigState
    live_version: int


class SyncEngine:
    """Runs sync steps; holds no I/O of its own besides its ports and the base store."""

    def __init__(self, sozu: SozuPort, shared: SharedPort, base: BaseStore, settings: EngineSettings) -> None:
        self.sozu = sozu
        self.shared = shared
        self.base = base
        self.settings = settings
        self.log = get_logger(node=settings.node)
        self._seen_restarts: int | None = None
        # The shared state's parts last parsed: a new shared state costs the parts that changed.
        self._parts = PartsParser(peer=sozu.records)
        self._shared_digest: tuple[ConfigState, str] | None = None  # the last shared state's digest, once computed
        self._settled: _Settled | None = None
        self._own_push: _OwnPush | None = None
        self._since_full_check = 0
        self.incremental_steps = 0  # steps that took the incremental path
        self.incremental_disagreements = 0  # stale cached reads found by a full check, and verify mismatches
        # The state/metadata mismatch being waited out, and since when (monotonic).
        self._mismatch: tuple[tuple[str, str, int, str], float] | None = None
        # Pushes this node's live held (bases, own pushes once applied): candidate merge bases.
        self.lineage = Lineage(self.log)
        self._boot_digest: str | None = None  # the digest of the state last written to the boot state file
        self._boot_state: ConfigState | None = None  # and that state itself
        self._caveat_logged = ""  # the shared port's caveat last logged (logged once while it lasts)
        # The records last written (pushes, boot file): a new state costs its new records.
        self._records = RecordCache()

    def _source(self) -> str:
        return f"opensvc {self.settings.object} key {self.settings.key}"

    async def sync_once(self, reason: str = "manual") -> SyncReport:
        """One step: read live, shared and base, :func:`decide`, then apply, push and move base."""
        started = time.monotonic()
        restarts = self.sozu.restarts
        restarted = self._seen_restarts is not None and restarts != self._seen_restarts
        settled, self._settled = self._settled, None  # set again only by a step that ends settled
        own, self._own_push = self._own_push, None  # set again only by a step that ends with a push live holds
        full_check = "periodic_resync" in reason.split(",") or self._since_full_check >= self.settings.full_check_every
        inputs = await self._read_inputs(restarted, settled, own, full_check, self.settings.verify_incremental)
        report = SyncReport(reason=reason, outcome="in_sync")
        decision = self._decide(inputs, restarted, report)
        if full_check:
            self._since_full_check = 0
        if inputs.stale_read:
            self.incremental_disagreements += 1
            report.incremental_disagreed = True
        report.generation = inputs.meta.generation if inputs.meta else 0
        report.origin = inputs.meta.origin if inputs.meta else ""
        report.conflicts = list(decision.conflicts)
        report.local_changes = decision.local_changes
        report.remote_changes = decision.remote_changes
        report.notes.append(decision.note)
        self._log_decision(decision, inputs)
        if decision.branch is Branch.BOOTSTRAP:
            await self._push(inputs.live, None, inputs.meta, report, lineage=None)
            report.outcome = "bootstrapped"
            self.lineage.remember(report.pushed_id, inputs.live)
            self._write_boot_file(inputs.live)
        elif decision.branch is not Branch.NOTHING:
            await self._execute(decision, inputs, report)
        self._seen_restarts = restarts
        report.duration_s = time.monotonic() - started
        return report

    def _decide(self, inputs: SyncInputs, restarted: bool, report: SyncReport) -> Decision:
        """:func:`decide`, or, when the step is incremental, :func:`decide_settled`; ``verify_incremental``
        computes both and takes the full one when they disagree (counted and logged)."""

        def full() -> Decision:
            return decide(
                live=inputs.live,
                shared=inputs.shared,
                base=inputs.merge_base,
                complete=inputs.complete,
                restarted=restarted,
                repair=inputs.repair,
            )

        if inputs.changed is None or inputs.shared is None:
            return full()
        if inputs.own_push:
            fast = decide_own_push(inputs.shared, inputs.changed)
        else:
            fast = decide_settled(inputs.shared, inputs.changed)
        if self.settings.verify_incremental:
            checked = full()
            if not same_decision(fast, checked):
                self.incremental_disagreements += 1
                report.incremental_disagreed = True
                self.log.warning(
                    "sync.incremental_disagreed",
                    incremental_objects=len(fast.desired),
                    full_objects=len(checked.desired),
                    differing_objects=drift(fast.desired, checked.desired),
                    action="the full decision is taken",
                )
                inputs.changed = None  # the rest of the step (apply, drift check) looks at the whole state
                return checked
        self.incremental_steps += 1
        self._since_full_check += 1
        report.incremental = True
        return fast

    async def _read_inputs(
        self, restarted: bool, settled: _Settled | None, own: _OwnPush | None, full_check: bool, verify: bool
    ) -> SyncInputs:
        # A full check reads sozu in full (the adapter compares it with the read the probe vouched for)
        # and takes the full path: anti-entropy for everything the incremental path takes on trust.
        stale = self.sozu.stale_reads
        live = await self.sozu.read_live(fresh=full_check)
        stale_read = self.sozu.stale_reads != stale
        version = self.sozu.version
        data, meta_bytes = await self.shared.read()
        meta = self._parse_meta(meta_bytes)
        if meta is not None and meta.sozu_family != version.family.value:
            raise VersionMismatchError(
                f"{self._source()} was written by node {meta.origin!r} running sozu {meta.sozu_version} "
                f"({meta.sozu_family}); this node runs sozu {version} ({version.family.value}). Their state "
                "files differ: a mixed fleet is not supported; upgrade the nodes to one sozu family"
            )
        shared: ConfigState | None = None
        parsed: PartsParse | None = None
        complete = True
        lineage: SharedMeta | None = None  # the metadata, when it describes this very state
        caveat = self.shared.caveat
        shared_digest = ""
        if data is not None and not data.is_blank():
            parsed = self._parts.parse(data, version, source=self._source())
            shared = parsed.state
            if caveat:
                complete = False
                if caveat != self._caveat_logged:
                    self.log.warning("shared.partial", reason=caveat, action="additions only, then a push repairs it")
            elif meta is not None and data.vouched:
                lineage, shared_digest = meta, meta.digest  # the layout checked every part against the manifest
                self._shared_digest = (shared, shared_digest)  # a push naming it as its parent needs no O(state) digest
            elif meta is not None:
                shared_digest = self._digest_of(shared)
                if meta.digest == shared_digest:
                    lineage = meta
                else:
                    complete = self._check_mismatch(data, shared_digest, meta)
        self._caveat_logged = caveat
        loaded = self._load_base(version)
        base, base_meta = loaded if loaded is not None else (None, BaseMeta())
        if base is not None and base_meta.shared_id:
            self.lineage.remember(base_meta.shared_id, base)
        merge_base = base
        if shared is not None and complete and not restarted:
            merge_base, complete = self.lineage.merge_base(base, lineage)
        repair = bool(caveat) and shared is not None
        changed: frozenset[ObjKey] | None = None
        own_push = False
        if (
            self.settings.incremental
            and parsed is not None
            and parsed.changed is not None
            and complete
            and not repair
            and not restarted
            and not full_check
        ):
            live_version = self.sozu.live_version
            if (
                settled is not None
                and parsed.previous is settled.shared
                and any(merge_base is s for s in settled.equal)
                and live_version == settled.live_version
            ):
                # live, the merge base and the previous shared state are one state: only what shared
                # changed can differ (docs/sync.md, "Incremental steps")
                changed = parsed.changed
            elif (
                own is not None
                and parsed.previous is own.replaced
                and lineage is not None
                and lineage.id == own.id
                and merge_base is own.state
                and live_version == own.live_version
            ):
                # shared is our own push read back (the layout vouched for it), live has not changed since
                # and held it, and the merge base is that push: one state; the base store moves to it
                changed, own_push = parsed.changed, True
        if merge_base is not None:
            # What the live read cannot see is unknown, not removed: keep the merge base's view of it.
            live = self._with_hidden(live, merge_base, None if (changed is None or full_check or verify) else changed)
        inputs = SyncInputs(live, shared, meta, lineage, complete, repair, base, base_meta, merge_base)
        if data is not None and shared is not None:
            inputs.shared_data, inputs.shared_digest = data, shared_digest
        inputs.changed = changed
        inputs.own_push = own_push
        inputs.stale_read = stale_read
        inputs.previous = parsed.previous if parsed is not None else None
        return inputs

    def _with_hidden(self, live: ConfigState, source: ConfigState, keys: Collection[ObjKey] | None) -> ConfigState:
        """``live`` with the objects of ``source`` (among ``keys``; None: all) that the last live read could
        not have seen. A copy when there are any: ``live`` may be the port's cached read, never modified."""
        if self.sozu.sees_all:
            return live  # an exact read (SaveState): nothing to look for, whatever the number of keys
        hidden: dict[ObjKey, bytes] = {}
        for k in source if keys is None else keys:
            v = source.raw(k)
            if v is not None and k not in live and self.sozu.hides(k, v):
                hidden[k] = v
        if not hidden:
            return live
        out = live.shallow_copy()
        for k, v in hidden.items():
            out.put_raw(k, v)
        return out

    def _check_mismatch(self, data: SharedData, digest: str, meta: SharedMeta) -> bool:
        """A state whose digest is not its metadata's: wait while it may be a write in progress, then
        tell truncated (False: additions only) from edited by hand (True)."""
        if self._still_settling(digest, meta):
            # A state from one write and metadata from another (the pair is two keys, written one after
            # the other, by any node): acting on it could take an older state for a newer one and
            # propagate its "removals". Wait for the pair to settle.
            raise SharedInFlightError(
                f"{self._source()} and its metadata key do not match yet (metadata written by "
                f"{meta.origin!r}, generation {meta.generation}): a write is probably in progress; "
                "nothing was applied or pushed, the next sync reads them again"
            )
        records = sum(part.count(b"\0") for _, part in data.parts)
        if records < meta.records:
            self.log.warning(
                "shared.looks_truncated",
                records=records,
                meta_records=meta.records,
                meta_origin=meta.origin,
                action="additions only; no removal propagates from this state",
            )
            return False
        self.log.info("shared.edited_outside_sozud", meta_origin=meta.origin)
        return True

    def _log_decision(self, decision: Decision, inputs: SyncInputs) -> None:
        live, shared = inputs.live, inputs.shared
        for c in decision.conflicts:
            self.log.warning("sync.conflict", **c.as_log())
        if decision.branch is Branch.BOOTSTRAP:
            self.log.info("sync.bootstrapped", objects=len(live))
        elif decision.branch is Branch.UNION and shared is not None:
            self.log.info(
                "sync.first_union",
                live_only_objects=len(live.keys() - shared.keys()),
                shared_only_objects=len(shared.keys() - live.keys()),
                conflicts=len(decision.conflicts),
            )
        elif decision.branch is Branch.SHARED_WINS and shared is not None:
            dropped = len(live.keys() - shared.keys())
            if dropped:
                self.log.info("sync.shared_wins", reason="sozu restarted", live_only_objects=dropped)

    async def _execute(self, decision: Decision, inputs: SyncInputs, report: SyncReport) -> None:
        """Apply the decision to sozu, push it, and move base forward when live and shared agree.

        An incremental step (``inputs.changed``) looks only at the changed keys: everywhere else live,
        shared and the merge base are known to be one state."""
        merged, live, shared, meta = decision.desired, inputs.live, inputs.shared, inputs.meta
        scope = inputs.changed
        assert shared is not None
        live_after = live
        differs = not merged.same_as(live) if scope is None else any(live.get(k) != merged.get(k) for k in scope)
        if differs:
            outcome = await self.sozu.apply(
                merged, force=self.settings.force, desired_is_complete=decision.complete, scope=scope
            )
            report.requests_sent = outcome.requests_sent
            report.requests_by_type = outcome.requests_by_type
            report.plan_digest = outcome.plan_digest
            report.failures = list(outcome.failures)
            live_after = self._with_hidden(outcome.live_after, merged, scope)
        if decision.push:
            if len(merged) == 0:
                raise UnsafePlanError(
                    f"refusing to push an empty state to {self._source()} (it would wipe every node); "
                    "add the objects back, or write the key by hand if this is really wanted"
                )
            self._check_push_removals(shared, merged)
            # The push descends from shared's metadata only when shared is that metadata's state (or an
            # edit of it): a truncated or torn state is not, and claiming it would let readers that know
            # the metadata's push take what the state lacks for removals.
            ancestry = inputs.lineage or (meta if inputs.complete else None)
            await self._push(merged, shared, meta, report, lineage=ancestry)
        if scope is None:
            report.drift = drift(live_after, merged)
        else:
            report.drift = sum(1 for k in scope if live_after.get(k) != merged.get(k))
        if report.drift == 0 and report.pushed_id:
            # live holds our push: a state later pushes may descend from, a merge base for later syncs
            self.lineage.remember(report.pushed_id, merged)
            if not report.failures:
                self._own_push = _OwnPush(report.pushed_id, merged, shared, self.sozu.live_version)
        if not report.pushed and report.drift == 0:
            base = self._move_base(inputs)
            if not report.failures:
                self._settled = _Settled(shared, (shared, base), self.sozu.live_version)
        if report.drift == 0:
            self._write_boot_file(merged)
        report.outcome = {
            (False, False): "in_sync",
            (True, False): "applied",
            (False, True): "pushed",
            (True, True): "applied+pushed",
        }[(report.requests_sent > 0, report.pushed)]

    def _write_boot_file(self, state: ConfigState) -> None:
        path = self.settings.boot_state_file
        if path is None or state is self._boot_state:
            return
        digest = state.digest()
        if digest == self._boot_digest:
            self._boot_state = state
            return
        try:
            atomic_write(Path(path), write_state_file(state, cache=self._records), mode=0o600)
        except OSError as e:
            self.log.warning("sync.boot_state_file_failed", path=path, error=e.strerror or str(e))
            return
        self._boot_digest, self._boot_state = digest, state

    def _move_base(self, inputs: SyncInputs) -> ConfigState:
        """Live equals shared: shared becomes the base (never from this node's own push). Returns the
        base now (an equal older one is kept)."""
        shared, base, base_meta = inputs.shared, inputs.base, inputs.base_meta
        assert shared is not None
        shared_id = inputs.lineage.id if inputs.lineage is not None else ""
        unchanged = base is shared or (base is not None and inputs.changed is None and base.same_as(shared))
        if base is not None and base_meta.shared_id == shared_id and unchanged:
            return base
        if shared_id:
            self.lineage.remember(shared_id, shared)
        base_meta.shared_id = shared_id
        base_meta.generation = inputs.meta.generation if inputs.meta else 0
        base_meta.sozu_version = str(self.sozu.version)
        base_meta.saved_at = time.time()
        data = inputs.shared_data
        # as the shared state's parts: a change rewrites the parts it touched, not the whole base
        self.base.save(
            shared, base_meta, parts=data.parts if data is not None else None, digest=inputs.shared_digest or None
        )
        return shared

    async def push_live(self) -> tuple[SyncReport, str]:
        """Rewrite the shared state from this node's live sozu (the operator's repair of a shared key that
        does not parse, or was written by another sozu family). The removal valve applies against the
        current shared state when it parses (``settings.force`` overrides it). Returns the report and a
        description of what was replaced."""
        started = time.monotonic()
        live = await self.sozu.read_live()
        version = self.sozu.version
        if len(live) == 0:
            raise UnsafePlanError(
                f"this node's sozu holds no object: refusing to push an empty state to {self._source()}"
            )
        try:
            data, meta_bytes = await self.shared.read()
        except StateError as e:  # the layout itself is unreadable (a mangled manifest or shard)
            data, meta_bytes = None, None
            unreadable: str | None = str(e)
        else:
            unreadable = None
        meta = self._parse_meta(meta_bytes)
        if meta is not None and meta.sozu_family != version.family.value:
            meta = None  # another family's lineage means nothing here
        shared: ConfigState | None = None
        replaced = "no shared state" if unreadable is None else f"a shared state that cannot be read ({unreadable})"
        if data is not None and not data.is_blank():
            try:
                shared = self._parts.parse(data, version, source=self._source()).state
                replaced = f"a shared state of {len(shared)} objects"
            except StateError as e:
                replaced = f"a shared state that does not parse ({e})"
        if shared is not None:
            self._check_push_removals(shared, live)
        report = SyncReport(reason="push --from-live", outcome="pushed")
        await self._push(live, shared, meta, report, lineage=meta)  # live replaces what meta describes
        self.lineage.remember(report.pushed_id, live)
        report.local_changes = len(live)
        report.duration_s = time.monotonic() - started
        self.log.warning("sync.pushed_from_live", objects=len(live), replaced=replaced, generation=report.generation)
        return report, replaced

    def _still_settling(self, digest: str, meta: SharedMeta) -> bool:
        """Whether a state/metadata mismatch is recent enough to be a write in progress: the same pair
        (state digest, metadata generation and origin) seen mismatched for less than the grace period."""
        pair = (digest, meta.digest, meta.generation, meta.origin)
        now = time.monotonic()
        if self._mismatch is None or self._mismatch[0] != pair:
            self._mismatch = (pair, now)
        return now - self._mismatch[1] < self.settings.mismatch_grace_s

    def _load_base(self, version: SozuVersion) -> tuple[ConfigState, BaseMeta] | None:
        """The persisted base; a base that cannot be read or does not match its digest counts as none
        (the next sync is a union, which removes nothing) and is set aside for inspection."""
        try:
            return self.base.load(version)
        except StateError as e:
            kept = self.base.set_aside()
            self.log.warning(
                "base.unusable",
                error=str(e),
                kept_as=kept,
                action="treated as no base: the next sync keeps every object of live and shared (no removal)",
            )
            return None

    def _digest_of(self, state: ConfigState) -> str:
        """``state.digest()``, computed once per shared state (a state the parser returns is never modified)."""
        c = self._shared_digest
        if c is None or c[0] is not state:
            c = self._shared_digest = (state, state.digest())
        return c[1]

    def _parse_meta(self, meta_bytes: bytes | None) -> SharedMeta | None:
        if not meta_bytes or not meta_bytes.strip():
            return None
        try:
            return msgspec.json.decode(meta_bytes, type=SharedMeta)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError) as e:
            self.log.warning("shared.meta_unreadable", key=self.settings.key + " meta", error=str(e))
            return None

    def _check_push_removals(self, shared: ConfigState, merged: ConfigState) -> None:
        if self.settings.force or len(shared) == 0:
            return
        removed = len(shared.keys() - merged.keys())
        if removed > self.settings.max_removal_ratio * len(shared):
            raise UnsafePlanError(
                f"pushing would remove {removed} of the {len(shared)} objects of {self._source()} "
                f"(more than max_removal_ratio={self.settings.max_removal_ratio}); refused. "
                "If this node's sozu lost its configuration, it will be repaired from the shared state "
                "once sozud sees it reconnect; if the removal is intended, run with --force"
            )

    async def _push(
        self,
        state: ConfigState,
        parent: ConfigState | None,
        parent_meta: SharedMeta | None,
        report: SyncReport,
        *,
        lineage: SharedMeta | None,
    ) -> None:
        """Push ``state``, derived from ``parent`` (whose metadata is ``parent_meta``: the generation
        follows it); its ancestors are ``lineage``'s id and ancestors (none when None)."""
        data = write_state_file(state, cache=self._records)
        version = self.sozu.version
        meta = SharedMeta(
            generation=(parent_meta.generation if parent_meta else 0) + 1,
            origin=self.settings.node,
            id=secrets.token_hex(8),
            parent=self._digest_of(parent) if parent is not None else "",
            ancestors=Lineage.ancestors(lineage) if parent is not None else [],
            digest=state.digest(),
            records=data.count(b"\0"),
            sozu_family=version.family.value,
            sozu_version=str(version),
            written_at=time.time(),
        )
        # The meta value is JSON on one line: end it with a newline (the agent expands single-line values).
        await self.shared.write(data, msgspec.json.encode(meta) + b"\n")
        report.pushed = True
        report.pushed_id = meta.id
        report.generation = meta.generation
        report.origin = meta.origin
