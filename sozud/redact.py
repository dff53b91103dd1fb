"""Keeping secrets out of logs, errors and plan output.

Private keys travel in clear in sozu's replies and state files (certificates' ``key``, HTTPS
listeners' ``key``). Anything sozud prints or logs goes through these helpers first.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"

# PEM private keys of any flavour (PRIVATE KEY, RSA PRIVATE KEY, EC PRIVATE KEY, ENCRYPTED PRIVATE KEY),
# in raw text or inside JSON strings where newlines are escaped.
_PEM_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----",
    re.DOTALL,
)
# A PEM key cut short (truncated logs, partial frames): redact to the end of the string.
_PEM_KEY_OPEN = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*", re.DOTALL)

SECRET_FIELD_NAMES = frozenset({"key", "private_key", "secret", "password", "token", "o-secret"})


def redact_text(text: str) -> str:
    """Replace every PEM private key block in ``text``."""
    text = _PEM_KEY.sub(REDACTED, text)
    return _PEM_KEY_OPEN.sub(REDACTED, text)


def redact_obj(value: Any) -> Any:
    """A copy of a JSON-like value with secret fields and PEM keys replaced."""
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            if isinstance(k, str) and k.lower() in SECRET_FIELD_NAMES and v not in (None, "", [], {}):
                out[k] = REDACTED
            else:
                out[k] = redact_obj(v)
        return out
    if isinstance(value, list | tuple):
        return [redact_obj(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
