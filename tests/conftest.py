"""Shared test settings: where the real-sozu fixtures are (``shared/fixtures`` beside the repository)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("SOZUD_FIXTURES", ROOT.parent / "shared" / "fixtures"))

if not (FIXTURES / "README.md").exists():  # pragma: no cover - a broken checkout, not a test result
    raise pytest.UsageError(
        f"the real-sozu fixtures are missing: expected them in {FIXTURES} (set SOZUD_FIXTURES to override)"
    )


@pytest.fixture(autouse=True)
def _quiet_logging() -> None:
    """structlog's configuration is global: every test starts from the same one (everything logged,
    JSON on the current stderr, which pytest captures); tests of one-shot commands set what main() sets."""
    from sozud.log import configure_logging

    configure_logging("debug", json=True)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


def log_events(err: str) -> list[dict[str, Any]]:
    """The JSON log events in captured stderr (other lines ignored)."""
    out = []
    for line in err.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and "event" in event:
                out.append(event)
    return out
