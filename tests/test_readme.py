"""The README's configuration reference is generated from sozud.config and must not drift from it."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from config_table import config_table  # noqa: E402

from sozud.config import FIELD_HELP, PLACES, SETTINGS, Config, Deprecation, load_config  # noqa: E402


def test_readme_configuration_table_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    assert config_table() in readme, "README configuration table is stale: run scripts/config_table.py"


def test_every_setting_has_help_and_every_key_a_setting() -> None:
    assert set(FIELD_HELP) == set(SETTINGS)
    sections = {"sozu", "opensvc", "sync"}
    top = {name for name in Config.__struct_fields__ if name not in sections}
    assert {p for p in PLACES if "." not in p} == top


def test_the_readme_example_configuration_loads_without_deprecation(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Configuration") :]
    example = re.search(r"\n\n((?:    .*\n|\n)+?)\n[A-Z]", section)
    assert example is not None, "no indented example in the README's Configuration section"
    text = "\n".join(line.removeprefix("    ") for line in example.group(1).splitlines())
    assert tomllib.loads(text)["sozu"], "the example is not the sectioned configuration"
    f = tmp_path / "sozud.toml"
    f.write_text(text)
    found: list[Deprecation] = []
    config = load_config(str(f), environ={}, deprecations=found)
    assert found == [] and config.opensvc.object == "igw/sec/sozu"
