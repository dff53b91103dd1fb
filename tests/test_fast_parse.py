"""The fast ways of reading a state file give exactly what the reference ways give (issue 10, item 1).

- ``serde.from_json`` builds a message from the serde JSON through a compiled converter (one
  constructor call) and falls back to the field-by-field walk (``serde._json_into``) for anything the
  converter does not accept. The message must be the same as the walk's, and what the walk refuses must
  never be accepted: checked on random requests of every version, with random damage at a random place
  of their JSON.
- ``parse_state_file`` with a known version applies records as it decodes them and falls back to the
  reference parse (every record decoded first) at the first problem. Same state or same error, checked on
  random state files with random record-level damage.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import FIXTURES, VERSIONS, states

from sozud import serde
from sozud.errors import StateError
from sozud.proto import command_pb2 as pb
from sozud.state import codec
from sozud.state.codec import parse_state_file, state_requests, write_state_file
from sozud.versions import SozuVersion

# Values put in place of a part of a record's JSON: wrong types, out-of-range numbers, nulls, empty
# containers, an unknown enum number, a oneof with two variants, a 0.15 address in an object's place.
ODD_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    7,
    2**31,
    2**32,
    2**64,
    1.5,
    "",
    "x",
    "10.0.0.1:80",
    "[::1]:8080",
    "999.0.0.1:80",
    [],
    [1, 2],
    ["a"],
    {},
    {"V4": 1},
    {"V4": 1, "V6": {"low": 1, "high": 0}},
    {"ADD_CLUSTER": {"cluster_id": "c"}},
    {"unknown": 1},
)


def _copy(value: Any) -> Any:
    return msgspec.json.decode(msgspec.json.encode(value))  # a deep copy, faster than copy.deepcopy


def _paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value (the root included)."""
    out = [here]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*here, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*here, i))
    return out


@st.composite
def damaged(draw: st.DrawFn, value: Any) -> Any:
    """``value`` with one place replaced, removed, or given an extra key (or ``value`` itself)."""
    value = _copy(value)
    place = draw(st.sampled_from(_paths(value)))
    how = draw(st.sampled_from(["keep", "replace", "remove", "extra_key", "rename"]))
    if how == "keep" or not place:
        return draw(st.sampled_from(ODD_VALUES)) if how != "keep" else value
    parent = value
    for step in place[:-1]:
        parent = parent[step]
    last = place[-1]
    if how == "replace":
        parent[last] = draw(st.sampled_from(ODD_VALUES))
    elif how == "remove":
        del parent[last]
    elif how == "extra_key" and isinstance(parent[last], dict):
        parent[last][draw(st.sampled_from(["extra", "V4", "port", "cluster_id", "ADD_BACKEND"]))] = 1
    elif how == "rename" and isinstance(parent, dict):
        parent[str(last).upper() if str(last).islower() else str(last).lower()] = parent.pop(last)
    return value


def _walked(cls: type[pb.Request], value: Any, version: SozuVersion) -> pb.Request:
    """The reference: the field-by-field walk alone."""
    msg = cls()
    serde._json_into(msg, value, version, serde._Where("<json>", None), cls.DESCRIPTOR.name)
    return msg


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        msg = fn()
    except StateError as e:
        return "error", str(e)
    return "ok", (msg.SerializeToString(deterministic=True), msg.ListFields() != [], msg)


@st.composite
def requests_json(draw: st.DrawFn) -> tuple[SozuVersion, Any]:
    """(version, the serde JSON of one of its state requests), possibly damaged."""
    state = draw(states())
    reqs = state_requests(state)
    if not reqs:
        reqs = [pb.Request(add_cluster=pb.Cluster(cluster_id="c"))]
    req = draw(st.sampled_from(reqs))
    return state.version, draw(damaged(serde.to_json(req, state.version)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests_json())
def test_the_compiled_reader_builds_what_the_walk_builds_and_refuses_no_more(case: tuple[SozuVersion, Any]) -> None:
    version, value = case
    fast = _outcome(lambda: serde.from_json(pb.Request, value, version))
    walked = _outcome(lambda: _walked(pb.Request, value, version))
    assert fast[0] == walked[0], f"{fast} != {walked} for {value!r}"
    if fast[0] == "ok":
        assert fast[1][0] == walked[1][0]
        assert fast[1][2] == walked[1][2]  # presence too (an empty sub-message that is set)
    else:
        assert fast[1] == walked[1]


def _fixture_requests() -> list[tuple[SozuVersion, Any]]:
    """Every distinct request of the captured state files (real sozu output), with its version."""
    out: dict[bytes, tuple[SozuVersion, Any]] = {}
    for d, v in {"sozu-2.1.0": "2.1.0", "sozu-1.1.1": "1.1.1", "sozu-0.15.19": "0.15.19"}.items():
        for path in sorted((FIXTURES / d / "states").glob("*.state")):
            for raw in path.read_bytes().split(b"\0")[:-1]:
                content = msgspec.json.decode(raw)["content"]
                out.setdefault(v.encode() + msgspec.json.encode(content), (SozuVersion.parse(v), content))
    return list(out.values())


def _variants_of(value: Any, max_places: int) -> Iterator[Any]:
    """``value`` with, at every place in turn, each odd value, the place removed, or an extra key (at
    ``max_places`` places drawn with a fixed seed when it has more: a list answer has thousands)."""
    places = _paths(value)
    if len(places) > max_places:
        places = random.Random(len(places)).sample(places, max_places)
    for place in places:
        for odd in (*ODD_VALUES, _REMOVE, _EXTRA):
            if not place:
                if odd is not _REMOVE and odd is not _EXTRA:
                    yield odd
                continue
            copy_ = _copy(value)
            parent = copy_
            for step in place[:-1]:
                parent = parent[step]
            if odd is _REMOVE:
                del parent[place[-1]]
            elif odd is _EXTRA:
                if not isinstance(parent[place[-1]], dict):
                    continue
                parent[place[-1]]["extra"] = 1
            else:
                parent[place[-1]] = odd
            yield copy_


_REMOVE, _EXTRA = object(), object()


def _fixture_responses() -> list[tuple[SozuVersion, Any]]:
    """Every distinct response frame sozu 0.15 sent (JSON, its socket format), decoded."""
    out: dict[bytes, tuple[SozuVersion, Any]] = {}
    for path in sorted((FIXTURES / "sozu-0.15.19" / "frames").glob("*.resp-*.bin")):
        raw = path.read_bytes().rstrip(b"\0")
        out.setdefault(raw, (SozuVersion.parse("0.15.19"), msgspec.json.decode(raw)))
    return list(out.values())


@pytest.mark.parametrize("cls", [pb.Request, pb.Response], ids=["state records", "0.15 responses"])
def test_the_compiled_reader_agrees_with_the_walk_on_every_damage_to_every_captured_message(
    cls: type[pb.Request],
) -> None:
    checked = {"ok": 0, "error": 0}
    for version, content in _fixture_requests() if cls is pb.Request else _fixture_responses():
        for value in _variants_of(content, 1000 if cls is pb.Request else 40):
            fast = _outcome(lambda value=value, version=version: serde.from_json(cls, value, version))
            walked = _outcome(lambda value=value, version=version: _walked(cls, value, version))
            assert fast[0] == walked[0], f"sozu {version}: {fast} != {walked} for {value!r}"
            if fast[0] == "ok":
                assert fast[1][0] == walked[1][0] and fast[1][2] == walked[1][2], f"sozu {version}: {value!r}"
            else:
                assert fast[1] == walked[1]
            checked[fast[0]] += 1
    assert checked["ok"] > 1000 and checked["error"] > 1000, checked


@settings(max_examples=200, deadline=None)
@given(states())
def test_the_compiled_reader_takes_every_request_sozud_writes(state: Any) -> None:
    # Not vacuous: the fast path really is the path for what sozu and sozud write.
    for req in state_requests(state):
        value = msgspec.json.decode(msgspec.json.encode(serde.to_json(req, state.version)))
        kwargs = serde._compiled(pb.Request.DESCRIPTOR, state.version)(value)
        assert pb.Request(**kwargs) == req


def _records(data: bytes) -> list[bytes]:
    return [r + b"\0" for r in data.split(b"\0")[:-1]]


@st.composite
def damaged_files(draw: st.DrawFn) -> tuple[SozuVersion, SozuVersion, bytes]:
    """(the file's version, the version it is read as, a state file with record-level damage)."""
    state = draw(states())
    recs = _records(write_state_file(state))
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["duplicate", "drop", "swap", "edit", "remove_first"]))
        if not recs:
            break
        i = draw(st.integers(0, len(recs) - 1))
        if how == "duplicate":
            recs.insert(draw(st.integers(0, len(recs))), recs[i])
        elif how == "drop":
            del recs[i]
        elif how == "swap":
            j = draw(st.integers(0, len(recs) - 1))
            recs[i], recs[j] = recs[j], recs[i]
        elif how == "edit":
            value = msgspec.json.decode(recs[i][:-1])
            recs[i] = msgspec.json.encode(draw(damaged(value))) + b"\0"
        else:
            recs[i] = recs[i].replace(b'"ADD_', b'"REMOVE_', 1)
    read_as = draw(st.sampled_from([state.version, state.version, *VERSIONS]))
    return state.version, read_as, b"".join(recs)


def _parse_outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except StateError as e:
        return "error", f"{type(e).__name__}: {e}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_files(), st.booleans())
def test_the_streaming_parse_gives_the_reference_parse_state_or_error(
    case: tuple[SozuVersion, SozuVersion, bytes], cached: bool
) -> None:
    _, read_as, data = case
    raws = list(codec.iter_records(data, source="f")) if data else []
    reference = _parse_outcome(lambda: codec._parse_reference(raws, read_as, "f", None, None, None))
    cache = codec.RecordCache() if cached else None
    if cache is not None:  # a cache that saw a neighbouring file: some records reused, others decoded
        with contextlib.suppress(StateError):
            parse_state_file(data[: data.rfind(b"\0", 0, len(data) - 1) + 1], read_as, source="f", cache=cache)
    got = _parse_outcome(lambda: parse_state_file(data, read_as, source="f", allow_empty=True, cache=cache))
    if not data:
        return
    assert got[0] == reference[0], f"{got} != {reference}"
    assert got[1] == reference[1]
    if got[0] == "ok":
        streamed = codec._parse_streaming(raws, read_as, "f", None)[0]
        assert streamed == reference[1]
