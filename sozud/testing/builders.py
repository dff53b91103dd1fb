"""Small builders of complete sozu request messages, for tests, benchmarks and the demo.

Every required proto2 field is set (Python's runtime refuses to serialize a message missing one), with
sozu's own defaults (timeouts 60/30/3/10 s, sticky cookie ``SOZUBALANCEID``, weight 100, TREE position).
"""

from __future__ import annotations

from sozud.proto import command_pb2 as pb
from sozud.serde import parse_address
from sozud.state.model import ConfigState
from sozud.versions import Family, SozuVersion


def _listener(
    cfg: pb.HttpListenerConfig | pb.HttpsListenerConfig, address: str, version: SozuVersion | None, active: bool
) -> None:
    cfg.address.CopyFrom(parse_address(address))
    cfg.expect_proxy = False
    cfg.sticky_name = "SOZUBALANCEID"
    cfg.front_timeout, cfg.back_timeout, cfg.connect_timeout, cfg.request_timeout = 60, 30, 3, 10
    cfg.active = active
    if version is not None and version.family is Family.V0_15:
        # 0.15 carries its default answers inline, and requires them
        cfg.answer_404 = "HTTP/1.1 404 Not Found\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
        cfg.answer_503 = "HTTP/1.1 503 Service Unavailable\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"


def http_listener(address: str, *, version: SozuVersion | None = None, active: bool = False) -> pb.HttpListenerConfig:
    cfg = pb.HttpListenerConfig()
    _listener(cfg, address, version, active)
    return cfg


def https_listener(address: str, *, version: SozuVersion | None = None, active: bool = False) -> pb.HttpsListenerConfig:
    cfg = pb.HttpsListenerConfig(send_tls13_tickets=4)
    _listener(cfg, address, version, active)
    return cfg


def cluster(cluster_id: str, *, sticky: bool = False, https_redirect: bool = False) -> pb.Cluster:
    return pb.Cluster(
        cluster_id=cluster_id, sticky_session=sticky, https_redirect=https_redirect, load_balancing=pb.ROUND_ROBIN
    )


def backend(cluster_id: str, backend_id: str, address: str, *, weight: int = 100) -> pb.AddBackend:
    return pb.AddBackend(
        cluster_id=cluster_id,
        backend_id=backend_id,
        address=parse_address(address),
        load_balancing_parameters=pb.LoadBalancingParams(weight=weight),
    )


def remove_backend(cluster_id: str, backend_id: str, address: str) -> pb.RemoveBackend:
    return pb.RemoveBackend(cluster_id=cluster_id, backend_id=backend_id, address=parse_address(address))


def http_frontend(cluster_id: str, address: str, hostname: str, *, path: str = "/") -> pb.RequestHttpFrontend:
    return pb.RequestHttpFrontend(
        cluster_id=cluster_id,
        address=parse_address(address),
        hostname=hostname,
        path=pb.PathRule(kind=pb.PREFIX, value=path),
        position=pb.TREE,
    )


def fleet_state(
    clusters: int,
    *,
    listener: str = "127.0.0.1:8080",
    version: SozuVersion | None = None,
    changed_weight: int | None = None,
) -> ConfigState:
    """A routing state of ``clusters`` clusters, each with one backend and one HTTP frontend on one HTTP
    listener (the shape of the benchmarks); ``changed_weight`` gives the middle cluster's backend that
    weight (a one-backend change)."""
    from sozud.state.model import listener_key

    state = ConfigState(version or SozuVersion(2, 1, 0))
    lst = http_listener(listener, version=version)
    state[listener_key("http", lst)] = lst
    for i in range(clusters):
        cid = f"app-{i:06d}"
        state.add("cluster", cluster(cid))
        addr = f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8000"
        weight = changed_weight if changed_weight is not None and i == clusters // 2 else 100
        state.add("backend", backend(cid, f"{cid}-0", addr, weight=weight))
        state.add("http_frontend", http_frontend(cid, listener, f"{cid}.example.com"))
    return state
