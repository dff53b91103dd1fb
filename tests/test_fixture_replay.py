"""Replays every captured exchange of real sozu (2.1.0, 1.1.1, 0.15.19) against the simulator.

One ``FakeSozu`` per version replays the whole scenario of ``shared/fixtures/sozu-<V>/index.json`` in
the captured order, one connection per exchange (as the CLI did), and each exchange's answers are
compared with the captured ones: the same status sequence, the same messages and the same content.
Values no simulator can reproduce are compared by shape (see ``_normalise``): cluster hashes (keys
kept, values replaced, main and workers must agree), pids, the per-worker order inside FAILURE
messages and of worker events, certificate/TCP-frontend record order in state files, the order of
0.15's certificate names (a hash-set order in 0.15 itself). Where sozu gave no answer the test waits
a bounded time for a frame and requires none (or, for 0.15's malformed input, requires EOF).

Special cases (and why):

- ``/srv/sozu/...`` paths in ``save_state``/``load_state`` requests are rewritten to a temporary
  directory and mapped back in the answers; before ``state-load-01-populated`` the fixture's own
  ``01-populated.state`` (the real sozu's file) is copied there, so the load reads real sozu bytes.
- The instance starts from ``00-initial.state`` as ``config_state``: it stands for the TOML listeners
  of the capture (the same records, and the same request counters as the captured config load).
- The event subscription is recorded as one exchange at the end of the scenario but ran in the
  background from the start: it is opened right after ``state-save-00-initial`` (2.1.0, 1.1.1) or
  right after ``events-cli`` (0.15.19, where the subscriber is named after the connection's ordinal),
  and each captured event is checked during the step named in its ``arrived_during_step``.
- Clusters found by domain are compared in id order (the main process lists them in a hash-set order).
- 1.1.1 ``certificate-list-after-replace-remove``: see ``UNORDERED_CERTIFICATE_NAMES`` (the only
  exchange with a per-exchange exception).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict

from sozud.proto import command_pb2 as pb
from sozud.testing.fake_sozu import FakeSozu

FIXTURES = Path(os.environ.get("SOZUD_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
VERSIONS = ("2.1.0", "1.1.1", "0.15.19")
STATE_PREFIX = {
    "2.1.0": "/srv/sozu/states-2.1.0/",
    "1.1.1": "/srv/sozu/states-1.1.1/",
    "0.15.19": "/srv/sozu/sozu-0.15.19/states/",
}
SUBSCRIBE_AFTER = {"2.1.0": "state-save-00-initial", "1.1.1": "state-save-00-initial", "0.15.19": "events-cli"}
SUBSCRIPTION = {"2.1.0": "events-subscription", "1.1.1": "events-subscription", "0.15.19": "events-subscription-py"}
# Exchanges whose answer depends on a hash-map order of sozu's that the simulator cannot reproduce.
# 1.1.1 certificate-list-after-replace-remove: fingerprint 478b... is stored on two listeners, once with
# the derived names (add_certificate on 11099) and once with names [] (replace_certificate stores the
# certificate as sent); the answer is keyed by fingerprint, so sozu returns whichever entry its
# HashMap<SocketAddr, ...> yields last (2.1.0 returned the other one in the same scenario). The
# certificate, chain and key are still compared; the ``names`` of entries are not.
UNORDERED_CERTIFICATE_NAMES = {("1.1.1", "certificate-list-after-replace-remove")}
NO_FRAME_WAIT_S = 0.3
FRAME_DEADLINE_S = 10.0
_STATUS_NAME = {0: "OK", 1: "PROCESSING", 2: "FAILURE"}


@dataclass
class Result:
    """Outcome of one replayed exchange: empty ``problems`` = identical (modulo documented shapes)."""

    name: str
    problems: list[str] = field(default_factory=list)


@dataclass
class Replay:
    version: str
    results: dict[int, Result] = field(default_factory=dict)
    state_checks: dict[str, list[str]] = field(default_factory=dict)
    events_compared: int = 0


# --- frames ----------------------------------------------------------------------------------------


class Client:
    def __init__(self, version: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.json = version.startswith("0.")
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, version: str, path: str) -> Client:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(version, reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self) -> dict[str, Any]:
        """The next answer in the fixture's decoded form (raises IncompleteReadError on EOF)."""
        if self.json:
            raw = await self.reader.readuntil(b"\x00")
            value: dict[str, Any] = json.loads(raw[:-1])
            return value
        (length,) = struct.unpack("<Q", await self.reader.readexactly(8))
        resp = pb.Response()
        resp.ParseFromString(await self.reader.readexactly(length - 8))
        out: dict[str, Any] = {"status": _STATUS_NAME[resp.status], "message": resp.message}
        if resp.HasField("content"):
            out["content"] = MessageToDict(resp.content, preserving_proto_field_name=True)
        return out

    async def no_frame(self) -> str | None:
        """None when nothing arrives within a bounded wait (EOF counts as nothing); else what came."""
        try:
            got = await asyncio.wait_for(self.frame(), NO_FRAME_WAIT_S)
        except (TimeoutError, asyncio.IncompleteReadError):
            return None
        return f"unexpected frame {got}"

    async def eof(self) -> str | None:
        try:
            got = await asyncio.wait_for(self.frame(), FRAME_DEADLINE_S)
        except asyncio.IncompleteReadError:
            return None
        except TimeoutError:
            return "connection neither answered nor closed"
        return f"expected the connection to be closed, got {got}"

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            await self.writer.wait_closed()


# --- normalisation -------------------------------------------------------------------------------


def _expected(version: str, resp: dict[str, Any]) -> dict[str, Any]:
    if version.startswith("0."):
        decoded: dict[str, Any] = resp["decoded"]
        return decoded
    out: dict[str, Any] = {"status": resp["status"], "message": resp["message"]}
    if resp.get("content") is not None:
        out["content"] = resp["content"]
    return out


def _sorted_failure(message: str) -> str:
    """Per-worker parts ``"0: x, 1: y"`` in a fixed order (their order varies in sozu)."""
    parts = []
    rest = message
    starts = [m.start() for m in re.finditer(r"(?:^|, )\d+: ", rest)]
    if not starts or starts[0] != 0:
        return message
    bounds = [*starts, len(rest)]
    for a, b in itertools.pairwise(bounds):
        parts.append(rest[a:b].removeprefix(", "))
    return ", ".join(sorted(parts))


def _normalise(value: Any) -> Any:
    """Replace what no simulator can reproduce by its shape (recursively)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in ("cluster_hashes", "CLUSTER_HASHES"):
                mapping = v.get("map", {}) if isinstance(v, dict) else {}
                out[k] = {"map": {cid: "<hash>" for cid in mapping}} if mapping or "map" in v else {}
            elif k == "pid":
                out[k] = "<pid>"
            elif (k == "vec" and isinstance(v, list) and v and isinstance(v[0], dict) and "pid" in v[0]) or (
                k == "certificate_summaries" and isinstance(v, list)
            ):
                out[k] = sorted((_normalise(x) for x in v), key=lambda w: json.dumps(w, sort_keys=True))
            elif k == "vec" and isinstance(v, list) and v and isinstance(v[0], dict) and "configuration" in v[0]:
                # clusters found by domain come in a hash-set order on the main process
                out[k] = sorted((_normalise(x) for x in v), key=lambda c: str(c["configuration"]))
            elif k == "names" and isinstance(v, list):
                out[k] = sorted(v)
            elif k == "message" and isinstance(v, str):
                out[k] = _sorted_failure(v)
            else:
                out[k] = _normalise(v)
        return out
    if isinstance(value, list):
        return [_normalise(x) for x in value]
    return value


def _drop_names(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_names(v) for k, v in value.items() if k != "names"}
    if isinstance(value, list):
        return [_drop_names(x) for x in value]
    return value


def _first_difference(got: Any, expected: Any, path: str = "") -> str | None:
    """Where two decoded answers first differ (a short text), or None."""
    if isinstance(got, dict) and isinstance(expected, dict):
        for k in sorted(set(got) | set(expected)):
            if k not in got or k not in expected:
                side = "missing" if k not in got else "unexpected"
                return f"{path}.{k}: {side} (expected {str(expected.get(k))[:200]})"
            diff = _first_difference(got[k], expected[k], f"{path}.{k}")
            if diff:
                return diff
        return None
    if isinstance(got, list) and isinstance(expected, list):
        if len(got) != len(expected):
            return f"{path}: {len(got)} items, expected {len(expected)}: {str(got)[:300]} vs {str(expected)[:300]}"
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            diff = _first_difference(a, b, f"{path}[{i}]")
            if diff:
                return diff
        return None
    if got != expected:
        return f"{path}: got {str(got)[:300]!r}, expected {str(expected)[:300]!r}"
    return None


def _hashes_agree(frame: dict[str, Any]) -> str | None:
    """Cluster hashes cannot equal sozu's, but main and every worker must report the same ones."""
    text = json.dumps(frame)
    if "luster_hashes" not in text and "CLUSTER_HASHES" not in text:
        return None
    content = frame.get("content") or {}
    maps: list[Any] = []
    if "worker_responses" in content:
        for entry in content["worker_responses"].get("map", {}).values():
            maps.append(entry.get("cluster_hashes", {}).get("map", {}))
    elif content and "content_type" in content:
        for entry in content["content_type"]["WORKER_RESPONSES"]["map"].values():
            maps.append(entry["content_type"]["CLUSTER_HASHES"]["map"])
    if any(m != maps[0] for m in maps):
        return f"cluster hashes differ between main and workers: {maps}"
    return None


def _unmap_paths(value: Any, tmp: str, prefix: str) -> Any:
    text = json.dumps(value)
    return json.loads(text.replace(tmp.rstrip("/") + "/", prefix))


# --- state files --------------------------------------------------------------------------------


def _records(data: bytes) -> list[bytes]:
    assert data.endswith(b"\n\x00") or not data
    return [r for r in data.split(b"\n\x00") if r]


def _content_of(record: bytes) -> bytes:
    value = json.loads(record)
    return json.dumps(value["content"], separators=(",", ":")).encode()


def compare_state_files(got: bytes, expected: bytes) -> list[str]:
    """Records equal as a multiset (certificate and TCP-frontend order is a hash order in sozu), and
    byte-equal at every position outside those two record kinds; ids numbered SAVE-0.. in order."""
    problems: list[str] = []
    g, e = _records(got), _records(expected)
    if len(g) != len(e):
        problems.append(f"{len(g)} records, expected {len(e)}")
    if sorted(map(_content_of, g)) != sorted(map(_content_of, e)):
        problems.append("records differ as a multiset")
    for i, rec in enumerate(g):
        if json.loads(rec)["id"] != f"SAVE-{i}":
            problems.append(f"record {i} has id {json.loads(rec)['id']}")
    for i, (a, b) in enumerate(zip(g, e, strict=False)):
        unordered = (b'"ADD_CERTIFICATE"', b'"ADD_TCP_FRONTEND"')
        if any(k in b for k in unordered) and any(k in a for k in unordered):
            continue
        if a != b:
            problems.append(f"record {i} differs: {a[:160]!r} vs {b[:160]!r}")
            break
    return problems


def _compare_files(got: Path, expected: Path) -> list[str]:
    return compare_state_files(got.read_bytes(), expected.read_bytes())


# --- the replay ------------------------------------------------------------------------------------


def _rewrite_request(version: str, raw: bytes, tmp: str) -> bytes:
    prefix = STATE_PREFIX[version]
    if version.startswith("0."):
        return raw.replace(prefix.encode(), (tmp.rstrip("/") + "/").encode())
    req = pb.Request()
    req.ParseFromString(raw[8:])
    kind = req.WhichOneof("request_type")
    if kind in ("save_state", "load_state"):
        setattr(req, kind, getattr(req, kind).replace(prefix, tmp.rstrip("/") + "/"))
        body = req.SerializeToString(deterministic=True)
        return struct.pack("<Q", len(body) + 8) + body
    return raw


def _compare_events(version: str, got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> list[str]:
    """Same frames in the same order, except that worker events of one step form a multiset."""

    def key(frame: dict[str, Any]) -> tuple[int, str]:
        is_worker = frame.get("message") not in ("main",) and "event" in json.dumps(frame).lower()
        return (1 if is_worker else 0, json.dumps(frame, sort_keys=True))

    g = [_normalise(x) for x in got]
    e = [_normalise(x) for x in expected]
    if [x for x in g if key(x)[0] == 0] != [x for x in e if key(x)[0] == 0]:
        return [f"main events differ: got {g} expected {e}"]
    if sorted(map(key, g)) != sorted(map(key, e)):
        return [f"events differ: got {g} expected {e}"]
    return []


async def _replay(version: str, tmp: str) -> Replay:
    base = FIXTURES / f"sozu-{version}"
    index = json.loads((base / "index.json").read_text())
    out = Replay(version)
    sock = tempfile.mkdtemp(prefix="sz") + "/s.sock"
    autosave = f"{tmp}/autosave.state" if version.startswith("0.") else None
    prefix = STATE_PREFIX[version]
    fake = FakeSozu(
        sock,
        version,
        worker_timeout_s=10.0,
        max_command_buffer_size=163_840,
        config_state=(base / "states" / "00-initial.state").read_bytes(),
        automatic_state_save=autosave,
        cwd=tmp,
    )
    subscription_name = SUBSCRIPTION[version]
    sub_exchange = next(e for e in index["exchanges"] if e["name"] == subscription_name)
    events_by_step: dict[str, list[dict[str, Any]]] = {}
    first_events: list[dict[str, Any]] = []
    for resp in sub_exchange["responses"]:
        step = resp.get("arrived_during_step")
        if step is None:
            first_events.append(_expected(version, resp))
        else:
            events_by_step.setdefault(step.split("#")[0], []).append(_expected(version, resp))
    autosaves = {a["after_exchange"]: a["state"] for a in index.get("autosave_copies", [])}
    sub: Client | None = None
    sub_result = Result(subscription_name)
    async with fake:
        for ex in index["exchanges"]:
            n, name = ex["n"], ex["name"]
            result = Result(name)
            out.results[n] = result
            if name == subscription_name:
                continue  # checked step by step below, reported at the end
            if name == "state-load-01-populated":
                shutil.copy(base / "states" / "01-populated.state", f"{tmp}/01-populated.state")
            raw = (base / ex["request_file"]).read_bytes()
            client = await Client.open(version, sock)
            await client.send(_rewrite_request(version, raw, tmp))
            expected = [_expected(version, r) for r in ex["responses"]]
            observation = ex.get("client_observation") or ""
            if not expected:
                if "closed" in observation:
                    problem = await client.eof()
                else:
                    problem = await client.no_frame()
                if problem:
                    result.problems.append(problem)
            else:
                got: list[dict[str, Any]] = []
                for _ in expected:
                    try:
                        got.append(await asyncio.wait_for(client.frame(), FRAME_DEADLINE_S))
                    except (TimeoutError, asyncio.IncompleteReadError) as e:
                        result.problems.append(f"missing frame after {len(got)}: {e!r}")
                        break
                got = [_unmap_paths(x, tmp, prefix) for x in got]
                for g in got:
                    bad = _hashes_agree(g)
                    if bad:
                        result.problems.append(bad)
                got_n, expected_n = _normalise(got), _normalise(expected)
                if (version, name) in UNORDERED_CERTIFICATE_NAMES:
                    got_n, expected_n = _drop_names(got_n), _drop_names(expected_n)
                difference = _first_difference(got_n, expected_n)
                if difference:
                    result.problems.append(f"answers differ: {difference}")
            await client.close()
            if ex["request_kind"] == "save_state":
                file_name = (
                    ex["request"]["save_state"].rsplit("/", 1)[1]
                    if not version.startswith("0.")
                    else ex["request"]["request_type"]["SAVE_STATE"].rsplit("/", 1)[1]
                )
                problems = _compare_files(Path(tmp, file_name), base / "states" / file_name)
                out.state_checks[file_name] = problems
                result.problems.extend(f"state file {file_name}: {p}" for p in problems)
            if n in autosaves and autosave is not None:
                file_name = autosaves[n]
                problems = _compare_files(Path(autosave), base / "states" / file_name)
                out.state_checks[file_name] = problems
                result.problems.extend(f"autosave {file_name}: {p}" for p in problems)
            if sub is not None:
                want = events_by_step.pop(name, [])
                got_events: list[dict[str, Any]] = []
                for _ in want:
                    try:
                        got_events.append(await asyncio.wait_for(sub.frame(), FRAME_DEADLINE_S))
                    except (TimeoutError, asyncio.IncompleteReadError):
                        break
                out.events_compared += len(got_events)
                problems = _compare_events(version, got_events, want)
                sub_result.problems.extend(f"during {name}: {p}" for p in problems)
            if name == SUBSCRIBE_AFTER[version]:
                sub = await Client.open(version, sock)
                await sub.send((base / sub_exchange["request_file"]).read_bytes())
                acks: list[dict[str, Any]] = []
                for _ in first_events:
                    acks.append(await asyncio.wait_for(sub.frame(), FRAME_DEADLINE_S))
                out.events_compared += len(acks)
                if _normalise(acks) != _normalise(first_events):
                    sub_result.problems.append(f"subscription answer {acks} expected {first_events}")
        if events_by_step:
            sub_result.problems.append(f"events expected during steps never replayed: {list(events_by_step)}")
        if sub is not None:
            extra = await sub.no_frame()
            if extra:
                sub_result.problems.append(f"after the scenario: {extra}")
            await sub.close()
    out.results[sub_exchange["n"]] = sub_result
    return out


_REPLAYS: dict[str, Replay] = {}


def _replay_of(version: str) -> Replay:
    if version not in _REPLAYS:
        tmp = tempfile.mkdtemp(prefix="szr")
        try:
            _REPLAYS[version] = asyncio.run(_replay(version, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _REPLAYS[version]


def _exchange_ids() -> Iterator[tuple[str, int, str]]:
    for version in VERSIONS:
        index = json.loads((FIXTURES / f"sozu-{version}" / "index.json").read_text())
        for ex in index["exchanges"]:
            yield version, ex["n"], ex["name"]


_CASES = list(_exchange_ids())


@pytest.mark.parametrize(("version", "n", "name"), _CASES, ids=[f"{v}-{n:03d}-{name}" for v, n, name in _CASES])
def test_exchange(version: str, n: int, name: str) -> None:
    result = _replay_of(version).results[n]
    assert result.name == name
    assert not result.problems, "\n".join(result.problems)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_state_file_was_compared(version: str) -> None:
    replay = _replay_of(version)
    names = {p.name for p in (FIXTURES / f"sozu-{version}" / "states").iterdir()} - {"00-initial.state"}
    compared = set(replay.state_checks) - {"00-initial.state"}
    assert compared == names
    assert all(not problems for problems in replay.state_checks.values()), replay.state_checks


@pytest.mark.parametrize("version", VERSIONS)
def test_every_event_frame_was_compared(version: str) -> None:
    index = json.loads((FIXTURES / f"sozu-{version}" / "index.json").read_text())
    subscription = next(e for e in index["exchanges"] if e["name"] == SUBSCRIPTION[version])
    assert _replay_of(version).events_compared == len(subscription["responses"])


def test_state_file_comparison_can_fail() -> None:
    data = (FIXTURES / "sozu-2.1.0" / "states" / "01-populated.state").read_bytes()
    records = _records(data)
    swapped = records[:]
    swapped[4], swapped[5] = swapped[5], swapped[4]  # two clusters: their order is sozu's, fixed
    assert compare_state_files(b"".join(r + b"\n\x00" for r in swapped), data)
    assert compare_state_files(b"".join(r + b"\n\x00" for r in records[:-1]), data)
    assert not compare_state_files(data, data)
