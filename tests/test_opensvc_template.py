"""The OpenSVC template (opensvc/sozu.conf) and sozu configuration (opensvc/sozu-config.toml): they parse,
every resource id, keyword and reference resolves (as far as the simulators allow: the v2 keywords below
are the ones the agent's drivers define for what the template uses), sozud accepts the app's commands,
and the template keeps the published deployment's ids and names (issue 14)."""

from __future__ import annotations

import configparser
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from sozud.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
OURS = ROOT / "opensvc" / "sozu.conf"
PUBLISHED = ROOT.parent / "shared" / "reference" / "opensvc-templates-sozu" / "sozu.conf"
SOZU_CONFIG = ROOT / "opensvc" / "sozu-config.toml"

# The keywords of the v2 drivers this template uses (opensvc/drivers/resource/*, core/objects/svc.py).
KEYWORDS = {
    "DEFAULT": {"orchestrate", "topology", "nodes", "flex_min", "flex_max", "flex_target"},
    "fs": {"type", "mnt", "dev"},
    "volume": {"type", "directories", "configs", "secrets", "name", "perm", "dirperm", "size", "signal"},
    "container": {"type", "image", "rm", "netns", "volume_mounts", "run_args", "restart", "command"}
    | {"blocking_pre_provision"},
    "app": {"type", "start", "stop", "check", "info", "status_log", "retcodes", "restart", "environment"},
    "sync": {"disable"},
}
REFERENCES = {"name", "namespace", "nodename", "clusternodes", "#nodes", "env.sozuimg"}
DROPPED = {"volume#scripts": "watch_directory.sh", "task#stateload": "sozu state load", "app#watch": "watch script"}


def _parse(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(delimiters=("=",), comment_prefixes=("#",), inline_comment_prefixes=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def _resources(parser: configparser.RawConfigParser) -> list[str]:
    return [s for s in parser.sections() if s != "env"]


def test_every_resource_and_keyword_is_known() -> None:
    t = _parse(OURS)
    for key in t.defaults():
        assert key in KEYWORDS["DEFAULT"], f"[DEFAULT] {key}"
    for rid in _resources(t):
        driver, sep, name = rid.partition("#")
        assert sep and name and driver in KEYWORDS, f"resource id {rid!r}"
        for key in t[rid]:
            if key in t.defaults():
                continue
            assert key in KEYWORDS[driver], f"[{rid}] {key} is not a {driver} keyword"


def test_every_reference_resolves() -> None:
    t = _parse(OURS)
    text = OURS.read_text()
    for ref in re.findall(r"\{([^}]+)\}", "\n".join(line for line in text.splitlines() if not line.startswith("#"))):
        assert ref in REFERENCES, f"unknown reference {{{ref}}}"
    assert t.has_option("env", "sozuimg")
    volume_names = {t[r]["name"].replace("{name}", "sozu") for r in _resources(t) if r.startswith("volume#")}
    for rid in _resources(t):
        if not rid.startswith("container#"):
            continue
        netns = t[rid].get("netns")
        assert netns in (None, "host") or t.has_section(netns), f"[{rid}] netns {netns}"
        for mount in shlex.split(t[rid].get("volume_mounts", "")):
            source = mount.split(":")[0]
            if not source.startswith("/"):
                assert source.split("/")[0].replace("{name}", "sozu") in volume_names, f"[{rid}] mount {mount}"


def test_sozud_accepts_the_app_commands() -> None:
    t = _parse(OURS)
    app = t["app#sozud"]
    values = {"{namespace}": "igw", "{name}": "sozu", "{nodename}": "n1"}
    for action in ("start", "check", "info"):
        command = app[action]
        for k, v in values.items():
            command = command.replace(k, v)
        argv = shlex.split(command)
        assert argv[0] == "/usr/local/bin/sozud"
        args = build_parser().parse_args(argv[1:])
        if action == "start":
            assert args.object == "igw/sec/sozu" and args.shared_dir == "/run/sozu"
            assert args.boot_state_file == "/run/sozu/state.json"
        else:
            assert getattr(args, action)
    assert app["retcodes"] == "0:up 1:down 2:warn" and app["status_log"] == "true"


def test_the_published_ids_and_names_are_kept() -> None:
    ours, published = _parse(OURS), _parse(PUBLISHED)
    assert dict(ours.defaults()) == dict(published.defaults())
    assert set(_resources(published)) - set(_resources(ours)) == set(DROPPED)
    assert set(_resources(ours)) - set(_resources(published)) == {"app#sozud"}
    assert ours["env"]["sozuimg"] == published["env"]["sozuimg"]
    for rid in ("container#0", "container#1"):
        for key in ("type", "image", "netns", "run_args", "rm", "restart"):
            assert ours[rid].get(key) == published[rid].get(key), f"[{rid}] {key}"
    for key in ("type", "name", "directories", "secrets", "perm", "dirperm"):
        assert ours["volume#cfg"].get(key) == published["volume#cfg"].get(key), f"[volume#cfg] {key}"
    assert "signal" not in ours["volume#cfg"]  # sozu ignores SIGHUP


@pytest.mark.parametrize("setting", ["saved_state", "automatic_state_save", "max_command_buffer_size"])
def test_the_sozu_configuration_matches_the_template(setting: str) -> None:
    config = tomllib.loads(SOZU_CONFIG.read_text())
    t = _parse(OURS)
    if setting == "saved_state":
        # sozud writes the boot file on the host's /run/sozu, which container#1 mounts at the same path
        assert config["saved_state"] == "/run/sozu/state.json"
        assert "--boot-state-file /run/sozu/state.json" in t["app#sozud"]["start"]
        assert "/run/sozu:/run/sozu" in shlex.split(t["container#1"]["volume_mounts"])
    elif setting == "automatic_state_save":
        assert config["automatic_state_save"] is False
    else:
        assert config["max_command_buffer_size"] >= 2_000_000 > 163_840
