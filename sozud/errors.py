"""Every failure sozud can raise, in one tree.

    SozudError                      base of everything sozud raises on purpose
    ├── ConfigError                 bad configuration file, environment or flag (names the key)
    ├── SozuError                   the sozu command channel
    │   ├── SozuConnectionError     cannot connect, connection lost, EOF (names the socket)
    │   ├── SozuTimeoutError        no final answer within the request timeout
    │   ├── SozuProtocolError       bad frame: oversize, short, undecodable, wrong shape
    │   ├── SozuUnsupportedError    request type unknown to the connected sozu version
    │   └── SozuRequestError        sozu answered FAILURE (carries sozu's message)
    ├── StateError                  sozu state (files, models, plans)
    │   ├── StateParseError         a state file or record that does not parse (names record, field path)
    │   ├── UnsafePlanError         a plan refused by the safety valve (needs --force)
    │   ├── ConvergenceError        live state still differs from the target after apply
    │   ├── LiveChangedError        the live sozu changed during a sync (retried; nothing was sent)
    │   └── VersionMismatchError    state of one sozu family given to another (0.15 vs 1.x/2.x)
    └── OpenSVCError                the OpenSVC agent API (names transport, object, key)
        ├── OpenSVCUnreachableError agent down, socket missing, connection refused or reset, timeout
        ├── OpenSVCAuthError        401/403, wrong cluster secret or name
        ├── OpenSVCNotFoundError    unknown object or key
        ├── OpenSVCRefusedError     the agent answered with an error status (4xx/5xx, status != 0)
        └── OpenSVCTooLargeError    value over a transport limit (HTTP/2 window, om3 max_key_size)

Messages name the thing that failed (socket path, object and key, record number and field path) and
never contain private keys, cluster secrets or tokens.
"""

from __future__ import annotations


class SozudError(Exception):
    """Base of every error sozud raises on purpose."""


class ConfigError(SozudError):
    """Invalid configuration; the message names the offending key and where it came from."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.key = key  # the setting at fault, when there is one
        super().__init__(message)


# --- sozu command channel ------------------------------------------------------------------------


class SozuError(SozudError):
    """A failure talking to sozu over its command socket."""

    def __init__(self, message: str, *, socket_path: str | None = None) -> None:
        self.socket_path = socket_path
        prefix = f"sozu at {socket_path}: " if socket_path else "sozu: "
        super().__init__(prefix + message)


class SozuConnectionError(SozuError):
    """The command socket could not be reached, or the connection was lost."""


class SozuTimeoutError(SozuError):
    """No final answer within the request timeout; the request's effect is unknown."""


class SozuProtocolError(SozuError):
    """A frame that cannot be a valid answer: oversize, short, undecodable."""


class SozuUnsupportedError(SozuError):
    """The request type is unknown to the connected sozu version (sozu would never answer it)."""


class SozuRequestError(SozuError):
    """sozu answered FAILURE; ``sozu_message`` is sozu's own text."""

    def __init__(
        self,
        sozu_message: str,
        *,
        request_kind: str,
        request_summary: str = "",
        socket_path: str | None = None,
        processing: tuple[str, ...] = (),
    ) -> None:
        self.sozu_message = sozu_message
        self.request_kind = request_kind
        self.request_summary = request_summary
        self.processing = processing
        what = f"{request_kind} {request_summary}".strip()
        super().__init__(f"{what} refused: {sozu_message}", socket_path=socket_path)


# --- state -------------------------------------------------------------------------------------


class StateError(SozudError):
    """A problem with a sozu configuration state (file, model, plan)."""


class StateParseError(StateError):
    """A state file or record that does not parse; names the source, record number and field path."""

    def __init__(
        self,
        reason: str,
        *,
        source: str = "<state>",
        record: int | None = None,
        path: str | None = None,
    ) -> None:
        self.source = source
        self.record = record
        self.path = path
        where = source
        if record is not None:
            where += f", record {record}"
        if path:
            where += f", at {path}"
        super().__init__(f"{where}: {reason}")


class UnsafePlanError(StateError):
    """The plan would remove too much, or would remove from an empty/unparsable desired state."""


class ConvergenceError(StateError):
    """After applying, the live state still differs from the target."""


class LiveChangedError(StateError):
    """The live sozu changed between the read a sync merged and the moment it would apply: nothing was
    sent; the next sync reads it again (a change made meanwhile is a local change, never reverted)."""


class SharedInFlightError(StateError):
    """The shared state key and its metadata key do not match (another node's write of the pair is
    probably in progress): nothing was applied or pushed; the next sync reads the pair again."""


class VersionMismatchError(StateError):
    """A state of one sozu family (0.15, or 1.x/2.x) was given where the other is running."""


# --- OpenSVC -----------------------------------------------------------------------------------


class OpenSVCError(SozudError):
    """A failure of the OpenSVC agent API; names the transport, object and key."""

    def __init__(
        self,
        message: str,
        *,
        transport: str = "",
        obj: str | None = None,
        key: str | None = None,
    ) -> None:
        self.transport = transport
        self.obj = obj
        self.key = key
        where = transport or "opensvc"
        if obj:
            where += f" {obj}"
            if key:
                where += f" key {key}"
        super().__init__(f"{where}: {message}")


class OpenSVCUnreachableError(OpenSVCError):
    """The agent cannot be reached (down, socket missing, refused, reset, timeout)."""


class OpenSVCAuthError(OpenSVCError):
    """The agent refused our credentials (401/403, wrong cluster name or secret)."""


class OpenSVCNotFoundError(OpenSVCError):
    """Unknown object or key."""


class OpenSVCRefusedError(OpenSVCError):
    """The agent answered with an error (status != 0, 4xx/5xx other than auth/not-found)."""


class OpenSVCTooLargeError(OpenSVCError):
    """The value exceeds a limit of the transport (HTTP/2 upload window, om3 node.max_key_size)."""
