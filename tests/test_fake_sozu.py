"""The sozu simulator: main-state semantics and the odd parts of the command socket.

Expected values come from docs/sozu-command-protocol.md (§2.3, §3, §11, §12) and the captures in
shared/fixtures, never from the simulator's code.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sozud.proto import command_pb2 as pb
from sozud.serde import parse_address, to_json
from sozud.testing.fake_sozu import FakeSozu, SozuMainState
from sozud.versions import SozuVersion

FIXTURES = Path(os.environ.get("SOZUD_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
CERTS = FIXTURES / "certs"
V2 = SozuVersion.parse("2.1.0")
V1 = SozuVersion.parse("1.1.1")
V015 = SozuVersion.parse("0.15.19")
NO_ANSWER_WAIT_S = 0.3
DEADLINE_S = 5.0


# --- helpers -------------------------------------------------------------------------------------


def addr(text: str) -> pb.SocketAddress:
    return parse_address(text)


def http_listener(text: str, active: bool = True) -> pb.Request:
    return pb.Request(
        add_http_listener=pb.HttpListenerConfig(
            address=addr(text),
            expect_proxy=False,
            sticky_name="SOZUBALANCEID",
            front_timeout=60,
            back_timeout=30,
            connect_timeout=3,
            request_timeout=10,
            active=active,
        )
    )


def https_listener(text: str) -> pb.Request:
    return pb.Request(
        add_https_listener=pb.HttpsListenerConfig(
            address=addr(text),
            expect_proxy=False,
            sticky_name="SOZUBALANCEID",
            front_timeout=60,
            back_timeout=30,
            connect_timeout=3,
            request_timeout=10,
            active=True,
            send_tls13_tickets=4,
        )
    )


def cluster(cid: str, sticky: bool = False) -> pb.Request:
    return pb.Request(
        add_cluster=pb.Cluster(
            cluster_id=cid, sticky_session=sticky, https_redirect=False, load_balancing=pb.ROUND_ROBIN
        )
    )


def http_front(host: str, address: str = "127.0.0.1:8080", cid: str | None = "c1", https: bool = False) -> pb.Request:
    front = pb.RequestHttpFrontend(
        address=addr(address), hostname=host, path=pb.PathRule(kind=pb.PREFIX, value="/"), position=pb.TREE
    )
    if cid is not None:
        front.cluster_id = cid
    return pb.Request(add_https_frontend=front) if https else pb.Request(add_http_frontend=front)


def backend(cid: str, bid: str, address: str, weight: int = 0) -> pb.Request:
    return pb.Request(
        add_backend=pb.AddBackend(
            cluster_id=cid,
            backend_id=bid,
            address=addr(address),
            load_balancing_parameters=pb.LoadBalancingParams(weight=weight),
        )
    )


def tcp_front(cid: str, address: str, **tags: str) -> pb.Request:
    return pb.Request(add_tcp_frontend=pb.RequestTcpFrontend(cluster_id=cid, address=addr(address), tags=tags))


def certificate(name: str, names: list[str] | None = None) -> pb.CertificateAndKey:
    return pb.CertificateAndKey(
        certificate=(CERTS / f"{name}.pem").read_text(),
        key=(CERTS / f"{name}.key").read_text(),
        names=names or [],
    )


def fingerprint(name: str) -> str:
    for line in (CERTS / "fingerprints.txt").read_text().splitlines():
        label, fp = line.split()
        if label == name:
            return fp
    raise KeyError(name)


def frame(req: pb.Request) -> bytes:
    body = req.SerializeToString()
    return struct.pack("<Q", len(body) + 8) + body


def json_frame(req: pb.Request, version: SozuVersion = V015) -> bytes:
    return json.dumps(to_json(req, version), separators=(",", ":")).encode() + b"\x00"


def read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, json_mode: bool) -> None:
        self.reader, self.writer, self.json_mode = reader, writer, json_mode

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, req: pb.Request) -> None:
        await self.send(json_frame(req) if self.json_mode else frame(req))

    async def read(self) -> pb.Response:
        async def one() -> pb.Response:
            if self.json_mode:
                raw = await self.reader.readuntil(b"\x00")
                value = json.loads(raw[:-1])
                resp = pb.Response(status=value["status"], message=value["message"])
                if value.get("content") is not None:
                    kind = next(iter(value["content"]["content_type"]))
                    resp.content.SetInParent()
                    setattr(resp, "_json_kind", kind)  # noqa: B010 - test-only marker
                return resp
            (length,) = struct.unpack("<Q", await self.reader.readexactly(8))
            resp = pb.Response()
            resp.ParseFromString(await self.reader.readexactly(length - 8))
            return resp

        return await asyncio.wait_for(one(), DEADLINE_S)

    async def until_final(self) -> list[pb.Response]:
        frames = [await self.read()]
        while frames[-1].status == pb.PROCESSING:
            frames.append(await self.read())
        return frames

    async def nothing(self) -> bool:
        """True when no frame arrives within a bounded wait (and the connection stays open)."""
        try:
            await asyncio.wait_for(self.reader.read(1), NO_ANSWER_WAIT_S)
        except TimeoutError:
            return True
        return False

    async def closed(self) -> bool:
        data = await asyncio.wait_for(self.reader.read(1), DEADLINE_S)
        return data == b""

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
def sock_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="sz")
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def connect(fake: FakeSozu) -> Conn:
    reader, writer = await asyncio.open_unix_connection(fake.socket_path)
    return Conn(reader, writer, fake.version.json_socket)


@pytest.fixture
async def sozu2(sock_dir: str) -> AsyncIterator[FakeSozu]:
    async with FakeSozu(f"{sock_dir}/s.sock", "2.1.0", worker_timeout_s=0.2, cwd=sock_dir) as fake:
        yield fake


def statuses(frames: list[pb.Response]) -> list[str]:
    return [pb.ResponseStatus.Name(f.status) for f in frames]


# --- the main state --------------------------------------------------------------------------------


def test_cluster_and_backend_upsert_but_frontend_duplicates_refused() -> None:
    st = SozuMainState(V2)
    assert st.dispatch(cluster("c1")) is None
    assert st.dispatch(cluster("c1", sticky=True)) is None
    assert st.clusters["c1"].sticky_session is True
    assert st.dispatch(backend("c1", "b0", "10.0.0.1:80", weight=1)) is None
    assert st.dispatch(backend("c1", "b0", "10.0.0.1:80", weight=5)) is None
    assert [b.load_balancing_parameters.weight for b in st.backends["c1"]] == [5]
    assert st.dispatch(http_front("example.test")) is None
    assert st.dispatch(http_front("example.test")) == "HttpFrontend '127.0.0.1:8080;example.test;P/' already exists"
    assert st.dispatch(http_front("example.test", https=True)) is None
    assert (
        st.dispatch(http_front("example.test", https=True))
        == "HttpsFrontend '127.0.0.1:8080;example.test;P/' already exists"
    )


def test_removals_of_missing_objects_use_sozus_texts() -> None:
    st = SozuMainState(V2)
    assert (
        st.dispatch(pb.Request(remove_cluster="nosuchcluster"))
        == "Did not find Cluster with address or id 'nosuchcluster'"
    )
    remove = pb.Request(remove_http_frontend=http_front("x.test").add_http_frontend)
    assert st.dispatch(remove) == "Did not find HttpFrontend with address or id '127.0.0.1:8080;x.test;P/'"
    st.dispatch(backend("c1", "b0", "10.0.0.1:80"))
    wrong = pb.Request(remove_backend=pb.RemoveBackend(cluster_id="c1", backend_id="b0", address=addr("10.0.0.1:81")))
    assert st.dispatch(wrong) == "dispatching this request did not bring any change to the state"
    missing_listener = pb.Request(remove_listener=pb.RemoveListener(address=addr("127.0.0.1:9"), proxy=pb.HTTP))
    assert st.dispatch(missing_listener) == "dispatching this request did not bring any change to the state"
    activate = pb.Request(
        activate_listener=pb.ActivateListener(address=addr("127.0.0.1:9"), proxy=pb.HTTP, from_scm=False)
    )
    assert st.dispatch(activate) == "Did not find HttpListener with address or id '127.0.0.1:9'"


def test_remove_cluster_does_not_cascade() -> None:
    st = SozuMainState(V2)
    for req in (cluster("c1"), backend("c1", "b0", "10.0.0.1:80"), http_front("a.test")):
        assert st.dispatch(req) is None
    assert st.dispatch(pb.Request(remove_cluster="c1")) is None
    assert "c1" not in st.clusters
    assert len(st.backends["c1"]) == 1 and len(st.http_fronts) == 1


def test_tcp_frontends_duplicate_on_tags_removed_by_address() -> None:
    st = SozuMainState(V2)
    assert st.dispatch(tcp_front("t1", "127.0.0.1:21433", a="b")) is None
    assert st.dispatch(tcp_front("t1", "127.0.0.1:21433")) is None  # other tags: accepted
    assert st.dispatch(tcp_front("t1", "127.0.0.1:21433", a="b")) == (
        'TcpFrontend \'TcpFrontend { cluster_id: "t1", address: 127.0.0.1:21433, tags: {"a": "b"} }\' already exists'
    )
    remove = pb.Request(remove_tcp_frontend=pb.RequestTcpFrontend(cluster_id="t1", address=addr("127.0.0.1:21433")))
    assert st.dispatch(remove) is None
    assert st.tcp_fronts["t1"] == []  # both frontends at that address went
    assert st.dispatch(remove) == "dispatching this request did not bring any change to the state"


def test_certificate_names_derived_in_1x_2x_and_kept_in_015() -> None:
    add = pb.AddCertificate(address=addr("127.0.0.1:8443"), certificate=certificate("wild.example.test"), expired_at=5)
    for version, expected in ((V2, ["*.wild.example.test", "wild.example.test"]), (V1, None), (V015, [])):
        st = SozuMainState(version)
        assert st.dispatch(pb.Request(add_certificate=add)) is None
        stored = st.certificates["127.0.0.1:8443"][fingerprint("wild.example.test")]
        assert list(stored.names) == (
            expected if expected is not None else ["*.wild.example.test", "wild.example.test"]
        )
    assert b'expired_at":null' in st.generate_state_file()


def test_certificate_refusals_and_no_ops() -> None:
    st = SozuMainState(V2)
    bad = pb.CertificateAndKey(certificate="this is not PEM at all\n", key="k")
    text = st.dispatch(pb.Request(add_certificate=pb.AddCertificate(address=addr("127.0.0.1:8443"), certificate=bad)))
    assert text == "Could not add certificate: Could not parse PEM certificate from bytes: Parsing Error: MissingHeader"
    malformed = pb.CertificateAndKey(certificate=(CERTS / "malformed.pem").read_text(), key="k")
    text = st.dispatch(
        pb.Request(add_certificate=pb.AddCertificate(address=addr("127.0.0.1:8443"), certificate=malformed))
    )
    assert text == (
        "Could not add certificate: Could not parse X509 certificate from bytes: Parsing Error: NomError(Eof)"
    )
    unknown = pb.RemoveCertificate(address=addr("127.0.0.1:8443"), fingerprint="00" * 32)
    assert st.dispatch(pb.Request(remove_certificate=unknown)) is None
    replace = pb.ReplaceCertificate(
        address=addr("127.0.0.1:9443"), new_certificate=certificate("example.test"), old_fingerprint="00" * 32
    )
    assert (
        st.dispatch(pb.Request(replace_certificate=replace))
        == "Did not find Certificate with address or id '127.0.0.1:9443'"
    )


def test_replace_certificate_stores_the_new_one_as_sent() -> None:
    st = SozuMainState(V2)
    add = pb.AddCertificate(address=addr("127.0.0.1:8443"), certificate=certificate("example.test"))
    assert st.dispatch(pb.Request(add_certificate=add)) is None
    replace = pb.ReplaceCertificate(
        address=addr("127.0.0.1:8443"),
        new_certificate=certificate("example.test-v2"),
        old_fingerprint=fingerprint("example.test").upper(),
    )
    assert st.dispatch(pb.Request(replace_certificate=replace)) is None
    table = st.certificates["127.0.0.1:8443"]
    assert list(table) == [fingerprint("example.test-v2")]
    assert list(table[fingerprint("example.test-v2")].names) == []


def test_request_counters_start_at_two_and_count_refusals() -> None:
    st = SozuMainState(V2)
    st.dispatch(cluster("a"))
    st.dispatch(pb.Request(remove_cluster="missing"))
    st.dispatch(pb.Request(remove_cluster="missing"))
    assert st.request_counts == {"AddCluster": 2, "RemoveCluster": 3}


def test_listener_activation_is_saved() -> None:
    st = SozuMainState(V2)
    assert st.dispatch(http_listener("127.0.0.1:8081", active=False)) is None
    assert st.dispatch(http_listener("127.0.0.1:8081")) == "HttpListener '127.0.0.1:8081' already exists"
    act = pb.Request(
        activate_listener=pb.ActivateListener(address=addr("127.0.0.1:8081"), proxy=pb.HTTP, from_scm=False)
    )
    assert st.dispatch(act) is None
    kinds = [r.WhichOneof("request_type") for r in st.generate_requests()]
    assert kinds == ["add_http_listener", "activate_listener"]
    assert st.listeners[pb.HTTP]["127.0.0.1:8081"].active is True


def test_state_file_record_order_and_round_trip() -> None:
    st = SozuMainState(V1)
    for req in (
        backend("b", "b1", "10.0.0.2:80"),
        backend("a", "a2", "10.0.0.1:80"),
        backend("a", "a1", "10.0.0.3:80"),
        cluster("b"),
        cluster("a"),
        http_front("z.test"),
        http_front("a.test"),
        https_listener("[::1]:8443"),
        https_listener("127.0.0.1:8443"),
        http_listener("127.0.0.2:80"),
        http_listener("127.0.0.1:81"),
    ):
        assert st.dispatch(req) is None
    data = st.generate_state_file()
    records = [json.loads(r) for r in data.split(b"\n\x00") if r]
    assert [r["id"] for r in records] == [f"SAVE-{i}" for i in range(len(records))]
    summary = []
    for r in records:
        ((kind, value),) = r["content"]["request_type"].items()
        summary.append((kind, value.get("cluster_id") or value.get("hostname") or value.get("address")))
    assert [k for k, _ in summary] == [
        *["ADD_HTTP_LISTENER", "ACTIVATE_LISTENER"] * 2,
        *["ADD_HTTPS_LISTENER", "ACTIVATE_LISTENER"] * 2,
        "ADD_CLUSTER",
        "ADD_CLUSTER",
        "ADD_HTTP_FRONTEND",
        "ADD_HTTP_FRONTEND",
        "ADD_BACKEND",
        "ADD_BACKEND",
        "ADD_BACKEND",
    ]
    assert summary[0][1]["port"] == 81 and summary[4][1]["ip"]["inner"] == {"V4": 2130706433}  # v4 before v6
    assert [v for k, v in summary if k in ("ADD_CLUSTER", "ADD_BACKEND")] == ["a", "b", "a", "a", "b"]
    assert data.endswith(b"\n\x00")
    again = SozuMainState(V1)
    assert again.load_state_file(data) == (len(records), 0)
    assert again.generate_state_file() == data


# --- the socket: 1.x / 2.x -----------------------------------------------------------------------


async def test_mutation_and_refusal_frames(sozu2: FakeSozu) -> None:
    c = await connect(sozu2)
    await c.request(cluster("app1"))
    frames = await c.until_final()
    assert [(pb.ResponseStatus.Name(f.status), f.message) for f in frames] == [
        ("PROCESSING", "Processing worker request..."),
        ("OK", "Successfully applied request to all workers"),
    ]
    await c.request(pb.Request(remove_cluster="nosuchcluster"))
    frames = await c.until_final()
    assert [(f.status, f.message) for f in frames] == [
        (
            pb.FAILURE,
            "could not dispatch request on the main process state: "
            "Did not find Cluster with address or id 'nosuchcluster'",
        )
    ]
    c.close()


async def test_only_the_last_frame_of_one_read_is_answered(sozu2: FakeSozu) -> None:
    c = await connect(sozu2)
    await c.send(frame(cluster("first")) + frame(cluster("second")))
    frames = await c.until_final()
    assert statuses(frames) == ["PROCESSING", "OK"]
    assert await c.nothing()
    assert list(sozu2.state.clusters) == ["second"]
    c.close()


async def test_requests_in_flight_together_interleave(sozu2: FakeSozu) -> None:
    c = await connect(sozu2)
    sozu2.pause_workers()
    await c.request(cluster("a"))
    first = await c.read()
    await c.request(pb.Request(status=pb.Status()))
    second = await c.read()
    sozu2.resume_workers()
    rest = [await c.read(), await c.read()]
    assert [first.message, second.message] == ["Processing worker request...", "Querying status of workers..."]
    assert statuses(rest) == ["OK", "OK"]
    assert {r.message for r in rest} == {
        "Successfully applied request to all workers",
        "Successfully collected the status of workers",
    }
    c.close()


async def test_second_busy_connection_stalls_for_worker_timeout(sozu2: FakeSozu) -> None:
    a, b = await connect(sozu2), await connect(sozu2)
    sozu2.pause_workers()
    await a.request(cluster("a"))
    assert (await a.read()).status == pb.PROCESSING
    await b.request(backend("a", "b0", "10.0.0.1:80"))
    assert (await b.read()).status == pb.PROCESSING
    sozu2.resume_workers()
    assert (await a.read()).status == pb.OK
    assert (await b.read()).status == pb.OK
    assert sozu2.stalls == 1
    await a.request(cluster("c"))  # alone again: no stall
    await a.until_final()
    assert sozu2.stalls == 1
    a.close()
    b.close()


@pytest.mark.parametrize("prefix", [struct.pack("<Q", 2**40), struct.pack("<Q", 2_000_001)])
async def test_oversize_declared_length_wedges_the_connection_2x(sozu2: FakeSozu, prefix: bytes) -> None:
    c = await connect(sozu2)
    await c.send(prefix)
    assert await c.nothing()
    await c.request(pb.Request(status=pb.Status()))
    assert await c.nothing()
    other = await connect(sozu2)
    await other.request(pb.Request(status=pb.Status()))
    assert statuses(await other.until_final()) == ["PROCESSING", "OK"]
    c.close()
    other.close()


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xff\xff\xff", b"\x72\x02a\xff", b"\x6a\x04\x0a\x02\xc3\x28"],
    ids=["garbage", "invalid-utf8", "invalid-utf8-nested"],
)
async def test_undecodable_payload_wedges_the_connection(sozu2: FakeSozu, payload: bytes) -> None:
    c = await connect(sozu2)
    await c.send(struct.pack("<Q", 8 + len(payload)) + payload)
    assert await c.nothing()
    await c.request(pb.Request(status=pb.Status()))
    assert await c.nothing()
    c.close()


async def test_short_length_drops_eight_bytes_in_2x(sozu2: FakeSozu) -> None:
    c = await connect(sozu2)
    await c.send(struct.pack("<Q", 5))
    await c.request(pb.Request(status=pb.Status()))
    assert statuses(await c.until_final()) == ["PROCESSING", "OK"]
    assert not sozu2.crashed
    c.close()


async def test_short_length_crashes_the_1x_main_process(sock_dir: str) -> None:
    async with FakeSozu(f"{sock_dir}/s.sock", "1.1.1") as fake:
        bystander = await connect(fake)
        c = await connect(fake)
        await c.send(struct.pack("<Q", 0) + frame(pb.Request(status=pb.Status())))
        assert await c.closed()
        assert await bystander.closed()
        assert fake.crashed
        with pytest.raises(OSError):
            await asyncio.open_unix_connection(fake.socket_path)


@pytest.mark.parametrize("version", ["2.1.0", "1.1.1"])
async def test_requests_without_an_answer_leave_the_connection_usable(sock_dir: str, version: str) -> None:
    async with FakeSozu(f"{sock_dir}/s.sock", version) as fake:
        c = await connect(fake)
        for data in (
            struct.pack("<Q", 8),  # empty request
            struct.pack("<Q", 11) + b"\x9a\x06\x00",  # field 99, length 0
            frame(pb.Request(launch_worker="w")),
            frame(pb.Request(return_listen_sockets=pb.ReturnListenSockets())),
        ):
            await c.send(data)
            assert await c.nothing()
        await c.request(pb.Request(status=pb.Status()))
        assert statuses(await c.until_final()) == ["PROCESSING", "OK"]
        c.close()


async def test_2_1_only_request_is_unknown_to_1x(sock_dir: str) -> None:
    async with FakeSozu(f"{sock_dir}/s.sock", "1.1.1") as fake:
        c = await connect(fake)
        await c.request(pb.Request(query_health_checks=pb.QueryHealthChecks()))
        assert await c.nothing()
        c.close()


async def test_refuse_next_keeps_the_object_in_the_main_state(sozu2: FakeSozu) -> None:
    sozu2.refuse_next("add_cluster", "boom")
    c = await connect(sozu2)
    await c.request(cluster("x"))
    frames = await c.until_final()
    assert [(f.status, f.message) for f in frames] == [
        (pb.PROCESSING, "Processing worker request..."),
        (pb.FAILURE, "0: boom, 1: boom"),
    ]
    assert "x" in sozu2.state.clusters
    await c.request(cluster("y"))  # only the next one
    assert statuses(await c.until_final()) == ["PROCESSING", "OK"]
    c.close()


async def test_missing_listener_fails_in_workers_only(sozu2: FakeSozu) -> None:
    c = await connect(sozu2)
    await c.request(http_front("nolistener.test", address="127.0.0.1:21099"))
    frames = await c.until_final()
    assert frames[-1].message == (
        "0: found no listener with address 127.0.0.1:21099, 1: found no listener with address 127.0.0.1:21099"
    )
    assert "127.0.0.1:21099;nolistener.test;P/" in sozu2.state.http_fronts
    sozu2.worker_fail_for_missing_listener = False
    await c.request(http_front("other.test", address="127.0.0.1:21099"))
    assert statuses(await c.until_final()) == ["PROCESSING", "OK"]
    c.close()


async def test_drop_answers_applies_without_answering(sozu2: FakeSozu) -> None:
    sozu2.drop_answers("add_cluster")
    c = await connect(sozu2)
    await c.request(cluster("silent"))
    assert await c.nothing()
    assert "silent" in sozu2.state.clusters
    sozu2.stop_dropping()
    await c.request(cluster("loud"))
    assert statuses(await c.until_final()) == ["PROCESSING", "OK"]
    assert len(sozu2.requests) == 2
    c.close()


async def test_queries_have_one_entry_per_worker_and_main(sozu2: FakeSozu) -> None:
    c = await connect(sozu2)
    await c.request(cluster("app1"))
    await c.until_final()
    await c.request(pb.Request(query_clusters_hashes=pb.QueryClustersHashes()))
    frames = await c.until_final()
    assert [f.message for f in frames] == ["Querying cluster...", "Successfully queried clusters"]
    responses = frames[-1].content.worker_responses.map
    assert set(responses) == {"0", "1", "main"}
    assert len({r.cluster_hashes.map["app1"] for r in responses.values()}) == 1
    await c.request(pb.Request(query_certificates_from_workers=pb.QueryCertificatesFilters()))
    frames = await c.until_final()
    assert set(frames[-1].content.worker_responses.map) == {"0", "1"}
    c.close()


async def test_save_and_load_state(sozu2: FakeSozu) -> None:
    c = await connect(sozu2)
    for req in (cluster("a"), backend("a", "b0", "10.0.0.1:80")):
        await c.request(req)
        await c.until_final()
    await c.request(pb.Request(save_state="saved.state"))
    frames = await c.until_final()
    assert [f.message for f in frames] == ["Saved 2 config messages to saved.state"]
    assert read_bytes(Path(sozu2.cwd, "saved.state")) == sozu2.state.generate_state_file()
    await c.request(pb.Request(load_state="saved.state"))
    frames = await c.until_final()
    assert [f.message for f in frames] == [
        "Parsing state file from saved.state...",
        "Applying state file...",
        "Successfully loaded state from path saved.state, 4 ok messages, 0 errors",
    ]
    await c.request(pb.Request(load_state="missing.state"))
    assert [(f.status, f.message) for f in await c.until_final()] == [
        (pb.FAILURE, "Cannot find file at path missing.state")
    ]
    write_bytes(Path(sozu2.cwd, "broken.state"), b'{"id":"x","content":{"request_type":{"NOPE":{}}}}\n\x00')
    await c.request(pb.Request(load_state="broken.state"))
    assert (await c.until_final())[-1].message == "Error consuming load state message"
    c.close()


async def test_restart_drops_connections_and_reloads_saved_state(sock_dir: str) -> None:
    saved = SozuMainState(V2)
    saved.dispatch(cluster("from-file"))
    write_bytes(Path(sock_dir, "saved.state"), saved.generate_state_file())
    async with FakeSozu(f"{sock_dir}/s.sock", "2.1.0", saved_state="saved.state", cwd=sock_dir) as fake:
        assert list(fake.state.clusters) == ["from-file"]
        c = await connect(fake)
        await c.request(cluster("live"))
        await c.until_final()
        await fake.restart()
        assert await c.closed()
        assert list(fake.state.clusters) == ["from-file"]
        await fake.restart(empty=False)
        assert list(fake.state.clusters) == ["from-file"]
        c2 = await connect(fake)
        await c2.request(pb.Request(list_workers=pb.ListWorkers()))
        assert (await c2.until_final())[-1].message == "Successfully listed workers"
        assert fake.connections_opened == 2
        c2.close()


async def test_response_above_the_cap_closes_the_connection_2x(sock_dir: str) -> None:
    async with FakeSozu(f"{sock_dir}/s.sock", "2.1.0", max_command_buffer_size=4096) as fake:
        for i in range(60):
            fake.state.dispatch(cluster(f"cluster-with-a-long-name-{i:04d}"))
        c = await connect(fake)
        await c.request(pb.Request(query_clusters_hashes=pb.QueryClustersHashes()))
        assert (await c.read()).status == pb.PROCESSING
        assert await c.closed()


# --- events ----------------------------------------------------------------------------------------


async def test_events_2_1_duplicates_accepted_requests(sozu2: FakeSozu) -> None:
    sub, c = await connect(sozu2), await connect(sozu2)
    await sub.request(pb.Request(subscribe_events=pb.SubscribeEvents()))
    ack = await sub.read()
    assert (ack.status, ack.message, ack.content.event.kind) == (pb.PROCESSING, "main", pb.EVENTS_SUBSCRIBED)
    await c.request(cluster("app1"))
    await c.until_final()
    first = await sub.read()
    assert (first.message, first.content.event.kind, first.content.event.cluster_id) == (
        "main",
        pb.CLUSTER_ADDED,
        "app1",
    )
    assert await sub.nothing()  # the copy waits for the next request
    await c.request(pb.Request(remove_cluster="nosuch"))  # refused: one event, after the pending copy
    await c.until_final()
    got = [await sub.read(), await sub.read()]
    assert [(e.content.event.kind, e.content.event.cluster_id) for e in got] == [
        (pb.CLUSTER_ADDED, "app1"),
        (pb.CLUSTER_REMOVED, "nosuch"),
    ]
    await c.request(backend("app1", "b0", "10.0.0.1:80"))
    await c.until_final()
    await c.request(backend("app1", "b0", "10.0.0.1:80"))  # replaced: workers report it
    await c.until_final()
    events = [await sub.read(), await sub.read()]
    assert sorted(e.message for e in events) == ["0", "1"]
    assert {(e.content.event.kind, e.content.event.backend_id) for e in events} == {
        (pb.REMOVED_BACKEND_HAS_NO_CONNECTIONS, "b0")
    }
    assert not events[0].content.event.HasField("cluster_id")
    assert await sub.nothing()
    sub.close()
    c.close()


async def test_events_1x_no_acknowledgement(sock_dir: str) -> None:
    async with FakeSozu(f"{sock_dir}/s.sock", "1.1.1") as fake:
        sub, c = await connect(fake), await connect(fake)
        await sub.request(pb.Request(subscribe_events=pb.SubscribeEvents()))
        await c.request(cluster("a"))
        await c.until_final()
        assert await sub.nothing()
        sub.close()
        c.close()


# --- 0.15 ------------------------------------------------------------------------------------------


@pytest.fixture
async def sozu015(sock_dir: str) -> AsyncIterator[FakeSozu]:
    auto = f"{sock_dir}/auto.state"
    async with FakeSozu(f"{sock_dir}/s.sock", "0.15", automatic_state_save=auto, cwd=sock_dir) as fake:
        yield fake


@pytest.mark.parametrize(
    "raw",
    [
        b"this is not json\x00",
        b'{"request_type":{"NO_SUCH_REQUEST":{}}}\x00',
        b'{"request_type":{"ADD_BACKEND":{"cluster_id":"app1","backend_id":"x"}}}\x00',
        b"\x00",
    ],
    ids=["invalid-json", "unknown-type", "missing-field", "empty-chunk"],
)
async def test_015_malformed_input_closes_the_connection(sozu015: FakeSozu, raw: bytes) -> None:
    c = await connect(sozu015)
    await c.send(raw)
    assert await c.closed()


async def test_015_empty_request_and_pipelining(sozu015: FakeSozu) -> None:
    c = await connect(sozu015)
    await c.send(b"{}\x00")
    resp = await c.read()
    assert (resp.status, resp.message) == (pb.FAILURE, "Empty request")
    await c.send(b"".join(json_frame(cluster(f"c{i}")) for i in range(3)))
    finals = []
    while len(finals) < 3:
        r = await c.read()
        if r.status != pb.PROCESSING:
            finals.append(r.message)
    assert finals == ["Successfully executed the request on all workers"] * 3
    assert list(sozu015.state.clusters) == ["c0", "c1", "c2"]
    c.close()


async def test_015_automatic_state_save_rewrites_in_place(sozu015: FakeSozu) -> None:
    assert sozu015.automatic_state_save is not None
    auto = Path(sozu015.automatic_state_save)
    write_bytes(auto, b"")
    inode = os.stat(auto).st_ino
    c = await connect(sozu015)
    await c.request(cluster("app1"))
    frames = await c.until_final()
    assert [f.message for f in frames] == [
        "Saving state to file",
        "Sending the request to all workers",
        "Successfully executed the request on all workers",
    ]
    assert os.stat(auto).st_ino == inode
    assert read_bytes(auto) == sozu015.state.generate_state_file()
    before = read_bytes(auto)
    await c.request(pb.Request(remove_cluster="nosuch"))  # refused: not saved
    frames = await c.until_final()
    assert [f.message for f in frames] == [
        "Could not execute request on the state: Did not find Cluster with address or id 'nosuch'"
    ]
    assert read_bytes(auto) == before
    c.close()


async def test_015_state_files_and_subscription(sozu015: FakeSozu) -> None:
    c = await connect(sozu015)
    await c.request(pb.Request(save_state="x.state"))
    assert (await c.until_final())[-1].message == "saved 0 config messages to x.state"
    await c.request(pb.Request(load_state="missing.state"))
    assert await c.nothing()  # 0.15 never answers a missing file
    await c.request(pb.Request(subscribe_events=pb.SubscribeEvents()))
    ack = await c.read()
    assert (ack.status, ack.message) == (pb.OK, f"Successfully Added CL-{sozu015.connections_opened} to subscribers")
    c.close()


# --- command line ------------------------------------------------------------------------------------


def test_command_line_says_it_is_a_simulator() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sozud.testing.fake_sozu", "--help"], capture_output=True, text=True, check=True
    )
    assert "SIMULATOR" in out.stdout
    assert "--socket" in out.stdout and "--version" in out.stdout
