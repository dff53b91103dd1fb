"""Configuration: precedence, validation errors that name the key and its source."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import log_events

from sozud.config import Config, Deprecation, load_config
from sozud.errors import ConfigError


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "sozud.toml"
    f.write_text('socket = "/from/file.sock"\npoll_interval_s = 7.5\nkey = "k.json"\n')
    c = load_config(str(f), environ={"SOZUD_POLL_INTERVAL_S": "3"}, overrides={"socket": "/from/flag.sock"})
    got = (c.sozu.socket, c.sync.poll_interval_s, c.opensvc.key, c.opensvc.meta_key)
    assert got == ("/from/flag.sock", 3.0, "k.json", "k.json.meta")
    assert c.opensvc.object == Config().opensvc.object


def test_env_booleans_and_numbers() -> None:
    c = load_config(environ={"SOZUD_FORCE": "true", "SOZUD_MAX_ROUNDS": "5"})
    assert c.sync.force is True and c.sync.max_rounds == 5


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        ({"SOZUD_POLL_INTERVAL_S": "soon"}, "'sync.poll_interval_s' (from environment variable SOZUD_POLL_INTERVAL_S)"),
        ({"SOZUD_MAX_REMOVAL_RATIO": "1.5"}, "'sync.max_removal_ratio'"),
        ({"SOZUD_OBJECT": "igw/svc/sozu"}, "'opensvc.object'"),
        ({"SOZUD_METRICS_ADDRESS": "nowhere"}, "'metrics_address'"),
        ({"SOZUD_LOG_LEVEL": "loud"}, "'log_level'"),
    ],
)
def test_bad_values_name_the_key(environ: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ=environ)
    assert needle in str(info.value)


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "sozud.toml"
    f.write_text("sokcet = '/x'\n")
    with pytest.raises(ConfigError, match=r"sozud\.toml: unknown key 'sokcet'"):
        load_config(str(f), environ={})


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"), environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("socket = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(str(bad), environ={})
    wrong_type = tmp_path / "t.toml"
    wrong_type.write_text("debounce_ms = 'x'\n")
    with pytest.raises(
        ConfigError, match=r"'sync.debounce_ms' \(from configuration file .*t.toml, old flat key 'debounce_ms'\)"
    ):
        load_config(str(wrong_type), environ={})


# --- issue 12: configurations that were accepted and should not be -------------------------------------


def _run_once(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    from sozud.main import main

    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ('metrics_address = "127.0.0.1:99999"\n', ["'metrics_address'", "configuration file"]),
        ("request_timeout_s = inf\n", ["'sozu.request_timeout_s'", "configuration file", "range"]),
        ("[sozu]\nrequest_timeout_s = inf\n", ["'sozu.request_timeout_s'", "configuration file", "range"]),
        ("poll_interval_s = nan\n", ["'sync.poll_interval_s'", "configuration file", "old flat key 'poll_interval_s'"]),
        ("opensvc_poll_interval_s = 1e-300\n", ["'opensvc.poll_interval_s'", "range", "'opensvc_poll_interval_s'"]),
        ("[opensvc]\npoll_interval_s = 1e-300\n", ["'opensvc.poll_interval_s'", "range"]),
        ("resync_interval_s = -inf\n", ["'sync.resync_interval_s'"]),
        ('key = ""\n', ["'opensvc.key'", "configuration file", "not a key name"]),
        ('key = "../x"\nmeta_key = "m"\n', ["'opensvc.key'"]),
        ('[opensvc]\nobject = "igw/cfg/"\n', ["'opensvc.object'"]),
    ],
)
def test_bad_values_in_a_file_exit_2_naming_the_key_and_the_file(
    tmp_path: Path,
    toml: str,
    needles: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    f = tmp_path / "sozud.toml"
    f.write_text(toml)
    rc, err = _run_once(["--once", "--config", str(f), "--state-dir", str(tmp_path / "st")], capsys, monkeypatch)
    assert rc == 2, err
    for needle in needles:
        assert needle in err
    assert str(f) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_non_utf8_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "sozud.toml"
    f.write_bytes(b'socket = "/run/\xff\xfe.sock"\n')
    rc, err = _run_once(["--once", "--config", str(f)], capsys, monkeypatch)
    assert rc == 2 and "not UTF-8" in err and str(f) in err and "Traceback" not in err


def test_a_config_that_is_not_a_regular_file_is_not_read(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SOZUD_CONFIG=/dev/zero read 6.3 GB in 6 s."""
    monkeypatch.setenv("SOZUD_CONFIG", "/dev/zero")
    rc, err = _run_once(["--once"], capsys, monkeypatch)
    assert rc == 2 and "/dev/zero is not a regular file" in err


def test_a_huge_config_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "sozud.toml"
    f.write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(str(f), environ={})


def test_an_env_value_out_of_range_names_the_variable() -> None:
    with pytest.raises(
        ConfigError, match=r"'sync.poll_interval_s'.*range.*\(from environment variable SOZUD_POLL_INTERVAL_S\)"
    ):
        load_config(environ={"SOZUD_POLL_INTERVAL_S": "1e-300"})


def test_an_unwritable_state_dir_fails_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, err = _run_once(["--once", "--state-dir", str(blocker / "state")], capsys, monkeypatch)
    assert rc == 2 and "'sync.state_dir'" in err and str(blocker) in err


def test_a_misspelled_sozud_variable_is_reported() -> None:
    from sozud.config import unknown_env_names

    env = {"SOZUD_POLL_INTERVAL": "5", "SOZUD_POLL_INTERVAL_S": "5", "SOZUD_CONFIG": "/x", "OTHER": "1"}
    assert unknown_env_names(env) == ["SOZUD_POLL_INTERVAL"]


# --- issue 9: one poll-interval default; the OpenSVC client's knobs are settings ------------------------


def test_the_opensvc_poll_interval_default_is_the_same_for_the_daemon_and_sozud_key(tmp_path: Path) -> None:
    import argparse

    from sozud.cli.key import _settings, add_arguments
    from sozud.daemon import om_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    key_settings = _settings(parser.parse_args(["list", "igw/cfg/sozu"]))
    empty = tmp_path / "sozud.toml"
    empty.write_text("")
    daemon_settings = om_settings(load_config(str(empty), environ={}))
    assert key_settings.poll_interval_s == daemon_settings.poll_interval_s


OM_KNOBS = {
    "run_dir": ("/srv/agent", "SOZUD_RUN_DIR", "/env/agent"),
    "cluster_conf_file": ("/srv/cluster.conf", "SOZUD_CLUSTER_CONF_FILE", "/env/cluster.conf"),
    "events_max_idle_s": (120.0, "SOZUD_EVENTS_MAX_IDLE_S", "60"),
    "retry_attempts": (5, "SOZUD_RETRY_ATTEMPTS", "2"),
    "reconnect_max_s": (12.5, "SOZUD_RECONNECT_MAX_S", "7"),
}


def test_the_opensvc_client_knobs_are_settings(tmp_path: Path) -> None:
    from sozud.daemon import om_settings

    f = tmp_path / "sozud.toml"
    lines = [f"{name} = {value!r}\n".replace("'", '"') for name, (value, _, _) in OM_KNOBS.items()]
    f.write_text("[opensvc]\n" + "".join(lines))
    settings = om_settings(load_config(str(f), environ={}))
    assert {name: getattr(settings, name) for name in OM_KNOBS} == {n: v for n, (v, _, _) in OM_KNOBS.items()}
    environ = {env: value for _, env, value in OM_KNOBS.values()}
    settings = om_settings(load_config(str(f), environ=environ))
    assert (settings.run_dir, settings.cluster_conf_file) == ("/env/agent", "/env/cluster.conf")
    assert (settings.events_max_idle_s, settings.retry_attempts, settings.reconnect_max_s) == (60.0, 2, 7.0)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SOZUD_RETRY_ATTEMPTS", "0"),
        ("SOZUD_EVENTS_MAX_IDLE_S", "inf"),
        ("SOZUD_EVENTS_MAX_IDLE_S", "0"),
        ("SOZUD_RECONNECT_MAX_S", "nan"),
        ("SOZUD_RECONNECT_MAX_S", "-1"),
    ],
)
def test_the_opensvc_client_knobs_are_range_checked(variable: str, value: str) -> None:
    key = "opensvc." + variable.removeprefix("SOZUD_").lower()
    with pytest.raises(ConfigError, match=rf"'{key}'.*range.*\(from environment variable {variable}\)"):
        load_config(environ={variable: value})


# --- issue 9: sections, the old flat keys -------------------------------------------------------------------


def test_sections_load_and_the_opensvc_section_is_the_client_settings(tmp_path: Path) -> None:
    from sozud.daemon import om_settings
    from sozud.om_api import OMSettings

    f = tmp_path / "sozud.toml"
    f.write_text(
        'node = "n1"\nlog_level = "debug"\n'
        '[sozu]\nsocket = "/s.sock"\nversion = "2.1.0"\n'
        '[opensvc]\nobject = "igw/sec/sozu"\npoll_interval_s = 7.0\nrun_dir = "/agent"\n'
        "[sync]\npoll_interval_s = 2.0\nmax_rounds = 4\n"
    )
    found: list[Deprecation] = []
    c = load_config(str(f), environ={}, deprecations=found)
    assert found == []
    assert (c.node, c.log_level, c.sozu.socket, c.sozu.version) == ("n1", "debug", "/s.sock", "2.1.0")
    assert (c.opensvc.object, c.opensvc.poll_interval_s, c.sync.poll_interval_s, c.sync.max_rounds) == (
        "igw/sec/sozu",
        7.0,
        2.0,
        4,
    )
    settings = om_settings(c)
    assert isinstance(c.opensvc, OMSettings) and isinstance(settings, OMSettings)
    assert (settings.poll_interval_s, settings.run_dir, settings.nodename) == (7.0, "/agent", "n1")


def test_a_flat_key_still_loads_with_a_warning_naming_its_new_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sozud.main import _prepare, build_parser

    f = tmp_path / "sozud.toml"
    f.write_text('opensvc_poll_interval_s = 9.0\nsozu_version = "1.1.1"\n[sync]\nmax_rounds = 2\n')
    args = build_parser().parse_args(["--config", str(f), "--state-dir", str(tmp_path / "st")])
    c = _prepare(args)
    assert (c.opensvc.poll_interval_s, c.sozu.version, c.sync.max_rounds) == (9.0, "1.1.1", 2)
    warned = {e["old_key"]: e for e in log_events(capsys.readouterr().err) if e["event"] == "config.deprecated_key"}
    assert set(warned) == {"opensvc_poll_interval_s", "sozu_version"}
    assert warned["opensvc_poll_interval_s"]["new_key"] == "opensvc.poll_interval_s"
    assert warned["sozu_version"]["new_key"] == "sozu.version"
    assert warned["sozu_version"]["level"] == "warning" and warned["sozu_version"]["file"] == str(f)


def test_a_setting_given_both_ways_is_an_error_naming_both(tmp_path: Path) -> None:
    f = tmp_path / "sozud.toml"
    f.write_text("poll_interval_s = 1.0\n[sync]\npoll_interval_s = 2.0\n")
    with pytest.raises(ConfigError, match=r"'poll_interval_s' \(the old flat key\) and 'sync.poll_interval_s'"):
        load_config(str(f), environ={})
    f.write_text("request_timeout_s = 1.0\n[opensvc]\nrequest_timeout_s = 2.0\n")
    with pytest.raises(ConfigError, match=r"'request_timeout_s' \(the old flat key\) and 'opensvc.request_timeout_s'"):
        load_config(str(f), environ={})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[sync]\nsokcet = 1\n", r"unknown key 'sokcet' in \[sync\]"),
        ("[sozu]\nsozu_version = '2.1.0'\n", r"unknown key 'sozu_version' in \[sozu\]"),
        ("[opensvc]\npassword = 'x'\n", r"unknown key 'password' in \[opensvc\]"),
        ("[opensvc]\nnodename = 'x'\n", r"unknown key 'nodename' in \[opensvc\]"),
        ("sync = 3\n", r"\[sync\] must be a table"),
    ],
)
def test_bad_section_keys_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    f = tmp_path / "sozud.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(str(f), environ={})


def test_environment_variables_and_flags_keep_their_names() -> None:
    c = load_config(
        environ={"SOZUD_OPENSVC_POLL_INTERVAL_S": "4", "SOZUD_SOZU_VERSION": "0.15", "SOZUD_REQUEST_TIMEOUT_S": "3"},
        overrides={"poll_interval_s": 0.5, "object": "ns/sec/x"},
    )
    assert (c.opensvc.poll_interval_s, c.sozu.version, c.sync.poll_interval_s) == (4.0, "0.15", 0.5)
    assert (c.sozu.request_timeout_s, c.opensvc.request_timeout_s, c.opensvc.object) == (3.0, 3.0, "ns/sec/x")


async def test_the_incremental_setting_reaches_the_engine_and_the_adapter_also_on_a_reload(tmp_path: Path) -> None:
    from sozud.components import build_components
    from sozud.config import config_from_settings

    base = {
        "socket": str(tmp_path / "s.sock"),
        "sozu_version": "2.1.0",
        "api": f"unix://{tmp_path}/lsnr.sock",
        "node": "a",
        "state_dir": str(tmp_path / "state"),
    }
    first = build_components(config_from_settings(base))
    assert first.engine.settings.incremental and first.sozu.keep_read_after_apply  # the default
    reloaded = build_components(config_from_settings({**base, "incremental": False}), reuse=first)
    assert reloaded.sozu is first.sozu and reloaded.engine is first.engine  # kept across the reload
    assert not reloaded.engine.settings.incremental and not reloaded.sozu.keep_read_after_apply
