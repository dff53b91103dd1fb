"""The README's configuration reference is generated from sozud.config and must not drift from it."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from config_table import config_table  # noqa: E402

from sozud.config import FIELD_HELP, Config  # noqa: E402


def test_readme_configuration_table_matches_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    assert config_table() in readme, "README configuration table is stale: run scripts/config_table.py"


def test_every_setting_has_help() -> None:
    assert set(FIELD_HELP) == set(Config.__struct_fields__)
