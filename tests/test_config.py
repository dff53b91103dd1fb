"""Configuration: precedence, validation errors that name the key and its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from sozud.config import Config, load_config
from sozud.errors import ConfigError


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "sozud.toml"
    f.write_text('socket = "/from/file.sock"\npoll_interval_s = 7.5\nkey = "k.json"\n')
    c = load_config(str(f), environ={"SOZUD_POLL_INTERVAL_S": "3"}, overrides={"socket": "/from/flag.sock"})
    assert (c.socket, c.poll_interval_s, c.key, c.meta_key) == ("/from/flag.sock", 3.0, "k.json", "k.json.meta")
    assert c.object == Config().object


def test_env_booleans_and_numbers() -> None:
    c = load_config(environ={"SOZUD_FORCE": "true", "SOZUD_MAX_ROUNDS": "5"})
    assert c.force is True and c.max_rounds == 5


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        ({"SOZUD_POLL_INTERVAL_S": "soon"}, "'poll_interval_s' (from environment variable SOZUD_POLL_INTERVAL_S)"),
        ({"SOZUD_MAX_REMOVAL_RATIO": "1.5"}, "'max_removal_ratio'"),
        ({"SOZUD_OBJECT": "igw/svc/sozu"}, "'object'"),
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
    with pytest.raises(ConfigError, match=r"'debounce_ms' \(from configuration file .*t.toml\)"):
        load_config(str(wrong_type), environ={})
