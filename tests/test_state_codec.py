"""State-file codec: fixture round trips, version detection, strictness, truncation and completeness."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import FIXTURES, fixture_certificate, sock, state_pairs, states

from sozud.errors import StateParseError, UnsafePlanError, VersionMismatchError
from sozud.proto import command_pb2 as pb
from sozud.state.codec import (
    RecordCache,
    detect_family,
    parse_state_file,
    record_count,
    write_state_file,
)
from sozud.state.model import ConfigState, certificate_fingerprint
from sozud.state.plan import plan
from sozud.versions import V0_15_19, V1_1_1, V2_1_0, SozuVersion

FIXTURE_FILES = sorted(FIXTURES.glob("sozu-*/states/*.state"))
VERSION_OF_DIR = {"sozu-0.15.19": V0_15_19, "sozu-1.1.1": V1_1_1, "sozu-2.1.0": V2_1_0}
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _version(path: Path) -> SozuVersion:
    return VERSION_OF_DIR[path.parent.parent.name]


def _id(path: Path) -> str:
    return f"{path.parent.parent.name}/{path.name}"


def _records(data: bytes) -> list[bytes]:
    assert data.endswith(b"\0")
    return data.split(b"\0")[:-1]


# --- fixtures: parse and write back ------------------------------------------------------------------------

UNORDERED = (b'"ADD_CERTIFICATE"', b'"ADD_TCP_FRONTEND"', b'"ADD_UDP_FRONTEND"')


def _split_order(data: bytes) -> tuple[list[bytes], Counter[bytes]]:
    """Records in order, with the records whose order sozu does not fix replaced by a placeholder and
    collected (without their SAVE-n id, which follows the order) as a multiset."""
    ordered: list[bytes] = []
    loose: Counter[bytes] = Counter()
    for rec in _records(data):
        if any(marker in rec for marker in UNORDERED):
            ordered.append(b"<hash-map order>")
            loose[re.sub(rb'"id":"SAVE-\d+"', b'"id":"SAVE-?"', rec)] += 1
        else:
            ordered.append(rec)
    return ordered, loose


def test_fixture_files_exist() -> None:
    assert len(FIXTURE_FILES) == 19


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=_id)
def test_fixture_parses_and_writes_back_the_same_records(path: Path) -> None:
    data = path.read_bytes()
    state = parse_state_file(data, source=str(path))
    assert state.version == _version(path)
    out = write_state_file(state)
    # sozu orders certificate and TCP-frontend records by hash-map iteration: those records (and hence
    # their SAVE-n ids) are compared as a multiset; every other record must be at the same place, byte
    # for byte.
    assert _split_order(out) == _split_order(data)
    assert record_count(state) == len(_records(data))
    if not any(marker in data for marker in UNORDERED):
        assert out == data


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=_id)
def test_fixture_parse_with_explicit_version_equals_detected(path: Path) -> None:
    data = path.read_bytes()
    assert parse_state_file(data, _version(path), source="f") == parse_state_file(data, source="f")
    assert detect_family(data) is _version(path).family


def test_fixture_contents_as_seen_by_sozu() -> None:
    state = parse_state_file((FIXTURES / "sozu-2.1.0/states/02-mid.state").read_bytes(), source="mid")
    counts = state.counts()
    # 02-mid on 2.1.0 (scenario steps 71-94): HTTP 21080 and 21081 (deactivated at step 85), HTTPS 21443
    # (21444 was removed at step 87), TCP 21432; 10 HTTP + 3 HTTPS frontends, 3 certificates, 3 TCP
    # frontends (two on one cluster and address, with and without tags), 8 backends.
    assert counts == {
        "listener": 4,
        "cluster": 6,
        "http_frontend": 10,
        "certificate": 3,
        "https_frontend": 3,
        "tcp_frontend": 3,
        "backend": 8,
    }
    listener = state.get(("listener", "tcp", "127.0.0.1:21432"))
    assert isinstance(listener, pb.TcpListenerConfig) and listener.active
    inactive = [k for k, v in state.of_kind("listener") if not getattr(v, "active")]  # noqa: B009
    assert inactive == [("listener", "http", "127.0.0.1:21081")]


@pytest.mark.parametrize(
    ("path", "wrong"),
    [
        ("sozu-0.15.19/states/01-populated.state", V2_1_0),
        ("sozu-0.15.19/states/01-populated.state", V1_1_1),
        ("sozu-2.1.0/states/01-populated.state", V0_15_19),
        ("sozu-1.1.1/states/01-populated.state", V0_15_19),
        ("sozu-2.1.0/states/01-populated.state", V1_1_1),
    ],
)
def test_explicit_version_contradicting_the_content(path: str, wrong: SozuVersion) -> None:
    with pytest.raises(VersionMismatchError, match=str(wrong)):
        parse_state_file((FIXTURES / path).read_bytes(), wrong, source=path)


def test_a_1x_file_is_readable_as_2x() -> None:
    data = (FIXTURES / "sozu-1.1.1/states/02-mid.state").read_bytes()
    as_v1 = parse_state_file(data, source="v1")
    as_v2 = parse_state_file(data, V2_1_0, source="v1")
    assert as_v2.version == V2_1_0
    assert as_v2 == as_v1


# --- round trips of generated states -------------------------------------------------------------------


@FAST
@given(states())
def test_generated_state_round_trips(state: ConfigState) -> None:
    data = write_state_file(state)
    back = parse_state_file(data, state.version, source="gen", allow_empty=True)
    assert back == state
    assert write_state_file(back) == data
    assert record_count(state) == data.count(b"\0")


def test_writer_order_and_ids() -> None:
    state = ConfigState(V1_1_1)
    state.add("backend", pb.AddBackend(cluster_id="c", backend_id="b1", address=sock("10.0.0.2:80")))
    state.add("backend", pb.AddBackend(cluster_id="c", backend_id="b0", address=sock("10.0.0.9:80")))
    state.add(
        "cluster", pb.Cluster(cluster_id="z", sticky_session=False, https_redirect=False, load_balancing=pb.ROUND_ROBIN)
    )
    state.add(
        "cluster", pb.Cluster(cluster_id="a", sticky_session=False, https_redirect=False, load_balancing=pb.ROUND_ROBIN)
    )
    for addr in ("[::1]:80", "10.0.0.1:81", "10.0.0.1:80"):
        state.add_listener(
            "tcp",
            pb.TcpListenerConfig(
                address=sock(addr),
                expect_proxy=False,
                front_timeout=60,
                back_timeout=30,
                connect_timeout=3,
                active=addr == "10.0.0.1:81",
            ),
        )
    cert = pb.AddCertificate(address=sock("10.0.0.1:443"), certificate=fixture_certificate("api.example.test"))
    cert.expired_at = 12345  # never stored, never written
    state.add("certificate", cert)
    data = write_state_file(state)
    recs = _records(data)
    kinds = [re.search(rb'"request_type":\{"([A-Z_]+)"', r).group(1).decode() for r in recs]  # type: ignore[union-attr]
    assert kinds == [
        "ADD_TCP_LISTENER",
        "ADD_TCP_LISTENER",
        "ACTIVATE_LISTENER",
        "ADD_TCP_LISTENER",
        "ADD_CLUSTER",
        "ADD_CLUSTER",
        "ADD_CERTIFICATE",
        "ADD_BACKEND",
        "ADD_BACKEND",
    ]
    assert [re.search(rb'"id":"(SAVE-\d+)"', r).group(1) for r in recs] == [  # type: ignore[union-attr]
        f"SAVE-{i}".encode() for i in range(9)
    ]
    assert b'"port":80},"public_address"' in recs[0] and b'"V4":167772161' in recs[0]  # 10.0.0.1:80 first
    assert b'"V6"' in recs[3]  # IPv6 after IPv4
    assert b'"cluster_id":"a"' in recs[4]
    assert b'"backend_id":"b0"' in recs[7]
    assert b'"expired_at":null' in recs[6]
    assert all(r.endswith(b"\n") for r in recs)


# --- strictness ----------------------------------------------------------------------------------------

GOOD = (FIXTURES / "sozu-2.1.0/states/01-populated.state").read_bytes()


def _with_record(n: int, new: bytes, data: bytes = GOOD) -> bytes:
    recs = _records(data)
    recs[n] = new
    return b"\0".join(recs) + b"\0"


@pytest.mark.parametrize(
    ("data", "record", "pattern"),
    [
        (b"", None, "empty state file"),
        (GOOD[:-1], 35, "truncated last record"),
        (GOOD + b"{", 36, "truncated last record"),
        (GOOD + b"\n", 36, "truncated last record"),
        (_with_record(3, b'{"id":"SAVE-3","content":'), 3, "not a JSON record"),
        (_with_record(2, b'{"id":"x","content":{"request_type":{"ADD_CLUSTER":{"cluster_id":"\xff"}}}}'), 2, "UTF-8"),
        (_with_record(4, b""), 4, "empty record"),
        (_with_record(4, b"[1,2]"), 4, "JSON object"),
        (_with_record(4, b'{"id":"x","content":{"request_type":{"STATUS":{}}}}'), 4, "not a configuration request"),
        (_with_record(4, b'{"id":"x","content":{"request_type":{"CONFIGURE_METRICS":1}}}'), 4, "not a configuration"),
        (_with_record(4, b'{"id":"x","content":{"request_type":{"NO_SUCH":{}}}}'), 4, "unknown request_type"),
        (_with_record(4, b'{"id":"x","content":{"request_type":null}}'), 4, "no request"),
        (
            _with_record(4, GOOD.split(b"\0")[4].replace(b'"cluster_id":"app1",', b'"cluster_id":"app1","x":1,')),
            4,
            "unknown field 'x'",
        ),
        (_with_record(4, GOOD.split(b"\0")[4].replace(b'"sticky_session":true,', b"")), 4, "missing required"),
        # an enum number past 32 bits (the protobuf runtime's lookup truncated it: 2**32 + 2 was TREE)
        (_with_record(10, GOOD.split(b"\0")[10].replace(b'"position":2', b'"position":4294967298')), 10, "not a known"),
        # a second copy of record 0: sozu's main state refuses a duplicate listener (load_state skips it)
        (_with_record(4, GOOD.split(b"\0")[0]), 4, "already exists"),
        # a record nested 1,000 levels deep (issue 12: a RecursionError traceback)
        (_with_record(3, b'{"id":"SAVE-3","content":' + b"[" * 1000 + b"]" * 1000 + b"}\n"), 3, "nested too deeply"),
        (_with_record(3, b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"\n"), 3, "nested too deeply"),
    ],
)
def test_bad_files_are_refused_with_the_record(data: bytes, record: int | None, pattern: str) -> None:
    with pytest.raises(StateParseError, match=pattern) as info:
        parse_state_file(data, V2_1_0, source="shared:igw/cfg/sozu")
    assert info.value.record == record
    assert "shared:igw/cfg/sozu" in str(info.value)
    if record is not None:
        assert f"record {record}" in str(info.value)


def test_unknown_field_error_names_the_path() -> None:
    bad = _with_record(4, GOOD.split(b"\0")[4].replace(b'"cluster_id":"app1",', b'"cluster_id":"app1","x":1,'))
    with pytest.raises(StateParseError) as info:
        parse_state_file(bad, V2_1_0, source="s")
    assert info.value.path is not None and info.value.path.endswith("ADD_CLUSTER.x")


def test_empty_file_allowed_on_request() -> None:
    assert len(parse_state_file(b"", V1_1_1, source="s", allow_empty=True)) == 0
    with pytest.raises(StateParseError, match="records"):
        parse_state_file(b"", V1_1_1, source="s", allow_empty=True, expect_records=3)


def test_nul_alone_separates_records_and_ids_are_ignored() -> None:
    data = (FIXTURES / "sozu-1.1.1/states/00-initial.state").read_bytes()
    squeezed = re.sub(rb'"id":"SAVE-\d+"', b'"id":"anything"', data.replace(b"\n\0", b"\0"))
    assert parse_state_file(squeezed, source="s") == parse_state_file(data, source="s")


def test_remove_and_other_state_records_are_applied() -> None:
    base = ConfigState(V1_1_1)
    base.add(
        "cluster",
        pb.Cluster(cluster_id="c1", sticky_session=False, https_redirect=False, load_balancing=pb.ROUND_ROBIN),
    )
    data = write_state_file(base)
    extra = [
        pb.Request(add_backend=pb.AddBackend(cluster_id="c1", backend_id="b1", address=sock("10.0.0.1:80"))),
        pb.Request(add_backend=pb.AddBackend(cluster_id="c1", backend_id="b2", address=sock("10.0.0.2:80"))),
        pb.Request(remove_backend=pb.RemoveBackend(cluster_id="c1", backend_id="b1", address=sock("10.0.0.1:80"))),
        pb.Request(remove_cluster="c1"),
        pb.Request(
            add_cluster=pb.Cluster(cluster_id="c3", sticky_session=True, https_redirect=False, load_balancing=pb.RANDOM)
        ),
    ]
    import msgspec

    from sozud import serde

    for i, req in enumerate(extra):
        data += msgspec.json.encode(serde.to_json(pb.WorkerRequest(id=f"D-{i}", content=req), V1_1_1)) + b"\n\0"
    state = parse_state_file(data, source="delta")
    assert sorted(state) == [("backend", "c1", "b2", "10.0.0.2:80"), ("cluster", "c3")]


def test_a_removal_of_a_missing_object_is_refused() -> None:
    rec = b'{"id":"x","content":{"request_type":{"REMOVE_CLUSTER":"nope"}}}\n\0'
    with pytest.raises(StateParseError, match="Did not find Cluster") as info:
        parse_state_file(rec, V1_1_1, source="s")
    assert info.value.record == 0


# --- truncation and completeness -------------------------------------------------------------------------


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=_id)
def test_truncated_at_every_record_boundary(path: Path) -> None:
    data = path.read_bytes()
    full = parse_state_file(data, source="full")
    n = data.count(b"\0")
    ends = [i + 1 for i, byte in enumerate(data) if byte == 0]
    assert len(ends) == n
    for kept, end in enumerate(ends[:-1], start=1):
        prefix = data[:end]
        # the bytes alone look like a complete file ...
        part = parse_state_file(prefix, source="cut")
        # ... the published record count and digest tell
        with pytest.raises(StateParseError, match="incomplete or altered"):
            parse_state_file(prefix, source="cut", expect_records=n)
        if part == full:
            # only the last ACTIVATE_LISTENER was cut: its listener's ADD record already says active,
            # so the state is the same (the record count still tells)
            assert kept == n - 1 and b"ACTIVATE_LISTENER" in data[end:]
            assert parse_state_file(prefix, source="cut", expect_digest=full.digest()) == full
        else:
            with pytest.raises(StateParseError, match="incomplete or altered"):
                parse_state_file(prefix, source="cut", expect_digest=full.digest())
        # and a state that may be incomplete never removes anything from live
        try:
            p = plan(full, part, desired_is_complete=False)
        except UnsafePlanError as e:
            assert "incomplete" in str(e) and "--force" in str(e)
        else:
            assert p.removals == []
            assert all(s.action not in ("remove", "deactivate") for s in p.steps)
    assert parse_state_file(data, source="full", expect_records=n, expect_digest=full.digest()) == full


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=_id)
def test_truncated_at_random_offsets(path: Path) -> None:
    data = path.read_bytes()
    rng = random.Random(path.name)
    boundaries = {i + 1 for i, byte in enumerate(data) if byte == 0}
    offsets = set(rng.sample(range(1, len(data)), 60)) | {b - 1 for b in boundaries} | {b + 1 for b in boundaries}
    for cut in sorted(o for o in offsets if 0 < o < len(data)):
        prefix = data[:cut]
        if cut in boundaries:
            assert parse_state_file(prefix, source="cut") is not None
            continue
        with pytest.raises(StateParseError) as info:
            parse_state_file(prefix, source="cut")
        assert info.value.record == prefix.count(b"\0")
        assert "truncated last record" in str(info.value)


def test_parse_errors_never_show_private_keys() -> None:
    data = (FIXTURES / "sozu-2.1.0/states/01-populated.state").read_bytes()
    cert_rec = next(r for r in _records(data) if b"ADD_CERTIFICATE" in r)
    bad = cert_rec.replace(b'"expired_at":null', b'"expired_at":null,"bogus":1')
    with pytest.raises(StateParseError) as info:
        parse_state_file(_with_record(0, bad, data), V2_1_0, source="s")
    assert "PRIVATE KEY" not in str(info.value)


def test_certificate_fingerprints_match_the_fixture_list() -> None:
    listed = dict(line.split() for line in (FIXTURES / "certs/fingerprints.txt").read_text().splitlines() if line)
    for name, fp in listed.items():
        assert certificate_fingerprint(fixture_certificate(name)) == fp


def test_a_record_sozu_could_not_load_back_is_refused_before_decoding() -> None:
    """issue 12: a frontend with 400k tags cost seconds and ~1 GB to decode; sozu itself could never load
    such a record (200,000-byte buffer), so the reader refuses it by size, naming the record."""
    tags = ",".join(f'"t{i:06d}":"v"' for i in range(20_000))
    big = (
        b'{"id":"SAVE-3","content":{"request_type":{"ADD_CLUSTER":{"cluster_id":"x","answers":{'
        + tags.encode()
        + b"}}}}}\n"
    )
    assert len(big) > 190_000
    with pytest.raises(StateParseError, match=r"record of \d+ bytes, more than 190000") as info:
        parse_state_file(_with_record(3, big), V2_1_0, source="shared")
    assert info.value.record == 3


def test_a_state_over_the_size_limit_is_refused_first() -> None:
    with pytest.raises(StateParseError, match="limit on a state file"):
        parse_state_file(GOOD, V2_1_0, source="shared", max_state_bytes=len(GOOD) - 1)
    assert len(parse_state_file(GOOD, V2_1_0, source="shared", max_state_bytes=len(GOOD))) > 0


def test_a_frontend_with_a_1mb_hostname_is_refused() -> None:
    """issue 12: such a frontend was applied, after which sozu's answers outgrew the frame limit."""
    records = GOOD.split(b"\0")[:-1]
    n, front = next((i, r) for i, r in enumerate(records) if b"ADD_HTTP_FRONTEND" in r)
    big = front.replace(b'"hostname":"', b'"hostname":"' + b"h" * 1_000_000, 1)
    with pytest.raises(StateParseError, match="more than 190000") as info:
        parse_state_file(_with_record(n, big), V2_1_0, source="desired")
    assert info.value.record == n


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(state_pairs(), min_size=1, max_size=4))
def test_a_record_cache_gives_what_a_full_parse_and_write_give(pairs: list[tuple[ConfigState, ConfigState]]) -> None:
    """Issue 10: a state file read again decodes only its new records; the result must be exactly what
    a full parse gives (and a write, exactly what a full write gives), whatever came before."""
    cache = RecordCache()
    for a, b in pairs:
        for state in (a, b):
            data = write_state_file(state)
            assert write_state_file(state, cache=cache) == data
            full = parse_state_file(data, state.version, source="full", allow_empty=True)
            cached = parse_state_file(data, state.version, source="cached", cache=cache, allow_empty=True)
            assert cached == full and list(cached) == list(full)
            again = parse_state_file(data, state.version, source="again", cache=cache, allow_empty=True)
            assert again == full


def test_a_record_cache_decodes_only_the_records_it_has_not_seen() -> None:
    from sozud.testing import builders as build

    cache = RecordCache()
    state = build.fleet_state(200, listener="127.0.0.1:18080")
    parse_state_file(write_state_file(state), state.version, source="first", cache=cache)
    assert cache.decoded == record_count(state)  # every record once
    state.add("cluster", build.cluster("one-more"))
    before = cache.decoded
    renumbered = write_state_file(state)  # the new cluster sorts among the others: ids shift
    parsed = parse_state_file(renumbered, state.version, source="second", cache=cache)
    assert cache.decoded - before == 1 and parsed == state
    # unchanged records give the very bytes of the last parse: successive states share them (memory)
    again = parse_state_file(renumbered, state.version, source="third", cache=cache)
    assert all(again.raw(k) is v for k, v in parsed.raw_items())


def test_a_message_read_from_a_state_is_a_copy_that_changes_neither_the_state_nor_the_cache() -> None:
    from sozud.testing import builders as build

    cache = RecordCache()
    state = build.fleet_state(3, listener="127.0.0.1:18080")
    data = write_state_file(state)
    parsed = parse_state_file(data, state.version, source="first", cache=cache)
    copy = parsed.shallow_copy()
    value = parsed[("cluster", "app-000001")]
    assert isinstance(value, pb.Cluster)
    value.load_balancing = 1
    assert parsed == state and copy == state, "a message read from a state is the reader's own"
    assert parse_state_file(data, state.version, source="second", cache=cache) == state
    parsed[("cluster", "app-000001")] = value  # what changes a state: storing the value
    assert parsed[("cluster", "app-000001")] == value and copy == state
