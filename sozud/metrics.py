"""Prometheus metrics in the text exposition format (0.0.4), without a client library.

Served on a local address (``metrics_address``, plain HTTP ``GET /metrics``) and/or written atomically
to a file for node_exporter's textfile collector (``metrics_textfile``).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from sozud.persist import atomic_write


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels)
    return "{" + inner + "}"


@dataclass
class Metric:
    name: str
    kind: str  # "counter" | "gauge"
    help: str
    values: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = value

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in sorted(self.values.items()):
            text = repr(float(value)) if value != int(value) else str(int(value))
            lines.append(f"{self.name}{_labels(labels)} {text}")
        if not self.values and self.kind == "counter":
            lines.append(f"{self.name} 0")
        return "\n".join(lines)


class Metrics:
    """sozud's metrics (names are the public interface: see README)."""

    def __init__(self) -> None:
        self.syncs = Metric("sozud_syncs_total", "counter", "Sync steps run, by outcome.")
        self.steps = Metric(
            "sozud_sync_steps_total",
            "counter",
            "Sync steps that completed, by path: incremental (what changed since a settled step) or full.",
        )
        self.incremental_disagreements = Metric(
            "sozud_incremental_disagreements_total",
            "counter",
            "Full checks that found a cached live read (vouched for by the change probe) or an incremental "
            "decision wrong; the full one was taken. Should stay 0.",
        )
        self.sync_failures = Metric("sozud_sync_failures_total", "counter", "Sync steps that failed, by error type.")
        self.conflicts = Metric(
            "sozud_conflicts_total", "counter", "Merge conflicts resolved by the deterministic rule."
        )
        self.requests = Metric(
            "sozud_sozu_requests_total",
            "counter",
            "Requests sent to sozu while applying plans, by type (the reads of the apply included).",
        )
        self.pushes = Metric("sozud_pushes_total", "counter", "States pushed to the OpenSVC key.")
        self.drift = Metric(
            "sozud_drift_objects", "gauge", "Objects differing between live and shared after the last sync."
        )
        self.last_success = Metric(
            "sozud_last_success_timestamp_seconds", "gauge", "Unix time of the last successful sync."
        )
        self.reconnects = Metric("sozud_sozu_reconnects_total", "counter", "Re-connections to sozu's command socket.")
        self.generation = Metric("sozud_shared_generation", "gauge", "Generation of the shared state last seen.")
        self.sync_duration = Metric("sozud_last_sync_duration_seconds", "gauge", "Duration of the last sync step.")
        self.agent_seconds = Metric(
            "sozud_opensvc_request_seconds_total",
            "counter",
            "Time spent waiting for the OpenSVC agent's answers, by operation (get, put, list, daemon_status).",
        )
        self.agent_requests = Metric(
            "sozud_opensvc_requests_total", "counter", "Requests the OpenSVC agent answered, by operation."
        )
        self.wakes = Metric(
            "sozud_opensvc_monitor_wakes_total",
            "counter",
            "Calls asking the OpenSVC v2 agent to replicate the shared state now (wake_monitor), by outcome.",
        )

    def all(self) -> list[Metric]:
        return [
            self.syncs,
            self.steps,
            self.incremental_disagreements,
            self.sync_failures,
            self.conflicts,
            self.requests,
            self.pushes,
            self.drift,
            self.last_success,
            self.reconnects,
            self.generation,
            self.sync_duration,
            self.wakes,
            self.agent_seconds,
            self.agent_requests,
        ]

    def render(self) -> str:
        return "\n".join(m.render() for m in self.all()) + "\n"

    def write_textfile(self, path: str) -> None:
        atomic_write(Path(path), self.render().encode(), mode=0o644)


class MetricsServer:
    """A minimal HTTP/1.1 server answering ``GET /metrics`` (anything else: 404)."""

    def __init__(self, metrics: Metrics, address: str) -> None:
        self.metrics = metrics
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5.0)
            while True:  # drain headers (bounded by the timeout and the stream limit)
                line = await asyncio.wait_for(reader.readline(), timeout=5.0)
                if line in (b"\r\n", b"\n", b""):
                    break
            parts = request_line.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body = self.metrics.render().encode()
                status = "200 OK"
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found\n", "404 Not Found", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
