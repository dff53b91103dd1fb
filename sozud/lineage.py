"""Push lineage: the pushes a node knows, and the merge base they give for a shared state.

Nodes push one after the other without locks, so a push can overwrite one it never read. Each push has an
id, and its metadata lists its ancestors' ids (newest first, at most :data:`HISTORY`). A node remembers
the pushes its live sozu held (bases, and its own pushes once applied). A removal in the shared state is
trusted only when that state descends from one of them: the newest such ancestor is the merge base.
See ``docs/sync.md`` ("Races between pushes").
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from sozud.state.model import ConfigState
from sozud.sync_model import SharedMeta

HISTORY = 16  # states a node remembers as possible merge bases, and ancestors a meta lists


class Lineage:
    """The pushes this node's live held, by push id (the newest :data:`HISTORY`)."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._known: OrderedDict[str, ConfigState] = OrderedDict()

    def remember(self, shared_id: str, state: ConfigState) -> None:
        self._known[shared_id] = state
        self._known.move_to_end(shared_id)
        while len(self._known) > HISTORY:
            self._known.popitem(last=False)

    def merge_base(self, base: ConfigState | None, meta: SharedMeta | None) -> tuple[ConfigState | None, bool]:
        """The merge base for the shared state ``meta`` describes, and whether its removals may propagate.

        With no lineage (no metadata, or written by an older sozud) ``base`` is used as before. When the
        shared state descends from nothing this node knows (it overwrote this node's last push, or is a
        fresh bootstrap), what it lacks was never seen by its writer rather than removed: additions only,
        and the next push restores the rest. No base and nothing known: None (the caller takes the union).
        """
        if meta is None or not meta.id:
            return base, True
        for shared_id in [meta.id, *meta.ancestors]:
            known = self._known.get(shared_id)
            if known is not None:
                return known, True
        if base is None:
            return None, True
        self.log.warning(
            "shared.diverged",
            meta_origin=meta.origin,
            generation=meta.generation,
            action="it does not descend from a state this node knows: additions only, the next push restores the rest",
        )
        return base, False

    @staticmethod
    def ancestors(parent: SharedMeta | None) -> list[str]:
        """The ancestors a push derived from ``parent`` lists (none when ``parent`` has no id)."""
        if parent is None or not parent.id:
            return []
        return [parent.id, *parent.ancestors][:HISTORY]
