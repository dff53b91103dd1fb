"""Three-way merge of sozu states (design.md: base, live = local side, shared = remote side).

For every object key, compare each side with ``base``; a side *changed* the key when its value
differs from base's (absent counts as a value: adding and removing are changes).

- neither side changed it: base's value stays;
- one side changed it: that change wins (an addition, a new value or a removal);
- both made the same change (same value, or both removed it): that value, and no conflict;
- both changed it differently: a **conflict**, resolved by a rule that does not depend on which side
  is local, so every node computes the same merged state:

  1. a change beats a removal: an object one side still changed is never removed;
  2. between two different values, the one with the greater :func:`model.value_digest` wins.

  Each conflict is reported as a :class:`Conflict` naming the key and both sides (as digests and
  short descriptions, never the values: they may hold private keys).

Objects are merged independently, as sozu stores them; relations are not checked (orphans are
state). Consequence worth knowing: certificates are keyed by fingerprint, so two nodes renewing the
same certificate differently both add theirs (two certificates, old one removed), with no conflict.
The merged state carries ``live.version``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sozud.state.model import ConfigState, ObjKey, describe, value_digest

__all__ = ["Conflict", "MergeResult", "merge"]

REMOVED = "removed"


@dataclass(frozen=True)
class Conflict:
    """One key changed differently on both sides, and how it was resolved.

    Equality and hashing use only the side-independent fields (``key``, ``sides``, ``winner``,
    ``rule``), so ``merge(base, a, b)`` and ``merge(base, b, a)`` report equal conflicts; ``local`` and
    ``remote`` say which side was which on this node. A side is ``"removed"`` or ``"sha256:<digest>"``.
    """

    key: ObjKey
    sides: tuple[str, str]  # the two sides, sorted
    winner: str  # the side kept
    rule: str  # "change beats removal" | "greater digest"
    local: str = field(compare=False)
    remote: str = field(compare=False)

    @property
    def what(self) -> str:
        return describe(self.key)

    def as_log(self) -> dict[str, Any]:
        """Key=value context for a ``sync.conflict`` log event (no secrets)."""
        return {
            "object": self.what,
            "local": self.local,
            "remote": self.remote,
            "kept": "local" if self.winner == self.local else "remote",
            "rule": self.rule,
        }

    def __str__(self) -> str:
        kept = "local" if self.winner == self.local else "remote"
        return f"{self.what}: local {self.local} vs remote {self.remote}; kept {kept} ({self.rule})"


@dataclass
class MergeResult:
    state: ConfigState
    conflicts: list[Conflict]
    local_changes: int  # keys live changed relative to base
    remote_changes: int  # keys shared changed relative to base


def _side(value: bytes | None) -> str:
    return REMOVED if value is None else "sha256:" + value_digest(value)


def merge(base: ConfigState, live: ConfigState, shared: ConfigState) -> MergeResult:
    """Merge the local changes (``live`` vs ``base``) with the remote ones (``shared`` vs ``base``)."""
    b, lo, sh = base.raw_map(), live.raw_map(), shared.raw_map()  # values compared as canonical bytes
    objects: dict[ObjKey, bytes] = {}
    conflicts: list[Conflict] = []
    local_changes = remote_changes = 0
    for key in sorted(set(b) | set(lo) | set(sh)):
        bv, lv, sv = b.get(key), lo.get(key), sh.get(key)
        local_changed = lv != bv
        remote_changed = sv != bv
        local_changes += local_changed
        remote_changes += remote_changed
        if not remote_changed:
            value = lv
        elif not local_changed or lv == sv:
            value = sv
        else:
            value, rule = _resolve(lv, sv)
            ls, rs = _side(lv), _side(sv)
            conflicts.append(
                Conflict(
                    key=key,
                    sides=(min(ls, rs), max(ls, rs)),
                    winner=_side(value),
                    rule=rule,
                    local=ls,
                    remote=rs,
                )
            )
        if value is not None:
            objects[key] = value
    return MergeResult(ConfigState.from_raw(live.version, objects), conflicts, local_changes, remote_changes)


def _resolve(a: bytes | None, b: bytes | None) -> tuple[bytes | None, str]:
    """The side-independent choice between two different changes of one key."""
    if a is None:
        return b, "change beats removal"
    if b is None:
        return a, "change beats removal"
    return (a if value_digest(a) > value_digest(b) else b), "greater digest"
