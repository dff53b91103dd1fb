"""The delta between two states as an ordered list of sozu requests (docs/sozu-command-protocol.md §9.2).

:func:`plan` turns ``live`` (what sozu runs) and ``desired`` into the requests that take sozu from one
to the other, in an order sozu's main state and workers accept, with as few requests as sozu's
identity rules allow.

Order (make before break)
    1. new listeners: ``add_*_listener`` then ``activate_listener`` when desired active;
    2. changed listeners: 2.x ``update_*_listener`` when every changed field can be patched (see
       ``_listener_patch`` in :mod:`sozud.state.plan_builder`), plus ``activate_listener`` when it
       becomes active; otherwise the rebuild of §9.2: remove its frontends (and, HTTPS, its
       certificates), ``deactivate_listener`` when active, ``remove_listener``, ``add_*_listener``,
       ``activate_listener`` when desired active;
       its frontends and certificates come back in steps 4 and 6;
    3. new and changed clusters: ``add_cluster`` (an upsert);
    4. certificates: a renewal (same address and names, new fingerprint) is one ``replace_certificate``;
       a changed certificate with the same fingerprint (names, versions, chain) is one
       ``replace_certificate`` whose old and new fingerprints are equal; new ones ``add_certificate``;
    5. new and changed backends: ``add_backend`` (an upsert on (cluster_id, backend_id, address));
    6. frontends: a changed HTTP/HTTPS frontend is removed (with its *stored* values, position
       included: workers remove by hostname, path, method and position) then added; new ones added;
       TCP/UDP frontends, see below;
    7. removals, in reverse dependency order: frontends, backends, certificates, clusters, then
       listeners (``deactivate_listener`` when active, then ``remove_listener``); last, listeners that
       stay but become inactive are deactivated. Frontends and certificates that ``desired`` keeps on
       the address of a removed listener are left alone: sozu's main state keeps such orphans, and
       ``desired`` asks for them.

TCP/UDP frontends
    sozu's main state refuses a duplicate (cluster_id, address, tags) but ``remove_tcp_frontend``
    removes *every* frontend of the cluster at that address, whatever its tags (``retain(|f|
    f.address != address)`` in ``command/src/state.rs``, identical for UDP). So all frontends of one
    (cluster_id, address) group are planned together: when any of them goes, one remove request
    clears the group and the ones that must stay are added again right after.

Backends
    The main state removes a backend by (cluster_id, backend_id, address), but workers remove by
    (cluster_id, address) (§7.2): removing one of two backends that share an address in a cluster
    would take both out of the workers. The survivor is sent again (``add_backend``, a no-op on the
    main state) right after the removals.

Cost (requests per changed object)
    One request: a new, changed (upsert) or removed cluster or backend; a new or removed HTTP/HTTPS
    frontend, certificate or inactive listener; a renewed or otherwise changed certificate
    (``replace_certificate``); an activation change; a patchable 2.x listener change (plus one
    when its activation changes too); a new TCP/UDP frontend; the removal of the last frontend of a
    (cluster_id, address) group. More than one:

    - a new active listener: 2 (add, activate); removing an active listener: 2 (deactivate, remove);
    - a changed HTTP/HTTPS frontend (cluster_id, position, tags or any 2.x field): 2 (remove, add),
      since none of those is part of sozu's route key;
    - a TCP/UDP frontend whose tags change: 2 (remove, add); removing one frontend of a group that
      keeps others: 1 + the number kept (they are re-added);
    - removing a backend that shares its (cluster_id, address) with kept backends: 1 + one re-add
      per kept sibling;
    - a listener change that cannot be patched (any 1.x/0.15 change, TLS material, ``hsts``
      removal, ...): deactivate (if active) + remove + add + activate (if active), plus one remove
      and one add for each frontend and certificate on it.

Safety valve
    :class:`~sozud.errors.UnsafePlanError` unless ``force``: when the plan removes anything while
    ``desired`` is empty or ``desired_is_complete`` is False (a truncated shared state must never
    remove live objects), or removes more than ``max_removal_ratio`` of the live objects.

Scope (``plan(..., scope=keys)``)
    The plan from ``live`` to ``desired'``: ``live`` with every key of ``scope`` set to ``desired``'s
    value (removed when ``desired`` lacks it), every other key as in ``live``. The result (steps,
    digest, removals, additions, changes, errors) is the one of ``plan(live, desired')``; the cost is
    O(len(scope)) instead of O(len(live)). The builder plans the sub-states made of the scope's keys
    and, for each backend it removes, of the backends kept at the same (cluster_id, address) (they are
    re-added, see above; finding them scans live once). That is exact because no other object takes
    part in planning a cluster, a backend or an HTTP/HTTPS frontend. A scope that differs on a
    listener, a certificate or a TCP/UDP frontend (their planning looks at other objects at the same
    address: a listener rebuild, certificate renewals, frontend groups), or that is larger than a
    quarter of live (no gain), is planned from a full ``desired'``. The safety valve counts the full
    states: ``len(live)`` objects, ``len(live) + added - removed`` desired.

Every plan is checked before it is returned: it is replayed on a copy of ``live`` with sozu's
main-state rules (:func:`model.apply_request`), each request must be accepted and the result must
equal ``desired``; every request must be a complete proto2 message and known to the live version.
Private keys never appear in a summary, :meth:`Plan.to_table` or :meth:`Plan.to_json`.

This module is the planner's face (:func:`plan`, :func:`diff`, the safety valve, the final checks);
:mod:`sozud.state.plan_result` holds :class:`Plan` and :class:`PlanStep` (re-exported here), and
:mod:`sozud.state.plan_builder` emits the steps in the order above.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sozud import serde
from sozud.errors import StateError, UnsafePlanError, VersionMismatchError
from sozud.state.model import ConfigState, ObjKey, describe
from sozud.state.plan_builder import StepBuilder
from sozud.state.plan_result import ACTIONS, Plan, PlanStep
from sozud.versions import V2_1_0, Family

__all__ = ["ACTIONS", "SCOPE_MAX_SHARE", "Plan", "PlanStep", "StateDiff", "diff", "overlay", "plan"]


# --- diff --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateDiff:
    """Keys added, removed and changed from ``a`` to ``b`` (each sorted)."""

    added: list[ObjKey]
    removed: list[ObjKey]
    changed: list[ObjKey]

    def __len__(self) -> int:
        return len(self.added) + len(self.removed) + len(self.changed)


def diff(a: ConfigState, b: ConfigState) -> StateDiff:
    """Object-level difference between two states (values compared by their canonical bytes)."""
    ao, bo = a.raw_map(), b.raw_map()
    return StateDiff(
        added=sorted(k for k in bo if k not in ao),
        removed=sorted(k for k in ao if k not in bo),
        changed=sorted(k for k, v in ao.items() if bo.get(k, v) != v),
    )


# --- the planner ---------------------------------------------------------------------------------------


# Kinds whose planning looks at other objects at the same address (listener rebuilds, certificate
# renewals and replacements, TCP/UDP frontend groups): a scope that changes one is planned in full.
_UNSCOPED_KINDS = frozenset({"listener", "certificate", "tcp_frontend", "udp_frontend"})
# A scope larger than this share of live is planned in full (building sub-states would not pay off).
SCOPE_MAX_SHARE = 0.25


def plan(
    live: ConfigState,
    desired: ConfigState,
    *,
    max_removal_ratio: float = 0.5,
    force: bool = False,
    desired_is_complete: bool = True,
    scope: Collection[ObjKey] | None = None,
) -> Plan:
    """The requests that take sozu from ``live`` to ``desired`` (module docstring for order and cost).

    ``max_removal_ratio``: refuse a plan that removes more than this share of the live objects.
    ``force``: skip the safety valve. ``desired_is_complete``: False when ``desired`` may be a
    truncated or partial state (e.g. its published record count or digest did not match): then
    nothing may be removed. ``scope``: plan only these keys (to ``desired``'s value, or their removal
    when ``desired`` lacks them), every other key staying as in ``live``; the cost is then the scope's,
    not the state's (module docstring, "Scope"). Raises :class:`UnsafePlanError` (safety valve),
    :class:`VersionMismatchError` (desired needs something the live sozu version does not have) and
    :class:`StateError` (an internal inconsistency: a plan that would not reach ``desired``).
    """
    version = live.version
    if (version.family is Family.V0_15) != (desired.version.family is Family.V0_15):
        raise VersionMismatchError(
            f"cannot plan from a sozu {version} live state to a sozu {desired.version} desired state: "
            "0.15 and 1.x/2.x state files and requests are not compatible"
        )
    valve = _Valve(
        total=len(live), max_removal_ratio=max_removal_ratio, force=force, desired_is_complete=desired_is_complete
    )
    if scope is None:
        return _plan(live, desired, valve)
    sub = _scoped_states(live, desired, scope)
    if sub is None:
        return _plan(live, overlay(live, desired, scope), valve)
    return _plan(sub[0], sub[1], valve)


def overlay(live: ConfigState, desired: ConfigState, scope: Collection[ObjKey]) -> ConfigState:
    """``desired'`` of a scoped plan: ``live`` with the keys of ``scope`` as in ``desired`` (a full copy)."""
    objects = dict(live.raw_items())
    for k in scope:
        v = desired.raw(k)
        if v is None:
            objects.pop(k, None)
        else:
            objects[k] = v
    return ConfigState.from_raw(desired.version, objects)


def _scoped_states(
    live: ConfigState, desired: ConfigState, scope: Collection[ObjKey]
) -> tuple[ConfigState, ConfigState] | None:
    """(sub-live, sub-desired') holding the keys a scoped plan can touch, or None when the scope must be
    planned in full (module docstring, "Scope")."""
    if len(scope) > SCOPE_MAX_SHARE * len(live):
        return None
    sub_live: dict[ObjKey, bytes] = {}
    sub_desired: dict[ObjKey, bytes] = {}
    removed_backends: set[tuple[str, str]] = set()  # (cluster_id, address) of the backends removed
    for k in scope:
        have, want = live.raw(k), desired.raw(k)  # point reads: the scope is small
        if have == want:
            continue  # desired' holds live's value: nothing to plan (a sibling below if need be)
        if k[0] in _UNSCOPED_KINDS:
            return None
        if have is not None:
            sub_live[k] = have
        if want is not None:
            sub_desired[k] = want
        elif k[0] == "backend":
            removed_backends.add((k[1], k[3]))
    if removed_backends:
        # workers remove backends by (cluster_id, address): the builder re-adds the ones kept there
        for k, v in live.raw_items():
            if k[0] == "backend" and (k[1], k[3]) in removed_backends and k not in sub_live:
                sub_live[k] = v
                sub_desired[k] = v  # outside the scope: desired' keeps live's value
    return ConfigState.from_raw(live.version, sub_live), ConfigState.from_raw(desired.version, sub_desired)


@dataclass(frozen=True)
class _Valve:
    """The safety valve's settings, and the size of the full live state (a scoped plan sees a part)."""

    total: int
    max_removal_ratio: float
    force: bool
    desired_is_complete: bool


def _plan(live: ConfigState, desired: ConfigState, valve: _Valve) -> Plan:
    """Plan ``live`` -> ``desired`` (whole states, or the sub-states of a scope that hold every key the
    plan touches: the diff, the steps and the checks are then the same as for the whole states)."""
    d = diff(live, desired)
    result = Plan(version=live.version, removals=d.removed, additions=d.added, changes=d.changed)
    _safety_valve(d, valve)
    if not d:
        return result
    builder = StepBuilder(live, desired)
    builder.run()
    if not builder.work.same_as(desired):
        left = diff(builder.work, desired)
        sample = [describe(k) for k in (left.added + left.removed + left.changed)[:5]]
        raise StateError(f"planner error: the plan does not reach the desired state ({sample})")
    result.steps = builder.steps
    _check_requests(result)
    return result


def _safety_valve(d: StateDiff, valve: _Valve) -> None:
    if valve.force or not d.removed:
        return
    n, total = len(d.removed), valve.total
    desired_size = total + len(d.added) - n
    sample = ", ".join(describe(k) for k in d.removed[:5]) + (", ..." if n > 5 else "")
    if desired_size == 0:
        raise UnsafePlanError(
            f"plan refused: the desired state is empty and would remove all {n} live objects ({sample}); "
            "an empty or unreadable shared state never removes live objects; use --force to apply it anyway"
        )
    if not valve.desired_is_complete:
        raise UnsafePlanError(
            f"plan refused: the desired state may be incomplete (truncated or partial) and the plan would "
            f"remove {n} of the {total} live objects ({sample}); only additions and changes are applied "
            "from such a state; use --force to apply the removals anyway"
        )
    ratio = valve.max_removal_ratio
    if n > ratio * total:
        raise UnsafePlanError(
            f"plan refused: it would remove {n} of the {total} live objects ({100 * n / total:.0f}%, more "
            f"than max_removal_ratio={ratio:g}): {sample}; use --force to apply it anyway"
        )


def _check_requests(result: Plan) -> None:
    version = result.version
    for i, step in enumerate(result.steps):
        kind = step.request_type
        if not version.knows_request(kind):
            raise VersionMismatchError(f"step {i} ({step.summary}) needs {kind}, which sozu {version} does not have")
        if not step.request.IsInitialized():
            missing = ", ".join(getattr(step.request, "FindInitializationErrors")())  # noqa: B009
            raise StateError(f"step {i} ({step.summary}) is an incomplete request: missing {missing}")
        if version < V2_1_0:
            try:
                serde.to_json(step.request, version)
            except StateError as e:
                raise VersionMismatchError(f"step {i} ({step.summary}) cannot be sent to sozu {version}: {e}") from None
