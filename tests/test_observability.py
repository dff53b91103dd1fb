"""Metrics exposition, sd_notify datagrams, atomic persistence and the status command."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from sozud.main import format_status, main
from sozud.metrics import Metrics, MetricsServer
from sozud.persist import Status, StatusFile, atomic_write
from sozud.sdnotify import Notifier


def test_metrics_text_format() -> None:
    m = Metrics()
    m.requests.inc(3, type="add_backend")
    m.requests.inc(type="remove_cluster")
    m.drift.set(2)
    text = m.render()
    assert "# TYPE sozud_sozu_requests_total counter" in text
    assert 'sozud_sozu_requests_total{type="add_backend"} 3' in text
    assert 'sozud_sozu_requests_total{type="remove_cluster"} 1' in text
    assert "sozud_drift_objects 2" in text
    assert "sozud_conflicts_total 0" in text


async def test_metrics_server_serves_and_404s() -> None:
    m = Metrics()
    m.reconnects.inc()
    server = MetricsServer(m, "127.0.0.1:0")
    await server.start()
    try:

        async def get(path: str) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = await reader.read()
            writer.close()
            return data

        ok = await get("/metrics")
        assert ok.startswith(b"HTTP/1.1 200") and b"sozud_sozu_reconnects_total 1" in ok
        assert (await get("/other")).startswith(b"HTTP/1.1 404")
    finally:
        await server.stop()


def test_sd_notify_sends_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
        assert n.enabled and n.watchdog_interval_s == 2.0
        assert n.ready("up")
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
        assert n.watchdog()
        assert sock.recv(100) == b"WATCHDOG=1"
    off = Notifier({})
    assert not off.enabled and not off.ready() and off.watchdog_interval_s is None


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "d" / "f"
    atomic_write(target, b"one")
    inode = target.stat().st_ino
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert target.stat().st_ino != inode, "written aside and renamed, never in place"
    assert [p.name for p in target.parent.iterdir()] == ["f"], "no temporary file left behind"


def test_status_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--state-dir", str(tmp_path)]) == 1
    assert "no status yet" in capsys.readouterr().err
    StatusFile(tmp_path).write(
        Status(
            node="n1",
            last_outcome="applied",
            drift=0,
            base_generation=7,
            shared_generation=7,
            shared_origin="n2",
            requests_total={"add_backend": 2},
            last_error=None,
        )
    )
    assert main(["status", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "base generation" in out and "written by n2" in out and "add_backend=2" in out
    assert main(["status", "--state-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["base_generation"] == 7
    assert "0 object(s)" in format_status(Status(drift=0))


def test_help_tells_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in (
        "--socket",
        "--api",
        "--object",
        "--key",
        "--node",
        "--state-dir",
        "--poll-interval-s",
        "--max-removal-ratio",
        "--force",
        "--config",
    ):
        assert flag in out
    assert "default: igw/cfg/sozu" in out and "default: state.json" in out


def test_bad_setting_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--once", "--max-removal-ratio", "7"]) == 2
    assert "max_removal_ratio" in capsys.readouterr().err


def test_logs_redact_private_keys_even_from_early_loggers(capsys: pytest.CaptureFixture[str]) -> None:
    from sozud.log import configure_logging, get_logger

    early = get_logger(component="early")  # created before configuration, like module-level loggers
    configure_logging("info", json=True)
    pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkq\n-----END PRIVATE KEY-----"
    early.info("test.event", key=pem, detail=f"certificate and {pem} inline", path="/x")
    err = capsys.readouterr().err
    record = json.loads(err.strip().splitlines()[-1])
    assert record["event"] == "test.event" and record["path"] == "/x"
    assert "MIIEvQIBADANBgkq" not in err and "PRIVATE KEY" not in err
