"""Who may read the dashboard: credentials from the environment, and the Host names it answers to.

Bound to a loopback address (127.0.0.1, ::1, localhost) the page needs no credentials unless some are set. Bound to
any other address (0.0.0.0 included) it refuses to start without credentials:

  MRKD_DASHBOARD_TOKEN=...                                  a bearer token (`Authorization: Bearer ...`, e.g.
                                                            Prometheus' `authorization:`), or as the password of
                                                            basic auth with any user name (a browser prompts)
  MRKD_DASHBOARD_USER=... MRKD_DASHBOARD_PASSWORD=...       basic-auth credentials (a browser prompts)
  MRKD_DASHBOARD_ALLOWED_HOSTS=line3.plant.example,10.0.0.5 extra Host names the page answers to (comma-separated)

Every request's Host header is checked against the allowed names (Starlette's TrustedHostMiddleware), so a page on
another site cannot read the dashboard through DNS rebinding: the loopback names, the bound address, and when bound
to every interface (0.0.0.0, ::) this machine's host names and addresses.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Mapping

ENV_TOKEN = "MRKD_DASHBOARD_TOKEN"
ENV_USER = "MRKD_DASHBOARD_USER"
ENV_PASSWORD = "MRKD_DASHBOARD_PASSWORD"
ENV_ALLOWED_HOSTS = "MRKD_DASHBOARD_ALLOWED_HOSTS"
REALM = "MRKD line"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
ANY_ADDRESS = ("0.0.0.0", "::")


class AccessError(ValueError):
    """The dashboard's access settings are incomplete (e.g. a user without a password)."""


@dataclass(frozen=True)
class Credentials:
    token: str = ""
    user: str = ""
    password: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Credentials":
        env = os.environ if env is None else env
        credentials = cls(env.get(ENV_TOKEN, ""), env.get(ENV_USER, ""), env.get(ENV_PASSWORD, ""))
        if bool(credentials.user) != bool(credentials.password):
            raise AccessError(f"set both {ENV_USER} and {ENV_PASSWORD} (basic auth), or neither")
        return credentials

    @property
    def required(self) -> bool:
        return bool(self.token or self.user)

    def accepts(self, authorization: str) -> bool:
        """Whether an Authorization header value carries these credentials (compared in constant time)."""
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            return bool(self.token) and hmac.compare_digest(value.encode(), self.token.encode())
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        if self.token and hmac.compare_digest(password.encode(), self.token.encode()):
            return True
        return bool(self.user) and (hmac.compare_digest(user.encode(), self.user.encode())
                                    & hmac.compare_digest(password.encode(), self.password.encode()))


def is_loopback(host: str) -> bool:
    """Whether a listen address is on this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(address: str) -> str:
    """An address as it appears in a Host header (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address else address


def allowed_hosts(bind_host: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The Host names a dashboard bound to `bind_host` answers to."""
    env = os.environ if env is None else env
    names = list(LOOPBACK_NAMES) + [_host_name(bind_host)]
    if bind_host in ANY_ADDRESS:
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.append(name)
            try:
                names += [_host_name(str(info[4][0])) for info in socket.getaddrinfo(name, None)]
            except OSError:
                pass
    names += [name.strip() for name in env.get(ENV_ALLOWED_HOSTS, "").split(",") if name.strip()]
    return sorted({name.lower() for name in names if name})


class RequireCredentials:
    """ASGI middleware: 401 (with a basic-auth challenge, so a browser prompts) unless the request carries the
    credentials."""

    def __init__(self, app, credentials: Credentials):
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers
        from starlette.responses import JSONResponse

        if self.credentials.accepts(Headers(scope=scope).get("authorization", "")):
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"error": "credentials required (see docs/dashboard.md)"}, status_code=401,
                                headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"',
                                         "Cache-Control": "no-store"})
        await response(scope, receive, send)
