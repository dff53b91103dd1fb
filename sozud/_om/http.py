"""What the HTTP/2 transports (v2 ``h2+unix``/``https``, om3) share: client set-up, the kept client that
retries once on a new connection, and error mapping."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from sozud._om.base import OMSettings
from sozud.errors import ConfigError, OpenSVCUnreachableError

TransportFactory = Callable[[], httpx.AsyncBaseTransport]


def tls_context(settings: OMSettings) -> ssl.SSLContext:
    """TLS 1.2+ with the cluster CA (``ca_file``) and, if given, our client certificate.

    With ``ca_file`` set, only certificates from the cluster CA are trusted and the host name is not
    checked: the agent's certificate names the node in its CN and usually has no subjectAltName
    (opensvc-api.md §1.1). Without ``ca_file`` the system CAs are used and host names are checked.
    """
    try:
        if settings.ca_file:
            ctx = ssl.create_default_context(cafile=settings.ca_file)
            ctx.check_hostname = False
        else:
            ctx = ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.cert_file or settings.key_file:
            if not (settings.cert_file and settings.key_file):
                raise ConfigError("cert_file and key_file must be given together")
            ctx.load_cert_chain(certfile=settings.cert_file, keyfile=settings.key_file)
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(f for f in (settings.ca_file, settings.cert_file) if f) or "system CAs"
        raise ConfigError(f"TLS set-up failed ({files}): {exc}") from exc
    ctx.set_alpn_protocols(["h2"])
    return ctx


def uds_factory(socket_path: str) -> TransportFactory:
    """New HTTP/2 prior-knowledge connections over a unix socket."""
    return lambda: httpx.AsyncHTTPTransport(uds=socket_path, http1=False, http2=True)


def tls_factory(settings: OMSettings) -> TransportFactory:
    """New HTTP/2-over-TLS connections."""
    ctx = tls_context(settings)
    return lambda: httpx.AsyncHTTPTransport(verify=ctx, http1=False, http2=True)


@contextlib.contextmanager
def unreachable_on_transport_errors(transport: str, obj: str | None, key: str | None) -> Iterator[None]:
    """Turn httpx's connection failures and timeouts into OpenSVCUnreachableError."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise OpenSVCUnreachableError(
            f"no answer in time ({type(exc).__name__})", transport=transport, obj=obj, key=key
        ) from None
    except httpx.TransportError as exc:
        raise OpenSVCUnreachableError(
            f"cannot talk to the agent: {type(exc).__name__}: {exc}", transport=transport, obj=obj, key=key
        ) from None
    except OSError as exc:
        raise OpenSVCUnreachableError(
            f"cannot talk to the agent: {exc.strerror or exc}", transport=transport, obj=obj, key=key
        ) from None


class ReusedClient:
    """One httpx client kept for the requests that may share a connection.

    A request that fails on the kept client with a transport error (the agent restarted since the last
    request and the connection died) is sent once more on a new client. A timeout is not retried (the
    agent may still be working on it), nor a failure on a client that was new: those propagate. Only
    for requests that are safe to send twice (reads, and om3's idempotent writes).
    """

    def __init__(self, new_client: Callable[[], httpx.AsyncClient]) -> None:
        self._new_client = new_client
        self._client: httpx.AsyncClient | None = None

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        reused = self._client is not None
        if self._client is None:
            self._client = self._new_client()
        try:
            return await self._client.request(method, url, **kwargs)
        except httpx.TimeoutException:
            raise
        except httpx.TransportError:
            await self.aclose()
            if not reused:
                raise
        self._client = self._new_client()
        return await self._client.request(method, url, **kwargs)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
