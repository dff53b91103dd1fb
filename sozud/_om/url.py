"""From an API URL (``--api``, ``opensvc.api``) to the transport it names; the forms are listed in
:mod:`sozud.om_api`."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import httpx

from sozud._om.base import OMSettings, Transport, cluster_identity
from sozud._om.h2 import H2Transport
from sozud._om.http import tls_factory, uds_factory
from sozud._om.om3 import Om3Transport
from sozud._om.raw import RawTcpTransport, RawUnixTransport
from sozud.errors import ConfigError

__all__ = ["transport_from_url"]


def _socket_path(url: str, scheme: str) -> str:
    parts = urlsplit(url)
    path = unquote(parts.path)
    if parts.netloc or not path.startswith("/"):
        raise ConfigError(f"api URL {url!r}: expected {scheme}:///absolute/path/to/socket")
    return path


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ConfigError("api URL must not carry credentials; use the settings (password, token, secret_file)")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ConfigError(f"api URL {url!r}: bad port") from None
    if not host or parts.path not in ("", "/"):
        raise ConfigError(f"api URL {url!r}: expected {parts.scheme}://HOST[:PORT]")
    return host, port or default_port


def _v2_tls_headers(settings: OMSettings) -> dict[str, str]:
    if settings.cert_file:
        return {}
    _name, secret = cluster_identity(settings, need_name=False)
    return {"o-secret": secret[:32]}


def _om3_auth(settings: OMSettings) -> httpx.Auth | None:
    if settings.token:
        token = settings.token

        class _Bearer(httpx.Auth):
            def auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
                request.headers["authorization"] = f"Bearer {token}"
                yield request

        return _Bearer()
    if settings.username is not None and settings.password is not None:
        return httpx.BasicAuth(settings.username, settings.password)
    return None


def transport_from_url(url: str, settings: OMSettings) -> Transport:
    """The transport a URL names (see the module docstring for the forms)."""
    scheme = urlsplit(url).scheme
    timeout_s = settings.request_timeout_s
    if scheme == "unix":
        return RawUnixTransport(_socket_path(url, scheme), timeout_s=timeout_s)
    if scheme == "raw":
        host, port = _host_port(url, 1214)
        name, secret = cluster_identity(settings)
        return RawTcpTransport(
            host, port, cluster_name=name, secret=secret, nodename=settings.nodename, timeout_s=timeout_s
        )
    if scheme == "h2+unix":
        path = _socket_path(url, scheme)
        return H2Transport(url, base_url="http://localhost", make_transport=uds_factory(path), timeout_s=timeout_s)
    if scheme == "https":
        host, port = _host_port(url, 1215)
        return H2Transport(
            f"https://{host}:{port}",
            base_url=f"https://{host}:{port}",
            make_transport=tls_factory(settings),
            headers=_v2_tls_headers(settings),
            timeout_s=timeout_s,
        )
    if scheme == "om3+unix":
        path = _socket_path(url, scheme)
        return Om3Transport(
            url,
            base_url="http://localhost",
            make_transport=uds_factory(path),
            nodename=settings.nodename or "localhost",
            timeout_s=timeout_s,
        )
    if scheme == "om3+https":
        host, port = _host_port(url, 1215)
        return Om3Transport(
            f"om3+https://{host}:{port}",
            base_url=f"https://{host}:{port}",
            make_transport=tls_factory(settings),
            auth=_om3_auth(settings),
            nodename=settings.nodename or "localhost",
            timeout_s=timeout_s,
        )
    raise ConfigError(
        f"api URL {url!r}: unknown scheme {scheme!r} "
        "(expected unix://, raw://, h2+unix://, https://, om3+unix:// or om3+https://)"
    )
