"""The sync decision, pure: what one step should make live and shared hold, from the live state, the
shared state and the merge base. No I/O; the engine (:mod:`sozud.sync`) reads the inputs and carries the
decision out. Branches: nothing to do, bootstrap (no shared state), union (no merge base: nothing is
removed), shared wins (sozu restarted), three-way merge (additions only when shared may be incomplete).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sozud.state.merge import Conflict, MergeResult, merge
from sozud.state.model import ConfigState, ObjKey
from sozud.state.plan import diff


def drift(a: ConfigState, b: ConfigState) -> int:
    """How many objects differ between two states (present in one only, or different)."""
    return len(diff(a, b))


class Branch(enum.Enum):
    NOTHING = "nothing"  # no shared state and an empty live sozu
    BOOTSTRAP = "bootstrap"  # no shared state: live becomes it
    UNION = "union"  # no merge base (first start, base lost): live and shared, nothing removed
    SHARED_WINS = "shared_wins"  # sozu restarted: shared repairs it
    MERGE = "merge"  # three-way merge against the merge base


@dataclass(frozen=True)
class Decision:
    branch: Branch
    desired: ConfigState  # what live and shared should both hold
    complete: bool  # whether live objects missing from ``desired`` may be removed
    push: bool  # ``desired`` differs from the shared state (or there is none)
    conflicts: tuple[Conflict, ...] = ()
    local_changes: int = 0
    remote_changes: int = 0
    note: str = ""


def decide(
    *,
    live: ConfigState,
    shared: ConfigState | None,
    base: ConfigState | None,
    complete: bool = True,
    restarted: bool = False,
    repair: bool = False,
) -> Decision:
    """What one sync step should make live and shared hold. Pure: no I/O, inputs are not modified.

    ``base`` is the merge base (the newest state both sides are known to descend from, see
    :meth:`sozud.lineage.Lineage.merge_base`), None when there is none; ``complete`` is False when removals from
    ``shared`` must not propagate (truncated, or not descended from anything this node knows): shared is
    then merged with the base's objects added back. ``restarted``: sozu restarted since the last step.
    ``repair``: shared's layout must be rewritten (torn shards, a plain key from an older sozud): the
    merged state is pushed even when it equals shared.
    """
    if shared is None:
        if len(live) == 0:
            return Decision(Branch.NOTHING, live, True, False, note="no shared state and an empty live sozu")
        return Decision(Branch.BOOTSTRAP, live, True, True, local_changes=len(live), note="bootstrapped from live")
    if base is None:
        # Nothing says what was removed, so nothing is: a merge against an empty base (each side only
        # adds); a key both sides hold with different values is a conflict resolved by the usual rule.
        result = merge(ConfigState(live.version), live, shared)
        return _from_merge(Branch.UNION, result, shared, complete, repair, "no merge base: union of live and shared")
    if restarted:
        return Decision(
            Branch.SHARED_WINS,
            shared,
            complete,
            False,
            remote_changes=drift(live, shared),
            note="shared state wins: sozu restarted",
        )
    effective = shared
    if not complete:
        effective = shared.shallow_copy()
        for k, v in base.items():
            if k not in effective:
                effective.put(k, v)
    return _from_merge(Branch.MERGE, merge(base, live, effective), shared, complete, repair, "three-way merge")


def _from_merge(
    branch: Branch, result: MergeResult, shared: ConfigState, complete: bool, repair: bool, note: str
) -> Decision:
    return Decision(
        branch,
        result.state,
        complete,
        repair or not result.state.same_as(shared),
        tuple(result.conflicts),
        result.local_changes,
        result.remote_changes,
        note,
    )


def decide_settled(shared: ConfigState, changed: frozenset[ObjKey]) -> Decision:
    """:func:`decide` for an incremental step, in O(``changed``): live and the merge base are the shared
    state the last settled step read, and ``changed`` are the keys where ``shared`` differs from it.
    With live equal to the base, the merge takes every remote change and nothing else: no conflict, no
    local change, nothing to push (``shared`` is the merged state)."""
    return Decision(
        Branch.MERGE,
        shared,
        True,
        False,
        remote_changes=len(changed),
        note=f"three-way merge (incremental: {len(changed)} changed object{'s' if len(changed) != 1 else ''})",
    )


def decide_own_push(shared: ConfigState, changed: frozenset[ObjKey]) -> Decision:
    """:func:`decide` for the step that reads back this node's own push, in O(``changed``): live is the
    pushed state, ``shared`` is it read back, and the merge base is the push itself (the lineage knows it by
    its id). All three are one state: no conflict, no change, nothing to push. ``changed`` are the keys
    where the push differs from the shared state it replaced (the base store's state until this step)."""
    return Decision(
        Branch.MERGE,
        shared,
        True,
        False,
        note=f"three-way merge (incremental: own push read back, {len(changed)} object(s) changed by it)",
    )


def same_decision(a: Decision, b: Decision) -> bool:
    """Whether two decisions ask for the same thing (their notes aside)."""
    return (
        a.branch is b.branch
        and a.complete == b.complete
        and a.push == b.push
        and a.conflicts == b.conflicts
        and (a.local_changes, a.remote_changes) == (b.local_changes, b.remote_changes)
        and a.desired.same_as(b.desired)
    )
