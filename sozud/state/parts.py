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

import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sozud.errors import StateError
from sozud.layout import SharedData
from sozud.state.codec import MAX_STATE_BYTES, RecordCache, parse_state_file
from sozud.state.model import ConfigState, ObjKey
from sozud.state.records import digest16
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
    # the digest of each record's body (its bytes without the record id: :func:`_digest`) -> the key of the
    # object it adds; for a part after the first of several (where every record adds one object), else
    # None. A later parse updates it in place (see PartsParser._incremental), once the whole parse has
    # succeeded. Digests, not bodies: the part's bytes are kept already (``raw``).
    bodies: dict[bytes, ObjKey] | None = None
    raw: bytes = b""  # the part's bytes, when ``bodies`` is kept
    order: list[bytes] | None = None  # the bodies' digests in record order, when ``bodies`` is kept


@dataclass(frozen=True)
class _RecordDiff:
    """What changed between two versions of a part, record by record (bodies, not record ids)."""

    added: list[bytes]  # the new part's bodies that the old one did not hold, in record order
    added_ids: list[bytes]  # their digests
    gone: list[bytes]  # the digests of the old part's bodies that the new one does not hold
    order: list[bytes]  # the digests of the new part's bodies in record order


# A record's id right after a NUL (records are NUL-terminated; a JSON string holds no NUL and no unescaped
# quote, so this matches record starts only). A literal first byte keeps the scan fast.
_RECORD_ID = re.compile(rb'\0\{"id":"[^"]*",')
# The id of a record that starts at a given offset, as the layout numbers the records of a shard (SAVE-n, n
# its position in the shard).
_SAVE_ID = re.compile(rb'\{"id":"SAVE-(\d{1,9})",')


def _bodies(part: bytes) -> list[bytes] | None:
    """The part's records without their ids (None when the last one is not NUL-terminated)."""
    bodies = _RECORD_ID.sub(b"\0{", b"\0" + part).split(b"\0")[1:]
    if bodies.pop():
        return None
    return bodies


def _digest(body: bytes) -> bytes:
    """What a part keeps of a record's body (128 bits: two bodies with one digest are taken as equal)."""
    return digest16(body)


def _diff_all(raw: bytes, old: dict[bytes, ObjKey]) -> _RecordDiff | None:
    """The new part ``raw`` against the old part's bodies, every record compared (O(part)); None when a
    record is there twice or the last one is not NUL-terminated."""
    bodies = _bodies(raw)
    if bodies is None:
        return None
    ids = [_digest(b) for b in bodies]
    present = set(ids)
    if len(present) != len(ids):
        return None  # a record twice: only the records' order tells what the second does
    added = [(b, d) for b, d in zip(bodies, ids, strict=True) if d not in old]
    return _RecordDiff([b for b, _ in added], [d for _, d in added], [d for d in old.keys() - present], ids)


def _common_prefix(a: bytes, b: bytes) -> int:
    """The length of the longest common prefix of ``a`` and ``b``: a binary search whose steps compare only
    the bytes not compared yet (memcmp), so O(len) at C speed and O(log len) Python steps."""
    view = memoryview(a)
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; a[:hi + 1] != b[:hi + 1] (or hi is the shorter length)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(view[lo:mid], lo):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    """The length (at most ``limit``) of the longest common suffix of ``a`` and ``b`` (as
    :func:`_common_prefix`)."""
    view, la, lb = memoryview(a), len(a), len(b)
    lo, hi = 0, min(la, lb, limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(view[la - mid : la - lo], lb - mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _record_at(raw: bytes, start: int, order: list[bytes]) -> int | None:
    """The position in ``order`` (the digests of ``raw``'s record bodies, in order) of the record that starts
    at ``start``, known from its id and checked against its body's digest (bodies are unique); None when
    unsure."""
    if start == len(raw):
        return len(order)
    m = _SAVE_ID.match(raw, start)
    end = raw.find(b"\0", start)
    if m is None or end < 0:
        return None
    n = int(m[1])
    if n >= len(order) or order[n] != _digest(b"{" + raw[m.end() : end]):
        return None
    return n


def _diff_narrow(old_raw: bytes, order: list[bytes], old: dict[bytes, ObjKey], raw: bytes) -> _RecordDiff | None:
    """:func:`_diff_all`'s answer, comparing records only where the two parts differ; None when that cannot
    be told cheaply (the caller then compares every record).

    Parts are written in the canonical order of their records, so a small change leaves the parts' bytes
    equal up to the first changed record and from the last one on. Those stretches are found by memcmp and
    cut at record boundaries; records in them are byte-equal, hence equal in body. Only the records in
    between are split. The layout numbers each part's records from SAVE-0, so a record added or removed
    renumbers every later one: the bytes of the stretch after the change then differ in every id, and the
    records from the change on are split and compared by body (a C-speed pass over that stretch, not a
    Python step per record); the common tail of the two lists of bodies is then left out.
    """
    if len(order) != len(old):
        return None
    # records before the first differing byte: the same bytes in both, the same record starts
    start = old_raw.rfind(b"\0", 0, _common_prefix(old_raw, raw)) + 1
    # records after the last differing byte: the first record start inside the common suffix (a NUL inside
    # it is a NUL in both parts); the byte before the suffix differs, so its start may not be one in both
    tail = _common_suffix(old_raw, raw, min(len(old_raw), len(raw)) - start)
    old_end = len(old_raw)
    if tail:
        nul = old_raw.find(b"\0", len(old_raw) - tail)
        old_end = nul + 1 if nul >= 0 else len(old_raw)
    new_end = old_end + len(raw) - len(old_raw)
    first, last = _record_at(old_raw, start, order), _record_at(old_raw, old_end, order)
    if first is None or last is None or first > last:
        return None
    bodies, old_bodies = _bodies(raw[start:new_end]), _bodies(old_raw[start:old_end])
    if bodies is None or old_bodies is None or len(old_bodies) != last - first:
        return None
    # the common tail of the bodies between (every one of them, when records were renumbered), compared as
    # bytes: only the bodies before it are digested
    same = list(map(operator.eq, reversed(old_bodies), reversed(bodies)))
    common = same.index(False) if False in same else len(same)
    old_changed = order[first : last - common]
    new_bodies = bodies[: len(bodies) - common]
    new_changed = [_digest(b) for b in new_bodies]
    old_set, new_set = set(old_changed), set(new_changed)
    if len(new_set) != len(new_changed):
        return None  # a record twice
    added = [(b, d) for b, d in zip(new_bodies, new_changed, strict=True) if d not in old_set]
    if any(d in old for _, d in added):
        return None  # a record twice: also before or after the change
    new_order = order[:first] + new_changed + order[last - common :]
    gone = [d for d in old_changed if d not in new_set]
    return _RecordDiff([b for b, _ in added], [d for _, d in added], gone, new_order)


def _nothing() -> None:
    pass


class PartsParser:
    """Parses parted states from one source, reusing what it made of the parts it saw last time.

    The states it returns are never modified afterwards (a new parse builds a new state that shares the
    unchanged values): callers may keep them.
    """

    def __init__(self, *, max_state_bytes: int = MAX_STATE_BYTES, peer: RecordCache | None = None) -> None:
        """``peer``: the live reads' record cache, whose values the parts' states take for the records it
        holds (:class:`~sozud.state.records.RecordCache`)."""
        self.max_state_bytes = max_state_bytes
        self.peer = peer
        self._version: SozuVersion | None = None
        self._parts: list[_Part] = []
        self._state: ConfigState | None = None
        self._caches: list[RecordCache] = []
        self._whole = RecordCache(peer)  # for the assembled file, when the parts cannot be taken one by one
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
            self._caches.append(RecordCache(self.peer))
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
        parsed: list[tuple[int, ConfigState]] = []
        removed: dict[ObjKey, bytes] = {}
        parts = list(self._parts)
        commits: list[Callable[[], None]] = []
        for i in changed:  # every part's removals first: a record may move from one part to another
            got = self._changed_records(data, i, version, source)
            if got is None:
                return None
            part, gone, parts[i], commit = got
            parsed.append((i, part))
            commits.append(commit)
            for k in gone:
                raw = state.pop_raw(k)
                assert raw is not None, k
                removed[k] = raw
        dirty: set[ObjKey] = set()
        for i, part in parsed:
            old_keys = self._parts[i].keys
            for k, v in part.raw_items():
                old = state.raw(k)
                if old is None:
                    old = removed.pop(k, None)
                    if old is None or (old is not v and old != v):
                        dirty.add(k)
                elif k not in old_keys:
                    return None  # another part holds it too: the records' order decides which value stays
                elif old is not v and old != v:
                    dirty.add(k)
                state.put_raw(k, v)
        dirty.update(removed)
        for commit in commits:
            commit()
        self._parts, self._state = parts, state
        return PartsParse(state, prev, frozenset(dirty))

    def _changed_records(
        self, data: SharedData, i: int, version: SozuVersion, source: str
    ) -> tuple[ConfigState, Iterable[ObjKey], _Part, Callable[[], None]] | None:
        """Part ``i`` again: the objects of its records that are new (all of them when its records were not
        kept), the keys of its objects that are gone, what to keep of it and what to run once the whole
        parse has succeeded (it updates the kept bodies in place); None when it cannot be taken apart from
        the others."""
        pid, raw = data.parts[i]
        old = self._parts[i]
        if old.bodies is None or old.order is None:
            part = self._parse_part(data, i, version, source)
            if part is None:
                return None
            kept = self._kept(pid, raw, part, i, len(data.parts))
            return part, old.keys - part.keys(), kept, _nothing
        bodies = old.bodies
        diff = _diff_narrow(old.raw, old.order, bodies, raw) or _diff_all(raw, bodies)
        if diff is None:
            return None
        mini = b"".join(b'{"id":"SAVE-%d",%s\0' % (n, b[1:]) for n, b in enumerate(diff.added))
        try:
            new = parse_state_file(mini, version, source=f"{source} (part {i})", allow_empty=True)
        except StateError:
            return None
        self.parts_parsed += 1
        if len(new) != len(diff.added):
            return None
        gone = [bodies[b] for b in diff.gone]
        keys = (old.keys - frozenset(gone)) | new.keys()

        def commit() -> None:
            for b in diff.gone:
                del bodies[b]
            bodies.update(zip(diff.added_ids, new, strict=True))

        return new, gone, _Part(pid, keys, bodies, raw, diff.order), commit

    def _kept(self, pid: str, raw: bytes, part: ConfigState, i: int, count: int) -> _Part:
        """What to keep of part ``i``: its keys, and its records' bodies when every record adds one object."""
        if i == 0 or count == 1:
            return _Part(pid, frozenset(part))
        bodies = _bodies(raw)
        if bodies is None or len(bodies) != len(part):
            return _Part(pid, frozenset(part))
        ids = [_digest(b) for b in bodies]
        return _Part(pid, frozenset(part), dict(zip(ids, part, strict=True)), raw, ids)

    def _full(self, data: SharedData, version: SozuVersion, source: str) -> PartsParse:
        self.full_parses += 1
        self._parts, self._state = [], None
        if len(data.parts) == 1:
            whole = parse_state_file(data.parts[0][1], version, source=source, cache=self._cache(0))
            self._parts, self._state = [_Part(data.parts[0][0], frozenset(whole))], whole
            return PartsParse(whole, None, None)
        objects: dict[ObjKey, bytes] = {}
        parts: list[_Part] = []
        if sum(len(d) for _, d in data.parts) <= self.max_state_bytes:
            for i, (pid, _) in enumerate(data.parts):
                part = self._parse_part(data, i, version, source)
                if part is None or any(k in objects for k in part):
                    break
                objects.update(part.raw_items())
                parts.append(self._kept(pid, data.parts[i][1], part, i, len(data.parts)))
            else:
                state = ConfigState.from_raw(version, objects)
                self._parts, self._state = parts, state
                return PartsParse(state, None, None)
        # parts that cannot be taken one by one: the assembled file (errors are raised from here)
        whole = parse_state_file(data.assembled, version, source=source, cache=self._whole)
        return PartsParse(whole, None, None)
