"""Hypothesis strategies for sozu configuration states (shared by the state tests).

States are drawn from small pools of addresses, cluster ids, hostnames and backend ids, so that two
independently drawn states overlap: same keys with different values, TCP frontends of one
(cluster, address) with different tags, backends sharing an address, frontends on addresses without a
listener and objects of clusters that do not exist (orphans, which sozu keeps). Certificates are the
fixture test certificates (valid PEM, real fingerprints), with their names given explicitly (as sozu
1.x/2.x store them). Every message sets all its proto2 required fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from hypothesis import strategies as st

from sozud.proto import command_pb2 as pb
from sozud.serde import parse_address
from sozud.state.model import ConfigState, copy_message
from sozud.versions import V0_15_19, V1_1_1, V2_1_0, Family, SozuVersion

FIXTURES = Path("/work/shared/fixtures")
CERTS_DIR = FIXTURES / "certs"
VERSIONS = (V0_15_19, V1_1_1, V2_1_0)

ADDRESSES = ("127.0.0.1:8080", "127.0.0.1:8443", "10.0.0.1:9000", "[::1]:8080")
BACKEND_ADDRESSES = ("10.1.0.1:80", "10.1.0.2:80", "[2001:db8::5]:8000")
CLUSTER_IDS = ("app1", "app2", "app3", "tcp1", "ghost")
BACKEND_IDS = ("b0", "b1", "b2")
HOSTNAMES = ("example.test", "api.example.test", "*.wild.example.test", "www.example.test")
PATHS = ((pb.PREFIX, "/"), (pb.PREFIX, "/api"), (pb.REGEX, "^/v[0-9]+/"), (pb.EQUALS, "/health"))
TAGS: tuple[dict[str, str], ...] = ({}, {"env": "a"}, {"env": "b", "owner": "x"})

# name -> (leaf PEM, chain PEMs, key PEM, names as sozu derives them)
CERT_NAMES = {
    "example.test": ["example.test", "www.example.test"],
    "example.test-v2": ["example.test", "www.example.test"],
    "api.example.test": ["api.example.test"],
    "wild.example.test": ["*.wild.example.test", "wild.example.test"],
}


def _read(name: str) -> str:
    return (CERTS_DIR / name).read_text()


def fixture_certificate(name: str, names: list[str] | None = None) -> pb.CertificateAndKey:
    chain_file = f"{name}.chain.pem" if name.startswith("example.test") else "empty.chain.pem"
    chain = _read(chain_file).strip()
    return pb.CertificateAndKey(
        certificate=_read(f"{name}.pem"),
        certificate_chain=[chain + "\n"] if chain else [],
        key=_read(f"{name}.key"),
        versions=[],
        names=CERT_NAMES[name] if names is None else names,
    )


def sock(text: str) -> pb.SocketAddress:
    return parse_address(text)


def opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def _set(msg: Message, **fields: Any) -> None:
    for name, value in fields.items():
        if value is None:
            continue
        target = getattr(msg, name)
        if isinstance(value, Message):
            target.CopyFrom(value)
        elif isinstance(value, dict):
            target.update(value)
        elif isinstance(value, list):
            target.extend(value)
        else:
            setattr(msg, name, value)


timeouts = st.integers(min_value=1, max_value=120)


@st.composite
def http_answers(draw: st.DrawFn, version: SozuVersion) -> pb.CustomHttpAnswers:
    msg = pb.CustomHttpAnswers()
    msg.SetInParent()
    for name in ("answer_404", "answer_503") + (("answer_429",) if version.family is Family.V2 else ()):
        if draw(st.booleans()):
            setattr(msg, name, f"HTTP/1.1 {name[-3:]} X\r\n\r\n{draw(st.sampled_from(['a', 'b']))}")
    return msg


@st.composite
def listener(draw: st.DrawFn, kind: str, address: str, version: SozuVersion) -> Message:
    addr = sock(address)
    v2 = version.family is Family.V2
    if kind == "tcp":
        return pb.TcpListenerConfig(
            address=addr,
            expect_proxy=draw(st.booleans()),
            front_timeout=draw(timeouts),
            back_timeout=30,
            connect_timeout=draw(st.sampled_from([3, 5])),
            active=draw(st.booleans()),
        )
    if kind == "udp":
        return pb.UdpListenerConfig(
            address=addr,
            front_timeout=draw(timeouts),
            back_timeout=30,
            max_rx_datagram_size=1500,
            max_flows=draw(st.sampled_from([0, 100])),
            active=draw(st.booleans()),
        )
    msg: Any = pb.HttpListenerConfig() if kind == "http" else pb.HttpsListenerConfig()
    _set(
        msg,
        address=addr,
        expect_proxy=draw(st.booleans()),
        sticky_name=draw(st.sampled_from(["SOZUBALANCEID", "STICKY"])),
        front_timeout=draw(timeouts),
        back_timeout=draw(st.sampled_from([30, 45])),
        connect_timeout=3,
        request_timeout=10,
        active=draw(st.booleans()),
    )
    if draw(st.booleans()):
        msg.public_address.CopyFrom(sock("192.0.2.1:80"))
    if version.family is Family.V0_15:
        msg.answer_404 = "HTTP/1.1 404 Not Found\r\n\r\n"
        msg.answer_503 = draw(st.sampled_from(["HTTP/1.1 503 A\r\n\r\n", "HTTP/1.1 503 B\r\n\r\n"]))
    else:
        _set(msg, http_answers=draw(opt(http_answers(version))))
    if kind == "https":
        _set(
            msg,
            versions=draw(st.sampled_from([[pb.TLS_V1_2, pb.TLS_V1_3], [pb.TLS_V1_3]])),
            cipher_list=["TLS13_AES_256_GCM_SHA384"],
            send_tls13_tickets=draw(st.sampled_from([4, 2])),
        )
    if v2:
        _set(
            msg,
            h2_max_concurrent_streams=draw(opt(st.sampled_from([100, 200]))),
            answers=draw(st.sampled_from([{}, {"503": "busy"}])),
            send_x_real_ip=draw(opt(st.booleans())),
        )
        if kind == "https":
            _set(
                msg,
                alpn_protocols=draw(st.sampled_from([[], ["h2", "http/1.1"], ["http/1.1"]])),
                strict_sni_binding=draw(opt(st.booleans())),
                hsts=draw(opt(st.builds(pb.HstsConfig, enabled=st.just(True), max_age=st.sampled_from([60, 3600])))),
            )
    return msg  # type: ignore[no-any-return]


@st.composite
def cluster(draw: st.DrawFn, cluster_id: str, version: SozuVersion) -> pb.Cluster:
    max_lb = 5 if version >= V2_1_0 else 3
    msg = pb.Cluster(
        cluster_id=cluster_id,
        sticky_session=draw(st.booleans()),
        https_redirect=draw(st.booleans()),
        load_balancing=draw(st.integers(min_value=0, max_value=max_lb)),  # type: ignore[arg-type]
    )
    _set(
        msg,
        proxy_protocol=draw(opt(st.sampled_from([0, 1, 2]))),
        answer_503=draw(opt(st.just("HTTP/1.1 503 busy\r\n\r\n"))),
        load_metric=draw(opt(st.sampled_from([0, 1, 2]))),
    )
    if version.family is Family.V2:
        _set(
            msg,
            http2=draw(opt(st.booleans())),
            answers=draw(st.sampled_from([{}, {"503": "busy"}])),
            authorized_hashes=draw(st.sampled_from([[], ["u:" + "ab" * 32]])),
        )
    return msg


@st.composite
def backend(draw: st.DrawFn, version: SozuVersion) -> pb.AddBackend:
    msg = pb.AddBackend(
        cluster_id=draw(st.sampled_from(CLUSTER_IDS)),
        backend_id=draw(st.sampled_from(BACKEND_IDS)),
        address=sock(draw(st.sampled_from(BACKEND_ADDRESSES))),
    )
    _set(
        msg,
        sticky_id=draw(opt(st.sampled_from(["s1", "s2"]))),
        load_balancing_parameters=draw(opt(st.builds(pb.LoadBalancingParams, weight=st.sampled_from([0, 50, 100])))),
        backup=draw(opt(st.booleans())),
    )
    return msg


@st.composite
def http_frontend(draw: st.DrawFn, version: SozuVersion) -> pb.RequestHttpFrontend:
    kind, value = draw(st.sampled_from(PATHS))
    msg = pb.RequestHttpFrontend(
        address=sock(draw(st.sampled_from(ADDRESSES))),
        hostname=draw(st.sampled_from(HOSTNAMES)),
        path=pb.PathRule(kind=kind, value=value),
        position=draw(st.sampled_from([pb.TREE, pb.TREE, pb.PRE, pb.POST])),
    )
    _set(
        msg,
        cluster_id=draw(opt(st.sampled_from(CLUSTER_IDS))),
        method=draw(st.sampled_from([None, None, "GET", "POST"])),
        tags=draw(st.sampled_from(TAGS)),
    )
    if version.family is Family.V2:
        _set(
            msg,
            redirect=draw(opt(st.sampled_from([pb.FORWARD, pb.PERMANENT]))),
            rewrite_host=draw(opt(st.just("internal.test"))),
            headers=draw(st.sampled_from([[], [pb.Header(position=pb.RESPONSE, key="X-Served-By", val="sozu")]])),
        )
    return msg


@st.composite
def l4_frontend(draw: st.DrawFn, kind: str) -> Message:
    cls = pb.RequestTcpFrontend if kind == "tcp" else pb.RequestUdpFrontend
    msg = cls(
        cluster_id=draw(st.sampled_from(CLUSTER_IDS)),
        address=sock(draw(st.sampled_from(ADDRESSES))),
    )
    msg.tags.update(draw(st.sampled_from(TAGS)))
    return msg


@st.composite
def certificate(draw: st.DrawFn) -> pb.AddCertificate:
    name = draw(st.sampled_from(sorted(CERT_NAMES)))
    cert = fixture_certificate(name)
    cert.versions.extend(draw(st.sampled_from([[], [pb.TLS_V1_2, pb.TLS_V1_3]])))
    return pb.AddCertificate(address=sock(draw(st.sampled_from(ADDRESSES[:2]))), certificate=cert)


@st.composite
def states(draw: st.DrawFn, version: SozuVersion | None = None, max_each: int = 4) -> ConfigState:
    """A random ``ConfigState`` of ``version`` (or of a random version among 0.15.19, 1.1.1, 2.1.0)."""
    if version is None:
        version = draw(st.sampled_from(VERSIONS))
    state = ConfigState(version)
    kinds = ("http", "https", "tcp") + (("udp",) if version >= V2_1_0 else ())
    for kind in kinds:
        for address in draw(st.lists(st.sampled_from(ADDRESSES), unique=True, max_size=2)):
            state.add_listener(kind, draw(listener(kind, address, version)))
    for cid in draw(st.lists(st.sampled_from(CLUSTER_IDS), unique=True, max_size=max_each)):
        state.add("cluster", draw(cluster(cid, version)))
    for b in draw(st.lists(backend(version), max_size=max_each)):
        state.add("backend", b)
    for f in draw(st.lists(http_frontend(version), max_size=max_each)):
        state.add("http_frontend", f)
    for f in draw(st.lists(http_frontend(version), max_size=max_each)):
        state.add("https_frontend", f)
    for l4 in draw(st.lists(l4_frontend("tcp"), max_size=max_each)):
        state.add("tcp_frontend", l4)
    if version >= V2_1_0:
        for l4 in draw(st.lists(l4_frontend("udp"), max_size=2)):
            state.add("udp_frontend", l4)
    for c in draw(st.lists(certificate(), max_size=3)):
        state.add("certificate", c)
    return state


@st.composite
def derived(draw: st.DrawFn, base: ConfigState) -> ConfigState:
    """A state derived from ``base``: some objects dropped, others changed or added (same pools)."""
    other = draw(states(base.version, max_each=3))
    out = ConfigState(base.version)
    keep = draw(st.lists(st.booleans(), min_size=len(base), max_size=len(base)))
    for (key, value), kept in zip(base.items(), keep, strict=True):
        if kept:
            out[key] = copy_message(value)
    take = draw(st.lists(st.booleans(), min_size=len(other), max_size=len(other)))
    for (key, value), taken in zip(other.items(), take, strict=True):
        if taken:
            out[key] = value
    return out


@st.composite
def state_pairs(draw: st.DrawFn, version: SozuVersion | None = None) -> tuple[ConfigState, ConfigState]:
    """(a, b) of one version: b is either drawn independently or derived from a."""
    a = draw(states(version))
    b = draw(st.one_of(states(a.version), derived(a)))
    return a, b
