"""``sozud query`` against the sozu simulator loaded with a captured state, checked against the captures."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import FIXTURES

from sozud.cli.query import register, run_query
from sozud.testing.fake_sozu import FakeSozu


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    """Log events (the simulator's, the channel's) are captured, so stdout holds the answer only."""
    with structlog.testing.capture_logs():
        yield


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sz"))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sozud")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["query", *argv])


def _exchange(version: str, name: str) -> dict[str, Any]:
    index = json.loads((FIXTURES / f"sozu-{version}" / "index.json").read_text())
    (ex,) = [e for e in index["exchanges"] if e["name"] == name]
    return dict(ex)


def _populated(version: str) -> str:
    return str(FIXTURES / f"sozu-{version}" / "states" / "01-populated.state")


def _private_key_lines() -> set[str]:
    """Base64 lines of the test keys, minus those also in a certificate (an EC key embeds its public key)."""
    lines: set[str] = set()
    for key in (FIXTURES / "certs").glob("*.key"):
        lines |= {ln for ln in key.read_text().splitlines() if ln and not ln.startswith("-----")}
    public = "".join(p.read_text() for p in (FIXTURES / "certs").glob("*.pem"))
    secret = {ln for ln in lines if ln not in public}
    assert len(secret) > 50  # still something to look for
    return secret


async def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = await run_query(_args(*argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("version", ["1.1.1", "2.1.0"])
async def test_certificates_json_matches_capture_without_keys(
    sock_dir: Path, capsys: pytest.CaptureFixture[str], version: str
) -> None:
    path = str(sock_dir / "s")
    async with FakeSozu(path, version, saved_state=_populated(version)):
        rc, out, err = await _run(capsys, "certificates", "--json", "--socket", path)
    assert (rc, err) == (0, "")
    doc = json.loads(out)
    assert doc["socket"] == path and doc["sozu_version"] == version
    certs = doc["certificates"]["certs"]
    captured = _exchange(version, "certificate-list")["responses"][-1]["content"]["certificates_with_fingerprints"]
    assert sorted(certs) == sorted(captured["certs"])
    for fp, cert in certs.items():
        assert cert["key"] == "<redacted>"
        assert sorted(cert["names"]) == sorted(captured["certs"][fp]["names"])
        assert cert["certificate"] == captured["certs"][fp]["certificate"]
    assert not any(line in out for line in _private_key_lines())
    assert "PRIVATE KEY" not in out


async def test_certificates_table(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(sock_dir / "s")
    async with FakeSozu(path, "2.1.0", saved_state=_populated("2.1.0")):
        rc, out, _ = await _run(capsys, "certificates", "--socket", path)
    assert rc == 0
    fingerprints = dict(ln.split() for ln in (FIXTURES / "certs" / "fingerprints.txt").read_text().splitlines())
    assert fingerprints["example.test-v2"] in out and fingerprints["api.example.test"] in out
    assert "2036-11-21" in out  # expiry read from the certificate
    assert "PRIVATE KEY" not in out and not any(line in out for line in _private_key_lines())


@pytest.mark.parametrize("version", ["0.15.19", "1.1.1", "2.1.0"])
async def test_clusters_lists_configuration_frontends_backends(
    sock_dir: Path, capsys: pytest.CaptureFixture[str], version: str
) -> None:
    path = str(sock_dir / "s")
    async with FakeSozu(path, version, saved_state=_populated(version)):
        rc, out, err = await _run(capsys, "clusters", "--json", "--socket", path)
        assert (rc, err) == (0, "")
        doc = json.loads(out)
        rc, table_out, _ = await _run(capsys, "clusters", "--socket", path)
    assert rc == 0
    ids = [c["cluster_id"] for c in doc["clusters"]]
    assert ids == ["app1", "app2", "app3", "app4", "app5", "tcp1"]
    app1 = doc["clusters"][0]
    if version == "0.15.19":
        capture = _exchange(version, "cluster-list-id-app1")["responses"][-1]["decoded"]["content"]
        expected = capture["content_type"]["WORKER_RESPONSES"]["map"]["main"]["content_type"]["CLUSTERS"]["vec"][0]
        backends = sorted(b["backend_id"] for b in expected["backends"])
    else:
        capture = _exchange(version, "cluster-list-id-app1")["responses"][-1]["content"]
        expected = capture["worker_responses"]["map"]["main"]["clusters"]["vec"][0]
        assert app1["configuration"] == expected["configuration"]
        backends = sorted(b["backend_id"] for b in expected["backends"])
    assert sorted(b["backend_id"] for b in app1["backends"]) == backends == ["app1-b0", "app1-b1", "app1-b2"]
    assert len(app1["http_frontends"]) == len(expected["http_frontends"])
    for word in ("cluster app1", "app1-b1", "sticky-b1", "cluster tcp1", "example.test"):
        assert word in table_out


@pytest.mark.parametrize("what", ["listeners", "frontends", "status"])
async def test_other_queries_table_and_json(sock_dir: Path, capsys: pytest.CaptureFixture[str], what: str) -> None:
    path = str(sock_dir / "s")
    async with FakeSozu(path, "2.1.0", saved_state=_populated("2.1.0")):
        rc, out, err = await _run(capsys, what, "--socket", path, "--sozu-version", "2.1.0")
        assert (rc, err) == (0, "")
        rc, jout, _ = await _run(capsys, what, "--json", "--socket", path)
        assert rc == 0
    doc = json.loads(jout)[what]
    if what == "listeners":
        assert "127.0.0.1:21080" in out and "127.0.0.1:21443" in out
        assert sorted(doc["https_listeners"]) == ["127.0.0.1:21443"]
    elif what == "frontends":
        captured = _exchange("2.1.0", "frontend-list")["responses"][-1]["content"]["frontend_list"]
        assert len(doc["http_frontends"]) == len(captured["http_frontends"])
        assert "(deny)" in out and "equals:/health" in out
    else:
        assert [w["run_state"] for w in doc["vec"]] == ["RUNNING", "RUNNING"]
        assert "RUNNING" in out


async def test_error_is_one_line_naming_the_socket(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(sock_dir / "absent.sock")
    rc, out, err = await _run(capsys, "listeners", "--socket", path)
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert path in err and "listeners" in err


async def test_bad_version_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await _run(capsys, "status", "--socket", "/nonexistent", "--sozu-version", "7")
    assert rc == 1 and out == "" and len(err.strip().splitlines()) == 1 and "'7'" in err
