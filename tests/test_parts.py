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
from sozud.state.codec import parse_state_file, write_state_file
from sozud.state.model import ConfigState
from sozud.state.parts import PartsParser
from sozud.state.plan import diff
from sozud.testing import builders as build
from sozud.versions import V2_1_0


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
