"""``ConfigState`` is copy-on-write (sozud/state/model.py): copies share one mapping and each keeps its
own changes over it. Whatever the sequence of writes, copies and whole-state reads, every state must
read exactly as a plain dict that had the same writes, and no write to one may show in another."""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sozud.proto import command_pb2 as pb
from sozud.state import model
from sozud.state.model import ConfigState, ObjKey
from sozud.testing import builders as build
from sozud.versions import SozuVersion

V2 = SozuVersion(2, 1, 0)
KEYS: list[ObjKey] = [("cluster", f"c{i}") for i in range(8)]


def _value(n: int) -> pb.Cluster:
    return build.cluster(f"v{n}")


_op = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 7), st.integers(0, 3)),
    st.tuples(st.just("setitem"), st.integers(0, 7), st.integers(0, 3)),
    st.tuples(st.just("pop"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("del"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("copy"), st.just(0), st.just(0)),
    st.tuples(st.just("put_raw"), st.integers(0, 7), st.integers(0, 3)),
    st.tuples(st.just("iterate"), st.just(0), st.just(0)),
)


def _check(state: ConfigState, expected: dict[ObjKey, pb.Cluster]) -> None:
    assert len(state) == len(expected)
    for k in KEYS:
        assert (k in state) == (k in expected)
        assert state.get(k) == expected.get(k)
        if k in expected:
            assert state[k] == expected[k]
        else:
            with pytest.raises(KeyError):
                state[k]


@settings(max_examples=300, deadline=None)
@given(
    initial=st.dictionaries(st.integers(0, 7), st.integers(0, 3), max_size=8),
    ops=st.lists(st.tuples(st.integers(0, 5), _op), max_size=60),
    limit=st.integers(0, 4),
)
def test_copies_read_as_dicts_that_had_the_same_writes(
    initial: dict[int, int], ops: list[tuple[int, tuple[str, int, int]]], limit: int
) -> None:
    # a small overlay limit makes copies fold their changes in, as large states do
    with mock.patch.object(model, "_overlay_limit", lambda size: limit):
        states = [ConfigState(V2, {KEYS[k]: _value(v) for k, v in initial.items()})]
        models = [{KEYS[k]: _value(v) for k, v in initial.items()}]
        for which, (op, k, v) in ops:
            i = which % len(states)
            state, expected, key = states[i], models[i], KEYS[k]
            if op == "put":
                state.put(key, _value(v))
                expected[key] = _value(v)
            elif op == "setitem":
                state[key] = _value(v)
                expected[key] = _value(v)
            elif op == "pop":
                assert state.pop(key, None) == expected.pop(key, None)
            elif op == "del":
                if key in expected:
                    del state[key]
                    del expected[key]
                else:
                    with pytest.raises(KeyError):
                        del state[key]
            elif op == "copy":
                states.append(state.shallow_copy())
                models.append(dict(expected))
            elif op == "put_raw":  # a value stored as its canonical bytes
                state.put_raw(key, model.encode_value(_value(v)))
                expected[key] = _value(v)
            else:
                assert dict(state.items()) == expected and sorted(state) == sorted(expected)
            for s, m in zip(states, models, strict=True):
                _check(s, m)
        for s, m in zip(states, models, strict=True):
            assert dict(s) == m and s.same_as(ConfigState(V2, m))


def test_a_copy_shares_the_mapping_until_a_whole_state_read() -> None:
    """What makes a step O(change): a copy and point writes on it copy no mapping; the first whole-state
    read of a state with changes over a shared mapping copies it once, then no more."""
    state = ConfigState(V2, {k: _value(0) for k in KEYS})
    folds: list[int] = []
    real = ConfigState._fold

    def counting(self: ConfigState) -> None:
        folds.append(len(self))
        real(self)

    with mock.patch.object(ConfigState, "_fold", counting):
        copy = state.shallow_copy()
        copy.put(KEYS[0], _value(1))
        copy.pop(KEYS[1])
        assert copy.get(KEYS[0]) == _value(1) and KEYS[1] not in copy and len(copy) == len(KEYS) - 1
        assert state.get(KEYS[0]) == _value(0) and KEYS[1] in state
        assert folds == []
        assert sorted(copy) == sorted(KEYS[:1] + KEYS[2:])
        assert folds == [len(KEYS) - 1]
        assert copy.digest() == copy.digest() and len(folds) == 1


def test_states_with_the_same_keys_and_one_value_apart_differ() -> None:
    """Equality compares values, not only keys: one weight apart is another state (and another digest)."""
    state = ConfigState(V2)
    state.add("backend", build.backend("c", "b0", "10.0.0.1:80"))
    other = state.shallow_copy()
    value = other[("backend", "c", "b0", "10.0.0.1:80")]
    assert isinstance(value, pb.AddBackend)
    value.load_balancing_parameters.weight = 42
    assert state == other, "a message read from a state is the reader's copy"
    other.put(("backend", "c", "b0", "10.0.0.1:80"), value)
    assert state != other and not state.same_as(other) and state.digest() != other.digest()
    assert sorted(state) == sorted(other)
