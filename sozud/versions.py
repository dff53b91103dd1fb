"""Sozu versions and what each of them knows.

Three protocol families (docs/sozu-command-protocol.md §1):

- 0.15.x: JSON + NUL on the socket, addresses as strings, listener answers inline (fields 3, 4);
- 1.0.0 - 1.1.1: length-prefixed protobuf, ``SocketAddress`` messages;
- 2.0.0 - 2.1.0: as 1.x plus new requests and fields (a superset).

Our schema (``sozud/proto/command.proto``) is the 2.1.0 superset. ``SozuVersion.knows_request`` and
``SozuVersion.knows_field`` say which parts of it a given version knows: sozu never answers a request
type it does not know, and its state-file writer emits exactly the fields it knows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from sozud.errors import ConfigError


class Family(Enum):
    V0_15 = "0.15"
    V1 = "1.x"
    V2 = "2.x"


@dataclass(frozen=True, order=True)
class SozuVersion:
    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str) -> SozuVersion:
        """``"2.1.0"``, ``"1.1"``, ``"0.15"``, ``"2"`` (missing parts are 0 or, for a bare family, the newest)."""
        m = re.fullmatch(r"\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?\s*", text)
        if not m:
            raise ConfigError(f"sozu version {text!r} is not of the form MAJOR[.MINOR[.PATCH]] (e.g. 2.1.0)")
        major = int(m.group(1))
        if m.group(2) is None:
            newest = {0: (0, 15, 19), 1: (1, 1, 1), 2: (2, 1, 0)}
            if major not in newest:
                raise ConfigError(f"sozu version {text!r} is not supported (0.15, 1.x and 2.x are)")
            return cls(*newest[major])
        v = cls(major, int(m.group(2)), int(m.group(3) or 0))
        if not (v.family is Family.V0_15 and v.minor == 15) and v.major not in (1, 2):
            raise ConfigError(f"sozu version {text!r} is not supported (0.15, 1.x and 2.x are)")
        return v

    @property
    def family(self) -> Family:
        if self.major == 0:
            return Family.V0_15
        return Family.V1 if self.major == 1 else Family.V2

    @property
    def json_socket(self) -> bool:
        """0.15 speaks JSON + NUL on its command socket; 1.x/2.x speak length-prefixed protobuf."""
        return self.family is Family.V0_15

    def knows_request(self, kind: str) -> bool:
        """Whether this version knows the ``Request.request_type`` oneof field ``kind``."""
        since = REQUEST_SINCE.get(kind, V0_15_0)
        return self >= since

    def knows_field(self, message: str, field: str) -> bool:
        """Whether this version's schema has ``message.field`` (message = short name, e.g. ``Cluster``)."""
        only_015 = (message, field) in FIELDS_0_15_ONLY
        if only_015:
            return self.family is Family.V0_15
        if self.family is Family.V0_15 and (message, field) in FIELDS_SINCE_1_0:
            return False
        since = FIELD_SINCE.get((message, field))
        return since is None or self >= since

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


V0_15_0 = SozuVersion(0, 15, 0)
V0_15_19 = SozuVersion(0, 15, 19)
V1_0_0 = SozuVersion(1, 0, 0)
V1_0_3 = SozuVersion(1, 0, 3)
V1_1_1 = SozuVersion(1, 1, 1)
V2_0_0 = SozuVersion(2, 0, 0)
V2_0_2 = SozuVersion(2, 0, 2)
V2_1_0 = SozuVersion(2, 1, 0)

# Request types added after 1.0 (every other request type exists from 0.15 on).
REQUEST_SINCE: dict[str, SozuVersion] = {
    **{
        k: V2_0_0
        for k in (
            "update_http_listener",
            "update_https_listener",
            "update_tcp_listener",
            "set_max_connections_per_ip",
            "query_max_connections_per_ip",
            "set_health_check",
            "remove_health_check",
            "query_health_checks",
            "set_metric_detail",
        )
    },
    **{k: V2_1_0 for k in ("add_udp_listener", "update_udp_listener", "add_udp_frontend", "remove_udp_frontend")},
}

_H2_KNOBS = (
    "h2_max_rst_stream_per_window",
    "h2_max_ping_per_window",
    "h2_max_settings_per_window",
    "h2_max_empty_data_per_window",
    "h2_max_continuation_frames",
    "h2_max_glitch_count",
    "h2_initial_connection_window",
    "h2_max_concurrent_streams",
    "h2_stream_shrink_ratio",
    "h2_max_rst_stream_lifetime",
    "h2_max_rst_stream_abusive_lifetime",
    "h2_max_rst_stream_emitted_lifetime",
    "h2_max_header_list_size",
    "h2_stream_idle_timeout_seconds",
    "h2_max_header_table_size",
    "h2_graceful_shutdown_deadline_seconds",
    "h2_max_window_update_stream0_per_window",
)

FIELD_SINCE: dict[tuple[str, str], SozuVersion] = {
    **{
        ("Cluster", f): V2_0_0
        for f in (
            "http2",
            "answers",
            "https_redirect_port",
            "authorized_hashes",
            "www_authenticate",
            "max_connections_per_ip",
            "retry_after",
            "health_check",
        )
    },
    ("Cluster", "udp"): V2_1_0,
    **{
        ("RequestHttpFrontend", f): V2_0_0
        for f in (
            "redirect",
            "required_auth",
            "redirect_scheme",
            "redirect_template",
            "rewrite_host",
            "rewrite_path",
            "rewrite_port",
            "headers",
            "hsts",
        )
    },
    **{("HttpListenerConfig", f): V2_0_0 for f in (*_H2_KNOBS, "sozu_id_header", "answers")},
    ("HttpListenerConfig", "elide_x_real_ip"): V2_0_0,
    ("HttpListenerConfig", "send_x_real_ip"): V2_0_0,
    ("HttpListenerConfig", "h2_max_header_fields"): V2_0_2,
    **{
        ("HttpsListenerConfig", f): V2_0_0
        for f in (
            *_H2_KNOBS,
            "alpn_protocols",
            "strict_sni_binding",
            "disable_http11",
            "sozu_id_header",
            "answers",
            "elide_x_real_ip",
            "send_x_real_ip",
            "hsts",
        )
    },
    ("HttpsListenerConfig", "h2_max_header_fields"): V2_0_2,
    ("CustomHttpAnswers", "answer_421"): V2_0_0,
    ("CustomHttpAnswers", "answer_429"): V2_0_0,
    ("UpdateHttpListenerConfig", "h2_max_header_fields"): V2_0_2,
    ("UpdateHttpsListenerConfig", "h2_max_header_fields"): V2_0_2,
    ("QueryMetricsOptions", "workers"): V1_0_3,
    ("Event", "metric_detail"): V2_0_0,
    **{
        ("ResponseContent", f): V2_0_0
        for f in (
            "max_connections_per_ip_limit",
            "health_checks_list",
            "metric_detail_status",
            "worker_metric_detail_status",
        )
    },
    ("ListenersList", "udp_listeners"): V2_1_0,
    ("ListedFrontends", "udp_frontends"): V2_1_0,
    ("ClusterInformation", "udp_frontends"): V2_1_0,
}

# Present in 1.0+ but not in 0.15.
FIELDS_SINCE_1_0: frozenset[tuple[str, str]] = frozenset(
    {("HttpListenerConfig", "http_answers"), ("HttpsListenerConfig", "http_answers")}
)

# Present in 0.15 only (listener answers inline).
FIELDS_0_15_ONLY: frozenset[tuple[str, str]] = frozenset(
    {
        ("HttpListenerConfig", "answer_404"),
        ("HttpListenerConfig", "answer_503"),
        ("HttpsListenerConfig", "answer_404"),
        ("HttpsListenerConfig", "answer_503"),
    }
)

# 2.0.0+ mark these `#[serde(default)]`: a reader accepts them missing (§6.2).
SERDE_DEFAULT_FIELDS: frozenset[tuple[str, str]] = frozenset(
    {
        ("Cluster", "answers"),
        ("Cluster", "authorized_hashes"),
        ("RequestHttpFrontend", "headers"),
        ("HttpListenerConfig", "answers"),
        ("HttpsListenerConfig", "alpn_protocols"),
        ("HttpsListenerConfig", "answers"),
        ("RequestUdpFrontend", "tags"),
    }
)

# Requests sozu's main state stores (or refuses): the ones a state file may hold and that change the
# configuration. Every other request is a query, a runtime-only setting or a process control (§5).
STORED_REQUESTS: frozenset[str] = frozenset(
    {
        "add_cluster",
        "remove_cluster",
        "add_http_frontend",
        "remove_http_frontend",
        "add_https_frontend",
        "remove_https_frontend",
        "add_certificate",
        "replace_certificate",
        "remove_certificate",
        "add_tcp_frontend",
        "remove_tcp_frontend",
        "add_udp_frontend",
        "remove_udp_frontend",
        "add_backend",
        "remove_backend",
        "add_http_listener",
        "add_https_listener",
        "add_tcp_listener",
        "add_udp_listener",
        "update_http_listener",
        "update_https_listener",
        "update_tcp_listener",
        "update_udp_listener",
        "remove_listener",
        "activate_listener",
        "deactivate_listener",
        "set_health_check",
        "remove_health_check",
    }
)
