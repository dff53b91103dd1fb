"""Tests of the OpenSVC simulator itself, with raw protocol clients (sockets, h2, httpx), never sozud's client.

Expected values come from docs/opensvc-api.md (observed on real agents), not from the simulator's code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pathlib
import shutil
import ssl
import tempfile
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from sozud.testing import fake_opensvc
from sozud.testing._fake_opensvc_store import ObjectPath, eval_arithmetic, v2_decoded_text
from sozud.testing.cluster import wait_until
from sozud.testing.fake_opensvc import FakeAgent, FakeOpenSVCCluster, ProjectionStep

SECRET = "0123456789abcdef0123456789abcdef-test-secret"
OBJ = "igw/cfg/sozu"


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def run_root() -> Iterator[pathlib.Path]:
    root = pathlib.Path(tempfile.mkdtemp(prefix="sz", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster() -> FakeOpenSVCCluster:
    # API writes replicate at once here; the monitor loop that delays them has its own tests below
    c = FakeOpenSVCCluster("demo", SECRET, monitor_interval_s=0)
    c.create_object(OBJ)
    return c


@pytest.fixture
async def agents(cluster: FakeOpenSVCCluster, run_root: pathlib.Path) -> AsyncIterator[tuple[FakeAgent, FakeAgent]]:
    a = cluster.agent("vm1", run_root / "vm1")
    b = cluster.agent("vm2", run_root / "vm2")
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


# --- raw clients ------------------------------------------------------------------------------------


async def raw(sock: pathlib.Path, message: Any) -> Any:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(json.dumps(message).encode() + b"\0")
        await writer.drain()
        reply = await reader.readuntil(b"\0")
        return json.loads(reply[:-1])
    finally:
        writer.close()


def encrypt(secret: str, clustername: str, message: Any) -> bytes:
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(zlib.compress(json.dumps(message).encode())) + padder.finalize()
    enc = Cipher(algorithms.AES(secret.encode()[:32]), modes.CBC(iv)).encryptor()
    data = enc.update(plain) + enc.finalize()
    envelope = {
        "clustername": clustername,
        "nodename": "whatever-node",
        "iv": base64.urlsafe_b64encode(iv).decode(),
        "data": base64.urlsafe_b64encode(data).decode(),
    }
    return json.dumps(envelope).encode() + b"\0"


def decrypt(secret: str, frame: bytes) -> Any:
    envelope = json.loads(frame.rstrip(b"\0"))
    iv = base64.urlsafe_b64decode(envelope["iv"])
    dec = Cipher(algorithms.AES(secret.encode()[:32]), modes.CBC(iv)).decryptor()
    padded = dec.update(base64.urlsafe_b64decode(envelope["data"])) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return json.loads(zlib.decompress(unpadder.update(padded) + unpadder.finalize()))


async def encrypted(port: int, message: Any, *, secret: str = SECRET, clustername: str = "demo") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(encrypt(secret, clustername, message))
        await writer.drain()
        return await reader.readuntil(b"\0")
    finally:
        writer.close()


def h2_client(agent: FakeAgent) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=str(agent.h2_sock), http1=False, http2=True)
    return httpx.AsyncClient(transport=transport, base_url="http://opensvc")


def om3_client(agent: FakeAgent) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=str(agent.om3_sock), http1=False, http2=True)
    return httpx.AsyncClient(transport=transport, base_url="http://opensvc")


class RawH2:
    """A bare h2 client on a unix socket, to look at flow control and unanswered streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.responses: dict[int, dict[str, Any]] = {}
        self.ended: set[int] = set()
        self.window_updates = 0

    @classmethod
    async def open(cls, sock: pathlib.Path) -> RawH2:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        client = cls(reader, writer)
        client.conn.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def request(
        self, method: str, path: str, body: bytes = b"", extra: list[tuple[str, str]] | None = None
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "opensvc")]
        self.conn.send_headers(stream_id, headers + (extra or []), end_stream=not body)
        sendable = body[: self.conn.local_flow_control_window(stream_id)]  # what flow control lets through
        for offset in range(0, len(sendable), self.conn.max_outbound_frame_size):
            chunk = sendable[offset : offset + self.conn.max_outbound_frame_size]
            self.conn.send_data(stream_id, chunk, end_stream=offset + len(chunk) == len(body))
        await self.flush()
        return stream_id

    async def pump_until(self, stream_id: int) -> dict[str, Any]:
        """Read frames until ``stream_id`` has ended; returns its headers and body."""
        while stream_id not in self.ended:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    self.responses[event.stream_id] = {"headers": dict(event.headers), "body": b""}
                elif isinstance(event, h2.events.DataReceived):
                    self.responses[event.stream_id]["body"] += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended.add(event.stream_id)
                elif isinstance(event, h2.events.WindowUpdated):
                    self.window_updates += 1
            await self.flush()
        return self.responses[stream_id]

    def close(self) -> None:
        self.writer.close()


# --- store functions (pure) ---------------------------------------------------------------------------

PATH = ObjectPath("igw", "cfg", "sozu")


@given(st.text(max_size=200).map(lambda t: t + "\n{name}$(1+2)"))
def test_multiline_values_are_never_evaluated(text: str) -> None:
    assert v2_decoded_text(text.encode("utf-8", "surrogatepass"), path=PATH, nodename="vm", clustername="c") == (
        text.encode("utf-8", "surrogatepass").decode("utf-8", "ignore")
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("{name}", "sozu"),
        ("{nodename}", "vm"),
        ('{"x":{name}}', '{"x":sozu}'),
        ("$(1+2)", "3"),
        ("{foo}", "{foo}"),
        ('{"name":"x"}', '{"name":"x"}'),
        ("a\0b\0", "a\0b\0"),
        ("literal:foo", "literal:foo"),
    ],
)
def test_single_line_values_follow_the_documented_round_trips(value: str, expected: str) -> None:
    assert v2_decoded_text(value.encode(), path=PATH, nodename="vm", clustername="c") == expected


@pytest.mark.parametrize(
    ("expr", "expected"),
    [("1+2", 3), ("2*3+1", 7), ("1-2*3", -5), ("-4+1", -3), ("1+", None), ("__import__('os')", None), ("", None)],
)
def test_arithmetic_is_a_small_integer_evaluator(expr: str, expected: int | None) -> None:
    assert eval_arithmetic(expr) == expected


# --- raw unix socket ------------------------------------------------------------------------------------


async def test_raw_key_round_trip_and_shapes(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    value = '{"id":1}\n\0{"id":2}\n\0'
    reply = await raw(
        a.lsnr_sock, {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "state.json", "data": value}}
    )
    assert reply == {"status": 0, "info": "key state.json value set"}
    await raw(a.lsnr_sock, {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "empty", "data": ""}})
    got = await raw(a.lsnr_sock, {"action": "key", "method": "GET", "options": {"path": OBJ, "key": "state.json"}})
    assert got == {"status": 0, "data": value}
    keys = await raw(a.lsnr_sock, {"action": "object_keys", "method": "GET", "options": {"path": OBJ}})
    assert keys == {"status": 0, "data": ["state.json", "empty"]}
    for _ in range(2):  # same reply whether or not the key existed
        deleted = await raw(
            a.lsnr_sock, {"action": "key", "method": "DELETE", "options": {"path": OBJ, "key": "empty"}}
        )
        assert deleted == {"status": 0, "info": "key empty value unset"}
    assert a.cluster.value("vm1", OBJ, "state.json") == value.encode()
    assert a.cluster.value("vm1", OBJ, "empty") is None


async def test_raw_connection_is_closed_after_the_reply(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    reader, writer = await asyncio.open_unix_connection(str(a.lsnr_sock))
    writer.write(b'{"action": "whoami", "method": "GET"}\0')
    reply = await reader.readuntil(b"\0")
    assert json.loads(reply[:-1])["auth"] == "uxsock"
    assert await reader.read() == b""
    writer.close()


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"method": "GET", "options": {}}, {"error": "action not specified", "status": 1}),
        (
            {"action": "set_key", "method": "POST", "options": {"path": OBJ, "key": "k", "data": "v\n"}},
            {"status": 501, "error": "handler POST set_key is not supported"},
        ),
        (
            {"action": "key", "method": "PUT", "options": {"path": OBJ, "key": "k"}},
            {"status": 501, "error": "handler PUT key is not supported"},
        ),
        (
            {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "k"}},
            {"status": 400, "error": "required option data is not set"},
        ),
        (
            {"action": "key", "method": "GET", "options": {"path": OBJ}},
            {"status": 400, "error": "required option key is not set"},
        ),
        (
            {"action": "key", "method": "GET", "options": {"key": "k"}},
            {"status": 400, "error": "required option path is not set"},
        ),
        (
            {"action": "key", "method": "GET", "options": {"path": OBJ, "key": "nope.json"}},
            {"status": 1, "error": "configuration key nope.json does not exist or has no value"},
        ),
    ],
)
async def test_raw_documented_errors(
    agents: tuple[FakeAgent, FakeAgent], message: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert await raw(agents[0].lsnr_sock, message) == expected


async def test_raw_errors_with_tracebacks(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    a.cluster.create_object("igw/svc/demo")
    nope = await raw(a.lsnr_sock, {"action": "key", "method": "GET", "options": {"path": "igw/cfg/nope", "key": "k"}})
    assert nope["status"] == 1 and nope["error"] == "'igw/cfg/nope'"
    assert "KeyError: 'igw/cfg/nope'" in nope["traceback"]
    keys = await raw(a.lsnr_sock, {"action": "object_keys", "method": "GET", "options": {"path": "igw/cfg/nope"}})
    assert keys["error"] == "'igw/cfg/nope'"
    post = {"action": "key", "method": "POST", "options": {"path": "igw/cfg/nope", "key": "k", "data": "v\n"}}
    assert (await raw(a.lsnr_sock, post))["error"] == "'igw/cfg/nope'"  # the API never creates objects
    assert a.cluster.value("vm1", "igw/cfg/nope", "k") is None
    bad = await raw(
        a.lsnr_sock, {"action": "key", "method": "GET", "options": {"path": "not a/valid//path", "key": "k"}}
    )
    assert bad["status"] == 500 and bad["error"] == "not a/valid//path" and "traceback" in bad
    typed = await raw(
        a.lsnr_sock, {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "k", "data": 123}}
    )
    assert typed["status"] == 1 and typed["error"] == "a bytes-like object is required, not 'int'"
    svc = await raw(a.lsnr_sock, {"action": "key", "method": "GET", "options": {"path": "igw/svc/demo", "key": "k"}})
    assert svc["status"] == 1 and svc["error"] == "'Svc' object has no attribute 'decode_key'"


async def test_raw_legacy_aliases_only_without_method(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    assert await raw(a.lsnr_sock, {"action": "set_key", "options": {"path": OBJ, "key": "old", "data": "x\n"}}) == {
        "status": 0,
        "info": "key old value set",
    }
    assert await raw(a.lsnr_sock, {"action": "get_key", "options": {"path": OBJ, "key": "old"}}) == {
        "status": 0,
        "data": "x\n",
    }


async def test_raw_value_quirks_over_the_wire(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents

    async def round_trip(value: str) -> Any:
        await raw(a.lsnr_sock, {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "q", "data": value}})
        return (await raw(a.lsnr_sock, {"action": "key", "method": "GET", "options": {"path": OBJ, "key": "q"}}))[
            "data"
        ]

    assert await round_trip("{name}-{nodename}") == "sozu-vm1"
    assert await round_trip("$(1+2)") == "3"
    assert await round_trip("multi {name}\n$(1+2)") == "multi {name}\n$(1+2)"
    assert await round_trip("é€😀\t ;#% ") == "é€😀\t ;#% "
    assert a.cluster.value("vm1", OBJ, "q") == "é€😀\t ;#% ".encode()
    a.cluster.set_value("vm1", OBJ, "bin", b"\xff\xfe\0bin\n")
    got = await raw(a.lsnr_sock, {"action": "key", "method": "GET", "options": {"path": OBJ, "key": "bin"}})
    assert got["data"] == "\0bin\n"


async def test_carriage_return_without_newline_breaks_the_object_until_repair(
    agents: tuple[FakeAgent, FakeAgent],
) -> None:
    a, b = agents
    await raw(a.lsnr_sock, {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "good", "data": "ok\n"}})
    await raw(a.lsnr_sock, {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "bad", "data": "a\rb"}})
    for agent in (a, b):  # the broken file is what peers install too
        for message in (
            {"action": "key", "method": "GET", "options": {"path": OBJ, "key": "good"}},
            {"action": "object_keys", "method": "GET", "options": {"path": OBJ}},
            {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "x", "data": "y\n"}},
        ):
            reply = await raw(agent.lsnr_sock, message)
            assert reply["status"] == 1
            assert reply["error"].startswith("error parsing /etc/opensvc/namespaces/igw/cfg/sozu.conf: ")
            assert "Source contains parsing errors" in reply["error"]
    a.cluster.repair(OBJ)
    assert await raw(a.lsnr_sock, {"action": "key", "method": "GET", "options": {"path": OBJ, "key": "good"}}) == {
        "status": 0,
        "data": "ok\n",
    }


async def test_raw_hostile_input_never_kills_the_server(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    for junk in (b"\xff\xfe garbage\0", b"[1, 2]\0", b"[" * 100000 + b"\0", b'{"action": "key", "meth'):
        reader, writer = await asyncio.open_unix_connection(str(a.lsnr_sock))
        writer.write(junk)
        writer.write_eof()
        rest = await reader.read()
        assert rest in (b"", b'{"error": "invalid data format", "status": 1}\0')
        writer.close()
    assert (await raw(a.lsnr_sock, {"action": "whoami", "method": "GET"}))["name"] == "root"


async def test_raw_events_stream_and_close_on_stop(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, b = agents
    reader, writer = await asyncio.open_unix_connection(str(b.lsnr_sock))
    writer.write(b'{"action": "events", "method": "GET", "options": {}}\0')
    await writer.drain()
    await b.wait_for_subscribers(1)
    await raw(a.lsnr_sock, {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "k", "data": "v\n"}})
    first = json.loads((await reader.readuntil(b"\0"))[:-1])
    second = json.loads((await reader.readuntil(b"\0"))[:-1])
    assert first["kind"] == "event" and first["nodename"] == "vm2"
    assert first["data"]["id"] == "service_config_installed"
    assert first["data"]["path"] == OBJ and first["data"]["from"] == "vm1"
    assert second["kind"] == "patch"
    prefix = ["monitor", "nodes", "vm2", "services", "config", OBJ]
    (updated_path, updated), (csum_path, csum) = second["data"]
    assert updated_path == [*prefix, "updated"] and isinstance(updated, float)
    assert csum_path == [*prefix, "csum"] and len(csum) == 32 and int(csum, 16) >= 0
    await b.stop()
    assert await reader.read() == b""  # the subscriber sees the restart
    writer.close()


# --- encrypted raw TCP ------------------------------------------------------------------------------


async def test_encrypted_round_trip(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    big = ("x" * 1000 + "\n") * 1000  # 1 MB: no size limit on the raw protocol
    frame = await encrypted(
        a.raw_tcp_port, {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "big", "data": big}}
    )
    assert decrypt(SECRET, frame) == {"status": 0, "info": "key big value set"}
    frame = await encrypted(a.raw_tcp_port, {"action": "key", "method": "GET", "options": {"path": OBJ, "key": "big"}})
    assert decrypt(SECRET, frame) == {"status": 0, "data": big}
    assert len(frame) < len(big) // 10  # zlib-compressed on the wire


@pytest.mark.parametrize(("secret", "clustername"), [("w" * 40, "demo"), (SECRET, "other")])
async def test_encrypted_wrong_credentials_answer_401_with_the_daemons_secret(
    agents: tuple[FakeAgent, FakeAgent], secret: str, clustername: str
) -> None:
    frame = await encrypted(
        agents[0].raw_tcp_port, {"action": "whoami", "method": "GET"}, secret=secret, clustername=clustername
    )
    assert decrypt(SECRET, frame) == {"status": 401, "error": "node None is not a cluster None node"}


async def test_encrypted_events(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    reader, writer = await asyncio.open_connection("127.0.0.1", a.raw_tcp_port)
    writer.write(encrypt(SECRET, "demo", {"action": "events", "method": "GET", "options": {}}))
    await a.wait_for_subscribers(1)
    a.cluster.set_value("vm1", OBJ, "k", b"cli\n")
    event = decrypt(SECRET, await reader.readuntil(b"\0"))
    assert event["kind"] == "patch"  # on the writer: no service_config_installed
    assert event["data"][0][0] == ["monitor", "nodes", "vm1", "services", "config", OBJ, "updated"]
    writer.close()


async def test_encrypted_garbage_is_survived(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    for junk in (b"nonsense\0", b'{"clustername": "demo", "iv": "!!", "data": 3}\0'):
        reader, writer = await asyncio.open_connection("127.0.0.1", a.raw_tcp_port)
        writer.write(junk)
        rest = await reader.read()
        assert rest == b"" or decrypt(SECRET, rest)["status"] == 401
        writer.close()
    frame = await encrypted(a.raw_tcp_port, {"action": "whoami", "method": "GET"})
    assert decrypt(SECRET, frame)["name"] == "root"


# --- HTTP/2 over h2.sock ----------------------------------------------------------------------------


async def test_h2_key_operations_and_headers(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    async with h2_client(a) as client:
        r = await client.post("/key", json={"path": OBJ, "key": "state.json", "data": '{"hello": "world"}\n'})
        assert r.http_version == "HTTP/2"
        assert r.json() == {"status": 0, "info": "key state.json value set"}
        assert r.headers["content-type"] == "application/json"
        assert r.headers["server"] == "opensvc-h2-server/1.0"
        assert int(r.headers["content-length"]) == len(r.content)
        r = await client.get("/key", params={"path": OBJ, "key": "state.json"})
        assert r.json() == {"status": 0, "data": '{"hello": "world"}\n'}
        # query string wins over the body
        r = await client.request("GET", "/key?key=state.json", json={"path": OBJ, "key": "nope"})
        assert r.json()["data"] == '{"hello": "world"}\n'
        r = await client.get("/object_keys", params={"path": OBJ})
        assert r.json() == {"status": 0, "data": ["state.json"]}
        r = await client.get("/whoami")
        assert r.json() == {
            "name": "root",
            "namespace": None,
            "auth": "uxsock",
            "raw_grant": "root",
            "grant": {"root": None},
        }
        r = await client.put("/key", json={"path": OBJ, "key": "k", "data": "v"})
        assert (r.status_code, r.json()) == (501, {"status": 501, "error": "handler PUT key is not supported"})
        r = await client.get("/object/igw/cfg/sozu/key")
        assert r.status_code == 501
        r = await client.post("/key", json={"path": OBJ, "key": "k"})
        assert (r.status_code, r.json()) == (400, {"status": 400, "error": "required option data is not set"})
        r = await client.get("/key", params={"path": "igw/cfg/nope", "key": "k"})
        assert r.status_code == 200 and "KeyError: 'igw/cfg/nope'" in r.json()["traceback"]


async def test_h2_invalid_json_body_drops_the_connection(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    client = await RawH2.open(a.h2_sock)
    await client.request("GET", "/events")  # held stream, lost with the connection
    bad = await client.request("GET", "/whoami", body=b"{not json")
    with pytest.raises(ConnectionError):
        await client.pump_until(bad)
    client.close()
    async with h2_client(a) as fresh:
        assert (await fresh.get("/whoami")).status_code == 200


async def test_h2_http1_is_refused(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    reader, writer = await asyncio.open_unix_connection(str(a.h2_sock))
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await reader.read()  # the server's SETTINGS/GOAWAY at most, then EOF; never an HTTP/1.1 answer
    assert b"HTTP/1.1" not in data
    writer.close()


def _body_of_size(size: int) -> bytes:
    base = json.dumps({"path": OBJ, "key": "pad", "data": ""}).encode()
    body = json.dumps({"path": OBJ, "key": "pad", "data": "a" * (size - len(base))}).encode()
    assert len(body) == size
    return body


async def test_h2_single_body_of_65530_bytes_passes(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    async with h2_client(a) as client:
        r = await client.post("/key", content=_body_of_size(65_530))
        assert r.json() == {"status": 0, "info": "key pad value set"}


async def test_h2_request_bodies_are_limited_per_connection_for_its_whole_life(
    agents: tuple[FakeAgent, FakeAgent],
) -> None:
    a, _ = agents
    client = await RawH2.open(a.h2_sock)
    for _ in range(3):  # three 20 KB POSTs pass on one connection
        stream = await client.request("POST", "/key", body=_body_of_size(20_000))
        assert json.loads((await client.pump_until(stream))["body"])["status"] == 0
    assert client.window_updates == 0
    fourth = await client.request("POST", "/key", body=_body_of_size(20_000))
    assert client.conn.outbound_flow_control_window == 0  # only 5,535 bytes of the fourth could be sent
    ping = await client.request("GET", "/whoami")
    assert json.loads((await client.pump_until(ping))["body"])["name"] == "root"
    assert fourth not in client.responses  # never answered, and no WINDOW_UPDATE arrived
    assert client.window_updates == 0
    assert [r.action for r in a.requests] == ["POST key"] * 3 + ["GET whoami"]
    client.close()


async def test_h2_events_need_accept_event_stream(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, b = agents
    client = await RawH2.open(b.h2_sock)
    silent = await client.request("GET", "/events")
    sse = await client.request("GET", "/events", extra=[("accept", "text/event-stream")])
    ping = await client.request("GET", "/whoami")
    await client.pump_until(ping)
    assert silent not in client.responses  # no headers, no data: the daemon tried server push
    assert client.responses[sse]["headers"]["content-type"] == "text/event-stream"
    await b.wait_for_subscribers(1)
    await raw(a.lsnr_sock, {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "k", "data": "v\n"}})
    while client.responses[sse]["body"].count(b"\n\n") < 2:
        data = await client.reader.read(65536)
        assert data, "connection closed before the events arrived"
        for event in client.conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                client.responses[event.stream_id]["body"] += event.data
    blocks = client.responses[sse]["body"].decode().split("\n\n")
    first_id, first_data = blocks[0].split("\n")
    assert first_id == "id: 1"
    assert json.loads(first_data.removeprefix("data: "))["data"]["id"] == "service_config_installed"
    assert json.loads(blocks[1].split("\n")[1].removeprefix("data: "))["kind"] == "patch"
    assert silent not in client.responses
    client.close()


async def test_h2_events_with_httpx_and_selector(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    a.cluster.create_object("igw/cfg/other")
    async with (
        h2_client(a) as client,
        client.stream(
            "GET", "/events", params={"selector": OBJ, "full": "true"}, headers={"accept": "text/event-stream"}
        ) as response,
    ):
        lines = response.aiter_lines()
        datas: list[dict[str, Any]] = []

        async def next_event() -> dict[str, Any]:
            async for line in lines:
                if line.startswith("data: "):
                    return dict(json.loads(line[6:]))
            raise AssertionError("stream ended")

        full = await next_event()
        assert full["kind"] == "full"
        assert full["data"]["monitor"]["nodes"]["vm1"]["services"]["config"].keys() == {OBJ}
        a.cluster.set_value("vm1", "igw/cfg/other", "k", b"filtered out\n")
        a.cluster.set_value("vm1", OBJ, "k", b"seen\n")
        datas.append(await next_event())
        assert datas[0]["data"][0][0][5] == OBJ


# --- replication, lost updates, projections ---------------------------------------------------------


async def test_replication_delay_and_settle(run_root: pathlib.Path) -> None:
    c = FakeOpenSVCCluster("demo", SECRET, replication_delay_s=0.05, monitor_interval_s=0)
    c.create_object(OBJ)
    async with c.agent("vm1", run_root / "a") as a, c.agent("vm2", run_root / "b"):
        reply = await raw(
            a.lsnr_sock, {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "k", "data": "v\n"}}
        )
        assert reply["status"] == 0
        assert c.value("vm1", OBJ, "k") == b"v\n"
        assert c.value("vm2", OBJ, "k") is None  # not replicated yet
        await c.settle()
        assert c.value("vm2", OBJ, "k") == b"v\n"


async def test_concurrent_posts_lose_updates(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    barrier = asyncio.Barrier(2)
    a.write_barrier = barrier.wait  # both writers have read the object before either writes
    replies = await asyncio.gather(
        *(
            raw(a.lsnr_sock, {"action": "key", "method": "POST", "options": {"path": OBJ, "key": k, "data": "v\n"}})
            for k in ("k1", "k2")
        )
    )
    assert [r["status"] for r in replies] == [0, 0]  # both "succeeded"
    keys = await raw(a.lsnr_sock, {"action": "object_keys", "method": "GET", "options": {"path": OBJ}})
    assert len(keys["data"]) == 1  # yet one update was lost


async def test_projection_is_rewritten_in_place_and_observable_while_truncated(
    agents: tuple[FakeAgent, FakeAgent], run_root: pathlib.Path
) -> None:
    a, b = agents
    target = run_root / "vol" / "sozu" / "state.json"
    b.project(OBJ, "state.json", target)
    b.projection_chunk_bytes = 1000
    a.cluster.set_value("vm1", OBJ, "state.json", b"first\n")
    await a.cluster.settle()
    assert target.read_bytes() == b"first\n"
    inode = target.stat().st_ino
    seen: list[tuple[str, int, int]] = []

    async def hook(step: ProjectionStep) -> None:
        seen.append((step.stage, step.size, target.stat().st_size))

    b.projection_hook = hook
    big = b"x" * 2500 + b"\n"
    await raw(
        a.lsnr_sock,
        {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "state.json", "data": big.decode()}},
    )
    await a.cluster.settle()
    assert seen[0] == ("truncated", 0, 0)  # a reader would see an empty file here
    assert ("chunk", 1000, 1000) in seen  # then a partial one
    assert seen[-1] == ("closed", len(big), len(big))
    assert target.read_bytes() == big
    assert target.stat().st_ino == inode  # never replaced by rename
    seen.clear()
    a.cluster.set_value("vm1", OBJ, "other", b"x\n")  # same state.json content: not rewritten
    await a.cluster.settle()
    assert seen == []


async def test_post_returns_after_the_local_projection(
    agents: tuple[FakeAgent, FakeAgent], run_root: pathlib.Path
) -> None:
    a, _ = agents
    target = run_root / "local.json"
    a.project(OBJ, "k", target)
    await raw(a.lsnr_sock, {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "k", "data": "now\n"}})
    assert target.read_bytes() == b"now\n"


# --- faults, restart, request log -------------------------------------------------------------------


async def test_faults(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    get = {"action": "key", "method": "GET", "options": {"path": OBJ, "key": "k"}}
    a.faults.fail_500 = 2
    assert (await raw(a.lsnr_sock, get))["status"] == 500
    async with h2_client(a) as client:
        assert (await client.get("/whoami")).status_code == 500
        assert (await client.get("/whoami")).status_code == 200
        a.faults.auth_failure = True
        r = await client.get("/whoami")
        assert (r.status_code, r.json()) == (401, {"status": 401, "error": "Not Authorized"})
    assert decrypt(SECRET, await encrypted(a.raw_tcp_port, get))["status"] == 401
    a.faults.auth_failure = False
    a.faults.down = True
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await raw(a.lsnr_sock, get)
    a.faults.down = False
    a.faults.delay_s = 0.01
    assert (await raw(a.lsnr_sock, get))["status"] == 1


async def test_down_closes_open_connections(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    async with h2_client(a) as client:
        assert (await client.get("/whoami")).status_code == 200
        a.faults.down = True
        with pytest.raises(httpx.TransportError):
            await client.get("/whoami")


async def test_stop_start_restarts_on_the_same_paths(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    port = a.raw_tcp_port
    await raw(a.lsnr_sock, {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "k", "data": "kept\n"}})
    await a.stop()
    assert not a.lsnr_sock.exists()
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(str(a.h2_sock))
    await a.start()
    assert a.raw_tcp_port == port
    got = await raw(a.lsnr_sock, {"action": "key", "method": "GET", "options": {"path": OBJ, "key": "k"}})
    assert got == {"status": 0, "data": "kept\n"}


async def test_request_log_counts_served_writes(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    a.faults.fail_500 = 1
    post = {"action": "key", "method": "POST", "options": {"path": OBJ, "key": "k", "data": "v\n"}}
    await raw(a.lsnr_sock, post)  # refused by the fault: not served
    await raw(a.lsnr_sock, post)
    assert a.requests == [("lsnr", "POST key", OBJ, "k")]


async def test_relay_with_o_node(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    a.cluster.set_value("vm2", OBJ, "k", b"from vm2\n")
    async with h2_client(a) as client:
        r = await client.get("/key", params={"path": OBJ, "key": "k"}, headers={"o-node": "vm2"})
        assert r.json() == {"nodes": {"vm2": {"status": 0, "data": "from vm2\n"}}, "status": 0}
        r = await client.get("/key", params={"path": "igw/cfg/nope", "key": "k"}, headers={"o-node": "vm2"})
        assert r.json() == {"nodes": {}, "status": 0}


# --- om3 --------------------------------------------------------------------------------------------


async def test_om3_data_keys(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, b = agents
    base = f"/api/object/path/{OBJ}/data"
    async with om3_client(a) as client:
        r = await client.post(f"{base}/key", params={"name": "bin"}, content=b"\xff\x00raw")
        assert r.status_code == 204
        r = await client.post(f"{base}/key", params={"name": "bin"}, content=b"again")
        assert r.status_code == 409 and r.json()["status"] == 409 and {"title", "detail"} <= r.json().keys()
        assert (await client.put(f"{base}/key", params={"name": "missing"}, content=b"x")).status_code == 404
        assert (await client.put(f"{base}/key", params={"name": "bin"}, content=b"\xff\x00new")).status_code == 204
        r = await client.get(f"{base}/key", params={"name": "bin"})
        assert (r.status_code, r.content, r.headers["content-type"]) == (
            200,
            b"\xff\x00new",
            "application/octet-stream",
        )
        r = await client.get(f"{base}/keys")
        assert r.json() == {"kind": "DataKeyList", "items": [{"node": "vm1", "object": OBJ, "name": "bin", "size": 5}]}
        assert (await client.delete(f"{base}/key", params={"name": "bin"})).status_code == 204
        assert (await client.get(f"{base}/key", params={"name": "bin"})).status_code == 404
        assert (await client.get("/api/object/path/igw/cfg/nope/data/keys")).status_code == 404
    assert b.cluster.value("vm2", OBJ, "bin") is None


async def test_om3_body_too_large(run_root: pathlib.Path) -> None:
    c = FakeOpenSVCCluster("demo", SECRET, max_key_size=1000)
    c.create_object(OBJ)
    async with c.agent("vm1", run_root / "a") as a, om3_client(a) as client:
        url = f"/api/object/path/{OBJ}/data/key"
        assert (await client.post(url, params={"name": "ok"}, content=b"x" * 1000)).status_code == 204
        r = await client.post(url, params={"name": "big"}, content=b"x" * 1001)
        assert r.status_code == 413 and r.json()["title"] == "Body too large"
        assert c.value("vm1", OBJ, "big") is None


async def test_om3_events(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, b = agents
    async with (
        om3_client(b) as client,
        client.stream(
            "GET", "/api/node/name/vm2/daemon/event", params={"filter": f"InstanceConfigUpdated,path={OBJ}"}
        ) as response,
    ):
        assert response.headers["content-type"] == "text/event-stream"
        await b.wait_for_subscribers(1)
        a.cluster.set_value("vm1", OBJ, "k", b"v\n")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                break
    assert event["kind"] == "InstanceConfigUpdated"
    assert event["data"]["labels"] == {"path": OBJ, "node": "vm2"}
    assert len(event["data"]["instance_config"]["csum"]) == 32


# --- TLS (1215) -------------------------------------------------------------------------------------


def _tls_client(agent: FakeAgent, *, cert: tuple[pathlib.Path, pathlib.Path] | None = None) -> httpx.AsyncClient:
    assert agent.ca_file is not None
    context = ssl.create_default_context(cafile=str(agent.ca_file))
    if cert is not None:
        context.load_cert_chain(*cert)
    return httpx.AsyncClient(http1=False, http2=True, verify=context, base_url=f"https://127.0.0.1:{agent.https_port}")


async def test_https_auth(agents: tuple[FakeAgent, FakeAgent], run_root: pathlib.Path) -> None:
    a, _ = agents
    async with _tls_client(a) as client:
        r = await client.get("/whoami")
        assert (r.status_code, r.json()) == (401, {"status": 401, "error": "Not Authorized"})
        r = await client.get("/whoami", headers={"o-secret": "x" * 32})
        assert r.status_code == 401
        r = await client.get("/key", params={"path": OBJ, "key": "nope"}, headers={"o-secret": SECRET[:32]})
        assert r.json()["error"] == "configuration key nope does not exist or has no value"
    files = a.cluster.issue_client_cert("igwadmin", run_root / "client")
    async with _tls_client(a, cert=(files.cert_file, files.key_file)) as client:
        assert (await client.get("/whoami")).status_code == 200


async def test_https_requires_alpn_h2(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    assert a.ca_file is not None and a.https_port is not None
    context = ssl.create_default_context(cafile=str(a.ca_file))
    context.set_alpn_protocols(["http/1.1"])
    reader, writer = await asyncio.open_connection("127.0.0.1", a.https_port, ssl=context)
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        assert await reader.read() == b""
    writer.close()


# --- command line -----------------------------------------------------------------------------------


def test_cli_help_says_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fake_opensvc.main(["--help"])
    assert exit_info.value.code == 0
    assert "SIMULATED OpenSVC agent" in capsys.readouterr().out


def test_secret_not_in_repr() -> None:
    c = FakeOpenSVCCluster("demo", SECRET)
    assert SECRET not in repr(c)
    assert len(FakeOpenSVCCluster().secret) >= 40


# --- hostile HTTP/2 clients and restarts ------------------------------------------------------------


async def test_h2_hostile_clients_never_kill_the_server(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    for sock in (a.h2_sock, a.om3_sock):
        for junk in (b"\x00" * 100, preface + b"\x00\x00\x10\x01", preface + b"\xff" * 64):
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(junk)
            writer.write_eof()
            await reader.read()  # whatever the server says (SETTINGS, GOAWAY), it ends the connection
            writer.close()
        # a request whose body never ends, then a disconnect
        half = await RawH2.open(sock)
        stream = half.conn.get_next_available_stream_id()
        half.conn.send_headers(
            stream, [(":method", "POST"), (":path", "/key"), (":scheme", "http"), (":authority", "x")]
        )
        half.conn.send_data(stream, b'{"path": ')
        await half.flush()
        half.close()
    async with h2_client(a) as client:
        assert (await client.get("/whoami")).status_code == 200
    async with om3_client(a) as client:
        assert (await client.get(f"/api/object/path/{OBJ}/data/keys")).status_code == 200


async def test_h2_event_subscribers_see_the_connection_close_on_stop(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    async with (
        h2_client(a) as client,
        client.stream("GET", "/events", headers={"accept": "text/event-stream"}) as response,
    ):
        await a.wait_for_subscribers(1)
        await a.stop()
        with pytest.raises(httpx.TransportError):
            async for _line in response.aiter_lines():
                pass
    assert a.subscriber_count == 0


async def test_om3_batch_and_multi_get(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    base = f"/api/object/path/{OBJ}/data"
    ops = [
        {"action": "add", "name": "a", "string": "A"},
        {"action": "add", "name": "b", "bytes": base64.b64encode(b"\x00B").decode()},
        {"action": "rename", "name": "a", "to": "c"},
    ]
    async with om3_client(a) as client:
        assert (await client.patch(base, json=ops)).status_code == 204
        r = await client.get(base, params=[("name", "b"), ("name", "c")])
        assert r.json() == [{"name": "b", "bytes": base64.b64encode(b"\x00B").decode()}, {"name": "c", "bytes": "QQ=="}]
        # one transaction: a failing operation leaves everything unchanged
        bad = [{"action": "remove", "name": "b"}, {"action": "add", "name": "c", "string": "dup"}]
        assert (await client.patch(base, json=bad)).status_code == 409
    assert a.cluster.keys("vm1", OBJ) == ["b", "c"]


async def test_h2_single_body_of_65536_bytes_is_never_answered(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    client = await RawH2.open(a.h2_sock)
    big = await client.request("POST", "/key", body=_body_of_size(65_536))  # one byte stays unsent
    ping = await client.request("GET", "/whoami")
    assert json.loads((await client.pump_until(ping))["body"])["name"] == "root"
    assert big not in client.responses and client.window_updates == 0
    assert a.cluster.value("vm1", OBJ, "pad") is None
    client.close()


async def test_projection_registered_before_start_is_written_at_start(
    cluster: FakeOpenSVCCluster, run_root: pathlib.Path
) -> None:
    agent = cluster.agent("vm1", run_root / "a")
    cluster.set_value("vm1", OBJ, "state.json", b"boot state\n")
    target = run_root / "vol" / "state.json"
    agent.project(OBJ, "state.json", target)
    assert not target.exists()  # the volume is not started yet
    async with agent:
        assert target.read_bytes() == b"boot state\n"


async def test_raw_node_option_relays(agents: tuple[FakeAgent, FakeAgent]) -> None:
    a, _ = agents
    message = {"action": "key", "method": "POST", "node": "vm2", "options": {"path": OBJ, "key": "k", "data": "x\n"}}
    assert await raw(a.lsnr_sock, message) == {"nodes": {"vm2": {"status": 0, "info": "key k value set"}}, "status": 0}
    assert a.requests == [("lsnr", "POST key", OBJ, "k")]


# --- the v2 monitor loop: API writes wait for it, wake_monitor runs it now -----------------------------


async def _raw_call(a: FakeAgent, message: dict[str, object]) -> dict[str, object]:
    reader, writer = await asyncio.open_unix_connection(str(a.lsnr_sock))
    writer.write(json.dumps(message).encode() + b"\0")
    await writer.drain()
    reply = json.loads((await reader.readuntil(b"\0"))[:-1])
    writer.close()
    assert isinstance(reply, dict)
    return reply


async def test_an_api_write_reaches_peers_at_the_monitor_loop_or_on_wake(run_root: pathlib.Path) -> None:
    c = FakeOpenSVCCluster("demo", SECRET, monitor_interval_s=600)  # a loop that never comes in this test
    c.create_object(OBJ)
    c.create_object("igw/cfg/other")
    async with c.agent("vm1", run_root / "a") as a, c.agent("vm2", run_root / "b"):
        data = {"path": OBJ, "key": "k", "data": "v1\n"}
        assert (await _raw_call(a, {"action": "key", "method": "POST", "options": data}))["status"] == 0
        await c.settle()
        assert c.value("vm1", OBJ, "k") == b"v1\n"
        assert c.value("vm2", OBJ, "k") is None, "an API write must wait for the writer's monitor loop"
        c.set_value("vm2", "igw/cfg/other", "cli", b"x\n")  # the CLI path replicates at once
        await c.settle()
        assert c.value("vm1", "igw/cfg/other", "cli") == b"x\n"
        wake = {"path": OBJ, "reason": "test", "immediate": True}
        assert await _raw_call(a, {"action": "wake_monitor", "method": "POST", "options": wake}) == {"status": 0}
        await c.settle()
        assert c.value("vm2", OBJ, "k") == b"v1\n"


async def test_the_monitor_loop_replicates_by_itself(run_root: pathlib.Path) -> None:
    c = FakeOpenSVCCluster("demo", SECRET, monitor_interval_s=0.2)
    c.create_object(OBJ)
    async with c.agent("vm1", run_root / "a") as a, c.agent("vm2", run_root / "b"):
        data = {"path": OBJ, "key": "k", "data": "v1\n"}
        assert (await _raw_call(a, {"action": "key", "method": "POST", "options": data}))["status"] == 0
        await wait_until(lambda: c.value("vm2", OBJ, "k") == b"v1\n", what="the monitor loop to replicate")
