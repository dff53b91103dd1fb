"""Object store of the OpenSVC simulator: paths, object files, v2 value quirks, checksums.

Pure data and functions, no I/O and no asyncio: the cluster/agent classes in
``sozud.testing.fake_opensvc`` own the timing (replication, projection, events).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field

ETC_DIR = "/etc/opensvc"
DATA_KINDS = frozenset({"cfg", "sec", "usr"})
KNOWN_KINDS = frozenset({"cfg", "sec", "usr", "svc", "vol", "nscfg", "ccfg"})
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A v2 reference: `{word}`; `{"name":"x"}` is not one (a quote follows the brace).
_REFERENCE = re.compile(r"\{([A-Za-z0-9_.#-]+)\}")
_ARITHMETIC = re.compile(r"\$\(([^()$]*)\)")
_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")


@dataclass(frozen=True)
class ObjectPath:
    """``<namespace>/<kind>/<name>``."""

    namespace: str
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.kind}/{self.name}"

    @property
    def conf_file(self) -> str:
        """Where the real agent keeps the object's INI file (used in error texts)."""
        return f"{ETC_DIR}/namespaces/{self.namespace}/{self.kind}/{self.name}.conf"


def parse_path(text: str) -> ObjectPath | None:
    """The path, or None when it is malformed (the agent then answers 500 with the path as error)."""
    parts = text.split("/")
    if len(parts) != 3 or not all(_PART.match(p) for p in parts) or parts[1] not in KNOWN_KINDS:
        return None
    return ObjectPath(parts[0], parts[1], parts[2])


@dataclass
class ObjectState:
    """One node's copy of one object file.

    ``keys`` keeps insertion order, which is the file order ``object_keys`` reports. ``version`` is a
    cluster-wide write sequence number: a peer installs a replicated copy only when it is newer (the
    real agent compares mtimes). ``updated`` is the writer's time, kept on peers like the file mtime.
    """

    kind: str
    keys: dict[str, bytes] = field(default_factory=dict)
    version: int = 0
    updated: float = 0.0

    def copy(self) -> ObjectState:
        return ObjectState(self.kind, dict(self.keys), self.version, self.updated)

    def corrupt_key(self) -> str | None:
        """The first key whose stored line breaks the INI file (a ``\\r`` without ``\\n``), if any."""
        for key, value in self.keys.items():
            if b"\r" in value and b"\n" not in value:
                return key
        return None

    def parse_error(self, path: ObjectPath) -> str | None:
        """The v2 "error parsing" text when the file no longer parses, else None."""
        bad = self.corrupt_key()
        if bad is None:
            return None
        # [DEFAULT], id, blank, [data], then one line per key; the text after \r is a line of its own.
        lineno = 6 + list(self.keys).index(bad)
        tail = self.keys[bad].split(b"\r", 1)[1].decode("utf-8", errors="replace")
        return (
            f"error parsing {path.conf_file}: Source contains parsing errors: "
            f"'{path.conf_file}'\n\t[line {lineno:2d}]: {tail + chr(10)!r}"
        )


def render_conf(path: ObjectPath, obj: ObjectState) -> bytes:
    """An INI rendering of the object file as v2 writes it (literal/base64 lines); its MD5 is the csum."""
    lines = ["[DEFAULT]", f"id = {hashlib.md5(str(path).encode()).hexdigest()}", "", "[data]"]
    out = "\n".join(lines).encode() + b"\n"
    for key, value in obj.keys.items():
        if obj.kind == "cfg" and b"\n" not in value:
            out += key.encode() + b" = literal:" + value + b"\n"
        else:
            prefix = b"crypt:" if obj.kind != "cfg" else b"base64:"
            out += key.encode() + b" = " + prefix + base64.urlsafe_b64encode(value) + b"\n"
    return out


def csum(path: ObjectPath, obj: ObjectState) -> str:
    """MD5 hex of the rendered object file, like the monitor's ``csum``."""
    return hashlib.md5(render_conf(path, obj)).hexdigest()


def eval_arithmetic(expr: str) -> int | None:
    """Integer ``+ - *`` with precedence and unary minus; None when ``expr`` is anything else."""
    tokens: list[str] = []
    pos = 0
    expr = expr.strip()
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            return None
        pos = match.end()
        token = match.group(1) or match.group(2)
        if token is None:
            break
        if token.strip() == "":
            continue
        tokens.append(token)
    index = 0

    def peek() -> str | None:
        return tokens[index] if index < len(tokens) else None

    def atom() -> int | None:
        nonlocal index
        token = peek()
        if token is None:
            return None
        index += 1
        if token == "-":
            inner = atom()
            return None if inner is None else -inner
        if token.isdigit() and len(token) <= 30:
            return int(token)
        return None

    def term() -> int | None:
        nonlocal index
        value = atom()
        while value is not None and peek() == "*":
            index += 1
            right = atom()
            if right is None or abs(value) > 10**30 or abs(right) > 10**30:
                return None
            value *= right
        return value

    def sum_() -> int | None:
        nonlocal index
        value = term()
        while value is not None and peek() in ("+", "-"):
            op = peek()
            index += 1
            right = term()
            if right is None:
                return None
            value = value + right if op == "+" else value - right
        return value

    if not tokens:
        return None
    result = sum_()
    if index != len(tokens):
        return None
    return result


def v2_decoded_text(raw: bytes, *, path: ObjectPath, nodename: str, clustername: str) -> str:
    """What v2 ``GET /key`` returns for a stored value.

    Invalid UTF-8 bytes are dropped. A single-line value (stored ``literal:``) is evaluated like a
    configuration value: known ``{references}`` expanded, then ``$(integer arithmetic)`` computed.
    """
    text = raw.decode("utf-8", errors="ignore")
    if "\n" in text:
        return text
    references = {
        "name": path.name,
        "nodename": nodename,
        "namespace": path.namespace,
        "kind": path.kind,
        "clustername": clustername,
    }
    text = _REFERENCE.sub(lambda m: references.get(m.group(1), m.group(0)), text)

    def arithmetic(match: re.Match[str]) -> str:
        value = eval_arithmetic(match.group(1))
        return match.group(0) if value is None else str(value)

    return _ARITHMETIC.sub(arithmetic, text)
