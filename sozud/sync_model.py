"""What the sync engine (:mod:`sozud.sync`) talks to and what it reports: its two ports (the local sozu,
the shared state in OpenSVC), the metadata written beside the shared state, the inputs one step reads
and the report it returns. Types only; :mod:`sozud.sync` re-exports them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from google.protobuf.message import Message

from sozud.layout import SharedData
from sozud.persist import BaseMeta
from sozud.state.merge import Conflict
from sozud.state.model import ConfigState, ObjKey
from sozud.state.records import RecordCache
from sozud.versions import SozuVersion

META_FORMAT = 1


# --- ports -----------------------------------------------------------------------------------------


class SozuPort(Protocol):
    """The local sozu, as the engine needs it (implemented over the command channel)."""

    @property
    def version(self) -> SozuVersion: ...

    @property
    def restarts(self) -> int:
        """How many times sozu was seen to restart (a new main process) since sozud started."""
        ...

    async def read_live(self, *, fresh: bool = False) -> ConfigState:
        """The live state; ``fresh``: read sozu in full even when a cheap probe says nothing changed (the
        engine's periodic full check). It may be the port's cached read: never modify it, copy it."""
        ...

    @property
    def stale_reads(self) -> int:
        """Fresh reads that found sozu holding something else than the cached read its probe vouched for
        (should stay 0: each one is counted as an incremental disagreement)."""
        ...

    @property
    def live_version(self) -> int:
        """Changes whenever what :meth:`read_live` returns may differ from what it returned (or an
        apply left) before: equal values mean the same live state."""
        ...

    def hides(self, key: ObjKey, value: Message | bytes) -> bool:
        """Whether the last live read could not have seen this object even if sozu holds it."""
        ...

    @property
    def sees_all(self) -> bool:
        """True when :meth:`hides` is False for every object (the last live read saw everything)."""
        ...

    @property
    def records(self) -> RecordCache | None:
        """The record cache of its live reads, if it keeps one: the engine's parses of the shared state take
        the messages of the records it holds from it, so live and shared states share them."""
        ...

    async def apply(
        self,
        desired: ConfigState,
        *,
        force: bool,
        desired_is_complete: bool,
        scope: Collection[ObjKey] | None = None,
    ) -> ApplyOutcome:
        """Make sozu hold ``desired``; ``scope``: the caller knows live already equals ``desired`` outside
        these keys."""
        ...


@dataclass
class ApplyOutcome:
    requests_sent: int
    requests_by_type: dict[str, int]
    plan_digest: str
    live_after: ConfigState  # may be the adapter's cached read (shared): never modify it, copy it
    failures: list[str] = field(default_factory=list)  # requests sozu answered FAILURE to (summary: message)


class SharedPort(Protocol):
    """The shared state in OpenSVC: the state key and its metadata key."""

    async def read(self) -> tuple[SharedData | None, bytes | None]:
        """(the state or None when absent, meta bytes or None when absent)."""
        ...

    async def write(self, state: bytes, meta: bytes) -> None:
        """Write the state key, then the metadata key (one write at a time)."""
        ...

    @property
    def caveat(self) -> str:
        """Why the state the last :meth:`read` returned may not be the one its metadata describes (a torn
        sharded layout, a plain key rewritten by an older sozud), "" when it is: no removal propagates
        from it, and the next step pushes to repair it."""
        ...


class SharedMeta(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """The metadata key written beside the state key (never inside the state file)."""

    format: int = META_FORMAT
    generation: int
    origin: str
    parent: str
    # This push's id, and the ids of the pushes it descends from, newest first (parent first), at most
    # HISTORY: a reader tells a state derived from one it knows from one that overwrote it (ids, not
    # content digests: the same content pushed twice is two events).
    id: str = ""
    ancestors: list[str] = []
    digest: str
    records: int
    sozu_family: str
    sozu_version: str
    written_at: float


# --- reports -----------------------------------------------------------------------------------------


@dataclass
class SyncReport:
    reason: str
    outcome: str  # "in_sync", "applied", "pushed", "applied+pushed", "bootstrapped"
    requests_sent: int = 0
    requests_by_type: dict[str, int] = field(default_factory=dict)
    pushed: bool = False
    pushed_id: str = ""  # the id of what this step pushed
    plan_digest: str = ""
    conflicts: list[Conflict] = field(default_factory=list)
    local_changes: int = 0
    remote_changes: int = 0
    generation: int = 0
    origin: str = ""
    drift: int = 0  # objects that differ between live and shared after the step
    failures: list[str] = field(default_factory=list)  # requests sozu refused (its main state may hold them)
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    incremental: bool = False  # the step took the incremental path (docs/sync.md, "Incremental steps")
    incremental_disagreed: bool = False  # a full check found the incremental decision wrong

    @property
    def in_sync(self) -> bool:
        return self.drift == 0

    def as_log(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "outcome": self.outcome,
            "requests": self.requests_sent,
            "requests_by_type": self.requests_by_type,
            "pushed": self.pushed,
            "plan_hash": self.plan_digest[:16],
            "conflicts": len(self.conflicts),
            "local_changes": self.local_changes,
            "remote_changes": self.remote_changes,
            "generation": self.generation,
            "drift": self.drift,
            "failures": self.failures,
            "duration_ms": round(self.duration_s * 1000, 1),
            "path": "incremental" if self.incremental else "full",
        }


@dataclass
class SyncInputs:
    """What one step read: live (with what the read cannot see filled in), shared and its metadata, the
    persisted base and the merge base chosen for shared."""

    live: ConfigState
    shared: ConfigState | None
    meta: SharedMeta | None
    lineage: SharedMeta | None  # ``meta`` when it describes ``shared`` (same digest)
    complete: bool
    repair: bool  # shared's layout must be rewritten (see SharedPort.caveat)
    base: ConfigState | None
    base_meta: BaseMeta
    merge_base: ConfigState | None
    shared_data: SharedData | None = None  # what ``shared`` was parsed from
    shared_digest: str = ""  # ``shared.digest()`` when known without computing it ("" otherwise)
    # An incremental step: the keys where shared differs from ``previous``, the shared state the last
    # (settled) step parsed, which live and the merge base equal (None: a full step)
    changed: frozenset[ObjKey] | None = None
    previous: ConfigState | None = None
    # ... or shared is this node's own last push read back, live unchanged since, the merge base that push:
    # all three equal; ``changed`` are the keys where the push differs from ``previous``, the shared state
    # it replaced (the base store's state until this step moves it)
    own_push: bool = False
    stale_read: bool = False  # a full check found the read the probe vouched for wrong (SozuPort.stale_reads)
