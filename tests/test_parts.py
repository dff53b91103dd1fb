"""``PartsParser`` (issue 10): a state read as parts, part by part, is the state the assembled file gives,
and the changed keys it reports are exactly the keys whose value differs from the previous parse."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import derived, states

from sozud.errors import StateParseError
from sozud.layout import SharedData, assemble, split_state
from sozud.state.codec import RecordCache, parse_state_file, write_state_file
from sozud.state.model import ConfigState
from sozud.state.parts import PartsParser, _bodies, _diff_all, _diff_narrow, _digest
from sozud.state.plan import diff
from sozud.testing import builders as build
from sozud.versions import V2_1_0, SozuVersion


def parted(state: ConfigState, shards: int = 4) -> SharedData:
    files = split_state(write_state_file(state), shards)
    return SharedData(tuple((hashlib.sha256(f).hexdigest(), f) for f in files))


def changed_keys(a: ConfigState, b: ConfigState) -> frozenset[tuple[str, ...]]:
    d = diff(a, b)
    return frozenset(d.added + d.removed + d.changed)


@st.composite
def sequences(draw: st.DrawFn) -> list[ConfigState]:
    first = draw(states())
    out = [first]
    for _ in range(draw(st.integers(1, 4))):
        out.append(draw(st.one_of(derived(out[-1]), states(first.version))))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=sequences(), shards=st.sampled_from([1, 2, 4, 16]))
def test_a_parse_by_parts_is_the_assembled_parse_and_reports_what_changed(seq: list[ConfigState], shards: int) -> None:
    parser = PartsParser()
    previous: ConfigState | None = None
    for state in seq:
        data = parted(state, shards)
        if data.is_blank():
            continue  # the engine never parses a blank shared state (it is a bootstrap)
        got = parser.parse(data, state.version, source="test")
        want = parse_state_file(assemble([f for _, f in data.parts]), state.version, source="assembled")
        assert got.state == want
        if got.changed is not None:
            assert previous is not None and got.previous is previous
            assert got.changed == changed_keys(previous, want)
        previous = got.state


def test_one_changed_shard_is_parsed_alone_and_only_its_new_record_decoded() -> None:
    parser = PartsParser()
    before = build.fleet_state(200)
    first = parser.parse(parted(before, 16), V2_1_0, source="test")
    after = build.fleet_state(200, changed_weight=7)
    got = parser.parse(parted(after, 16), V2_1_0, source="test")
    assert got.previous is first.state and got.state == after
    assert got.changed == {("backend", "app-000100", "app-000100-0", "10.0.0.100:8000")}
    assert parser.full_parses == 1
    assert 1 <= parser.parts_parsed - 16 <= 2, "only the shard(s) the change touched are parsed again"


def _with_record(data: SharedData, i: int, record: bytes) -> SharedData:
    parts = list(data.parts)
    body = parts[i][1] + record
    parts[i] = (hashlib.sha256(body).hexdigest(), body)
    return SharedData(tuple(parts))


@pytest.mark.parametrize("where", [1, 3])
def test_a_key_held_by_two_parts_is_what_the_assembled_file_says(where: int) -> None:
    """The same cluster added in two parts with two values: sozu's upsert keeps the later one."""
    state = build.fleet_state(20)
    data = parted(state)
    parser = PartsParser()
    parser.parse(data, V2_1_0, source="test")
    other = write_state_file(ConfigState(V2_1_0, {("cluster", "app-000001"): build.cluster("app-000001", sticky=True)}))
    hostile = _with_record(data, where, other)
    got = parser.parse(hostile, V2_1_0, source="test")
    want = parse_state_file(hostile.assembled, V2_1_0, source="assembled")
    assert got.state == want and got.changed is None


def test_a_part_that_does_not_parse_fails_with_the_record_number_of_the_assembled_file() -> None:
    data = parted(build.fleet_state(20))
    parser = PartsParser()
    parser.parse(data, V2_1_0, source="test")
    broken = _with_record(data, 2, b'{"id":"SAVE-0","content":{"request_type":{"ADD_CLUSTER":{"nope":1}}}}\n\0')
    with pytest.raises(StateParseError) as first:
        parser.parse(broken, V2_1_0, source="test")
    with pytest.raises(StateParseError) as whole:
        parse_state_file(broken.assembled, V2_1_0, source="test")
    assert str(first.value) == str(whole.value)


# --- the record diff of one changed part: only where the bytes differ ------------------------------------

# Record texts from a small alphabet: records that share long prefixes and suffixes, look like one another
# or like record ids, and hold the bytes the record boundaries are found by (quote, comma, braces).
_TEXTS = st.text(alphabet='ab1"{},:\\-SAVEid', max_size=12).map(lambda t: t.encode())


def _shard(texts: list[bytes], ids: list[bytes] | None = None) -> bytes:
    """A part as the layout writes it: records numbered from SAVE-0 (or with the given ids)."""
    ids = ids or [b"SAVE-%d" % n for n in range(len(texts))]
    return b"".join(b'{"id":"%s","content":"%s"}\n\0' % (i, t) for i, t in zip(ids, texts, strict=True))


@st.composite
def _edited(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """A list of unique record texts and an edit of it (inserts, removals, replacements anywhere, the
    first and last record included, sometimes a record twice)."""
    old = draw(st.lists(_TEXTS, unique=True, max_size=30))
    if draw(st.booleans()):
        old.sort()  # the canonical order: a small change leaves a long common prefix and suffix
    new = list(old)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["insert", "remove", "replace", "duplicate", "first", "last"]))
        at = draw(st.integers(0, len(new)))
        if op == "insert":
            new.insert(at, draw(_TEXTS))
        elif op == "first":
            new.insert(0, draw(_TEXTS)) if draw(st.booleans()) or not new else new.pop(0)
        elif op == "last":
            new.append(draw(_TEXTS)) if draw(st.booleans()) or not new else new.pop()
        elif new and op == "remove":
            new.pop(min(at, len(new) - 1))
        elif new and op == "replace":
            new[min(at, len(new) - 1)] = draw(_TEXTS)
        elif new and op == "duplicate":
            new.insert(at, new[draw(st.integers(0, len(new) - 1))])
    return old, new


@settings(max_examples=1500, deadline=None)
@given(edit=_edited(), renumber=st.sampled_from(["layout", "kept", "odd"]))
def test_the_narrow_record_diff_is_the_full_record_diff(edit: tuple[list[bytes], list[bytes]], renumber: str) -> None:
    old_texts, new_texts = edit
    old_raw = _shard(old_texts)
    old_bodies = _bodies(old_raw)
    assert old_bodies is not None
    order = [_digest(b) for b in old_bodies]  # what a part keeps of its records
    bodies = {d: ("cluster", str(n)) for n, d in enumerate(order)}
    if renumber == "layout":  # as the layout writes it: every record after a change gets a new id
        new_raw = _shard(new_texts)
    elif renumber == "kept":  # each record keeps its old id (a writer that does not renumber)
        ids = {t: b"SAVE-%d" % n for n, t in enumerate(old_texts)}
        new_raw = _shard(new_texts, [ids.get(t, b"SAVE-%d" % (1000 + n)) for n, t in enumerate(new_texts)])
    else:  # ids that are not the layout's
        new_raw = _shard(new_texts, [b"x%d" % (n % 3) for n in range(len(new_texts))])
    want = _diff_all(new_raw, bodies)
    got = _diff_narrow(old_raw, order, bodies, new_raw)
    if want is None:
        assert got is None
        return
    if renumber == "layout":
        assert got is not None, "a part the layout wrote is diffed narrowly"
    if got is not None:
        assert got.added == want.added and got.added_ids == want.added_ids
        assert [_digest(b) for b in got.added] == got.added_ids
        assert sorted(got.gone) == sorted(want.gone)
        assert got.order == want.order


def test_the_parts_take_the_values_of_the_records_the_live_read_holds() -> None:
    """With the live reads' record cache as peer, a part's record that the last live read held is not
    decoded again: the shared state holds the live state's very value (one in memory, not two). Only
    from a peer that parsed the same version: a record's meaning depends on it."""
    v1 = SozuVersion(1, 1, 1)
    for version in (V2_1_0, v1):
        data = write_state_file(build.fleet_state(40, version=version))
        live_cache = RecordCache()
        live = parse_state_file(data, version, source="live", cache=live_cache)
        shards = SharedData(tuple((hashlib.sha256(p).hexdigest(), p) for p in split_state(data, 4)))
        parser = PartsParser(peer=live_cache)
        shared = parser.parse(shards, version, source="shared").state
        assert shared == live
        assert all(shared.raw(k) is live.raw(k) for k in live)
        assert sum(c.decoded for c in parser._caches) == 0
        alone = PartsParser().parse(shards, version, source="shared").state
        assert alone == live and not any(alone.raw(k) is live.raw(k) for k in live), "no peer: values of its own"
        if version == v1:  # a 1.x file reads as 2.x too: a peer that parsed it so is not taken from
            peer_cache = RecordCache()
            as_v2 = parse_state_file(data, V2_1_0, source="as 2.x", cache=peer_cache)
            alone = PartsParser(peer=peer_cache).parse(shards, version, source="shared").state
            assert alone == live and not any(alone.raw(k) is as_v2.raw(k) for k in live)
