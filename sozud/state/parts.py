"""Parsing a state that comes in parts (the shards of the sharded layout), part by part.

A shared state is read as parts (:class:`sozud.layout.SharedData`), each a sozu state file with an id
that changes whenever its bytes do. :class:`PartsParser` keeps what it made of each part: a read where
one part changed parses that part again (its record cache decodes only its new records) and returns,
besides the state, the keys whose value differs from the previous parse's state: what one change
costs is one part, not the whole state.

The union of the parts is the state the assembled file (the parts' records in order) gives, because
the parser takes it only when that is certain: the parts hold disjoint keys, and every record of a part
after the first adds one object (the first part holds the listeners and their activations, and is
applied first anyway). Anything else (a key in two parts, a record that changes another object, a part
that does not parse) falls back to parsing the assembled file, which gives sozu's own semantics (records
applied in order) and error messages numbered across the whole file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import Message

from sozud.errors import StateError
from sozud.layout import SharedData
from sozud.state.codec import MAX_STATE_BYTES, RecordCache, parse_state_file
from sozud.state.model import ConfigState, ObjKey
from sozud.versions import SozuVersion

__all__ = ["PartsParse", "PartsParser"]


@dataclass(frozen=True)
class PartsParse:
    """A parse: the state, and what changed since the previous parse (when that is known)."""

    state: ConfigState
    previous: ConfigState | None  # the previous parse's state (never modified), None after a full parse
    changed: frozenset[ObjKey] | None  # keys whose value differs from ``previous`` (None: not known)


@dataclass(frozen=True)
class _Part:
    id: str
    keys: frozenset[ObjKey]
    # each record's body (its bytes without the record id) -> the key of the object it adds; for a part
    # after the first of several (where every record adds one object), else None
    bodies: dict[bytes, ObjKey] | None = None


# A record's id right after a NUL (records are NUL-terminated; a JSON string holds no NUL and no unescaped
# quote, so this matches record starts only). A literal first byte keeps the scan fast.
_RECORD_ID = re.compile(rb'\0\{"id":"[^"]*",')


def _bodies(part: bytes) -> list[bytes] | None:
    """The part's records without their ids (None when the last one is not NUL-terminated)."""
    bodies = _RECORD_ID.sub(b"\0{", b"\0" + part).split(b"\0")[1:]
    if bodies.pop():
        return None
    return bodies


class PartsParser:
    """Parses parted states from one source, reusing what it made of the parts it saw last time.

    The states it returns are never modified afterwards (a new parse builds a new state that shares the
    unchanged messages): callers may keep them.
    """

    def __init__(self, *, max_state_bytes: int = MAX_STATE_BYTES) -> None:
        self.max_state_bytes = max_state_bytes
        self._version: SozuVersion | None = None
        self._parts: list[_Part] = []
        self._state: ConfigState | None = None
        self._caches: list[RecordCache] = []
        self._whole = RecordCache()  # for the assembled file, when the parts cannot be taken one by one
        self.full_parses = 0  # parses that read every part (or the assembled file): for tests and benchmarks
        self.parts_parsed = 0

    def parse(self, data: SharedData, version: SozuVersion, *, source: str) -> PartsParse:
        if version != self._version:
            self._reset(version)
        prev = self._state
        if prev is not None and len(data.parts) == len(self._parts):
            changed = [i for i, (pid, _) in enumerate(data.parts) if pid != self._parts[i].id]
            if not changed:
                return PartsParse(prev, prev, frozenset())
            if sum(len(d) for _, d in data.parts) <= self.max_state_bytes:
                result = self._incremental(data, version, source, prev, changed)
                if result is not None:
                    return result
        return self._full(data, version, source)

    def _reset(self, version: SozuVersion) -> None:
        self._version = version
        self._parts = []
        self._state = None
        self._caches = []

    def _cache(self, i: int) -> RecordCache:
        while len(self._caches) <= i:
            self._caches.append(RecordCache())
        return self._caches[i]

    def _parse_part(self, data: SharedData, i: int, version: SozuVersion, source: str) -> ConfigState | None:
        """Part ``i`` alone, or None when it cannot be taken apart from the others."""
        part = data.parts[i][1]
        single = len(data.parts) == 1  # a plain key: the whole file, which must hold records
        try:
            state = parse_state_file(
                part,
                version,
                source=source if single else f"{source} (part {i})",
                allow_empty=not single,
                cache=self._cache(i),
            )
        except StateError:
            return None  # the assembled file tells what is wrong, numbered across the whole file
        self.parts_parsed += 1
        if i > 0 and part.count(b"\0") != len(state):
            return None  # a record that does not add one object: only the records' order tells what it does
        return state

    def _incremental(
        self, data: SharedData, version: SozuVersion, source: str, prev: ConfigState, changed: list[int]
    ) -> PartsParse | None:
        state = prev.shallow_copy()
        objects = state.objects
        parsed: list[tuple[int, ConfigState]] = []
        removed: dict[ObjKey, Message] = {}
        parts = list(self._parts)
        for i in changed:  # every part's removals first: a record may move from one part to another
            got = self._changed_records(data, i, version, source)
            if got is None:
                return None
            part, gone, parts[i] = got
            parsed.append((i, part))
            for k in gone:
                removed[k] = objects.pop(k)
        dirty: set[ObjKey] = set()
        for i, part in parsed:
            old_keys = self._parts[i].keys
            for k, v in part.objects.items():
                old = objects.get(k)
                if old is None:
                    old = removed.pop(k, None)
                    if old is None or (old is not v and old != v):
                        dirty.add(k)
                elif k not in old_keys:
                    return None  # another part holds it too: the records' order decides which value stays
                elif old is not v and old != v:
                    dirty.add(k)
                objects[k] = v
        dirty.update(removed)
        self._parts, self._state = parts, state
        return PartsParse(state, prev, frozenset(dirty))

    def _changed_records(
        self, data: SharedData, i: int, version: SozuVersion, source: str
    ) -> tuple[ConfigState, Iterable[ObjKey], _Part] | None:
        """Part ``i`` again: the objects of its records that are new (all of them when its records were not
        kept), the keys of its objects that are gone, and what to keep of it; None when it cannot be taken
        apart from the others."""
        pid, raw = data.parts[i]
        old = self._parts[i]
        if old.bodies is None:
            part = self._parse_part(data, i, version, source)
            if part is None:
                return None
            return part, old.keys - part.objects.keys(), self._kept(pid, raw, part, i, len(data.parts))
        bodies = _bodies(raw)
        if bodies is None:
            return None
        present = set(bodies)
        if len(present) != len(bodies):
            return None  # a record twice: only the records' order tells what the second does
        added = [b for b in bodies if b not in old.bodies]
        gone = [old.bodies[b] for b in old.bodies.keys() - present]
        mini = b"".join(b'{"id":"SAVE-%d",%s\0' % (n, b[1:]) for n, b in enumerate(added))
        try:
            new = parse_state_file(mini, version, source=f"{source} (part {i})", allow_empty=True)
        except StateError:
            return None
        self.parts_parsed += 1
        if len(new) != len(added):
            return None
        kept = dict(old.bodies)
        for b in old.bodies.keys() - present:
            del kept[b]
        kept.update(zip(added, new.objects, strict=True))
        keys = (old.keys - frozenset(gone)) | new.objects.keys()
        return new, gone, _Part(pid, keys, kept)

    def _kept(self, pid: str, raw: bytes, part: ConfigState, i: int, count: int) -> _Part:
        """What to keep of part ``i``: its keys, and its records' bodies when every record adds one object."""
        if i == 0 or count == 1:
            return _Part(pid, frozenset(part.objects))
        bodies = _bodies(raw)
        if bodies is None or len(bodies) != len(part):
            return _Part(pid, frozenset(part.objects))
        return _Part(pid, frozenset(part.objects), dict(zip(bodies, part.objects, strict=True)))

    def _full(self, data: SharedData, version: SozuVersion, source: str) -> PartsParse:
        self.full_parses += 1
        self._parts, self._state = [], None
        if len(data.parts) == 1:
            whole = parse_state_file(data.parts[0][1], version, source=source, cache=self._cache(0))
            self._parts, self._state = [_Part(data.parts[0][0], frozenset(whole.objects))], whole
            return PartsParse(whole, None, None)
        state = ConfigState(version)
        parts: list[_Part] = []
        if sum(len(d) for _, d in data.parts) <= self.max_state_bytes:
            for i, (pid, _) in enumerate(data.parts):
                part = self._parse_part(data, i, version, source)
                if part is None or any(k in state.objects for k in part.objects):
                    break
                state.objects.update(part.objects)
                parts.append(self._kept(pid, data.parts[i][1], part, i, len(data.parts)))
            else:
                self._parts, self._state = parts, state
                return PartsParse(state, None, None)
        # parts that cannot be taken one by one: the assembled file (errors are raised from here)
        whole = parse_state_file(data.assembled, version, source=source, cache=self._whole)
        return PartsParse(whole, None, None)
