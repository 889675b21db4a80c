"""What ``qd dashboard`` lets through: read-only by default, foreign ``Host`` headers refused.

optuna-dashboard's API can delete a study, rename it, write notes and tell trials, and it trusts
whoever connects. Bound to 127.0.0.1 that still means anyone with a shell on the machine, and any
web page the user opens: a page on another domain that resolves its name to 127.0.0.1 (DNS
rebinding) talks to the dashboard as a same-origin site. ``Guard`` wraps the dashboard's WSGI app:

- a request whose ``Host`` is not this machine (``localhost``, an IP address, this host's
  names, the address listened on, or a name given with ``--allow-host``) is refused (403): a
  rebinding page carries its own domain name there;
- every request that is not a read (anything but GET, HEAD, OPTIONS) is refused (403) unless
  writes were allowed (``--allow-writes``) and the request carries the token printed at start-up:
  opening the printed URL once (``?token=...``) stores it in a same-site, HTTP-only cookie for the
  browser; scripts send it as the ``X-QD-Token`` header. A write whose ``Origin`` is another
  site is refused whatever it carries.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from collections.abc import Callable, Iterable
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

READS = ("GET", "HEAD", "OPTIONS")
TOKEN_COOKIE = "qd_dashboard_token"
TOKEN_HEADER = "HTTP_X_QD_TOKEN"


def new_token() -> str:
    """A fresh random URL-safe access token."""
    return secrets.token_urlsafe(24)


def host_name(host_header: str) -> str:
    """``example.org:8080`` -> ``example.org``; ``[::1]:8080`` -> ``::1``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def local_names(listen_host: str, extra: Iterable[str] = ()) -> set[str]:
    """Host names accepted in ``Host`` besides IP addresses."""
    names = {"localhost", listen_host.lower()}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower())
    return names | {h.lower() for h in extra}


class Guard:
    """WSGI middleware around optuna-dashboard's app (see the module docstring).

    Args:
        app: the WSGI application.
        allowed_hosts: host names accepted in the ``Host`` header (IP addresses always are).
        token: the write token, or None for a read-only dashboard.
    """

    def __init__(self, app: Callable[..., Any], allowed_hosts: Iterable[str], token: str | None = None):
        self.app, self.allowed, self.token = app, {h.lower() for h in allowed_hosts}, token

    def _host_ok(self, header: str) -> bool:
        name = host_name(header)
        return bool(name) and (name in self.allowed or _is_ip(name))

    def _has_token(self, environ: dict[str, Any]) -> bool:
        if self.token is None:
            return False
        given = environ.get(TOKEN_HEADER)
        if given is None:
            cookie = SimpleCookie(environ.get("HTTP_COOKIE", ""))
            given = cookie[TOKEN_COOKIE].value if TOKEN_COOKIE in cookie else None
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not self._host_ok(environ.get("HTTP_HOST", "")):
            return _refuse(start_response, f"Host {environ.get('HTTP_HOST', '')!r} is not this machine; qd dashboard "
                           f"answers only to its own names (start it with --allow-host NAME to add one)")
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if method not in READS:
            if self.token is None:
                return _refuse(start_response, "this dashboard is read-only; start it with `qd dashboard "
                               "--allow-writes` to delete studies, write notes or tell trials")
            origin = environ.get("HTTP_ORIGIN")
            if origin and not self._host_ok(urlsplit(origin).netloc):
                return _refuse(start_response, f"a write from another site ({origin}) is refused")
            if not self._has_token(environ):
                return _refuse(start_response, "a write needs the token printed by `qd dashboard --allow-writes` "
                               "(open the printed URL once, or send the X-QD-Token header)")
        given = parse_qs(environ.get("QUERY_STRING", "")).get("token", [None])[0]
        if self.token is not None and given is not None and hmac.compare_digest(given.encode(), self.token.encode()):
            def with_cookie(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                headers = [*headers, ("Set-Cookie", f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict")]
                return start_response(status, headers, exc_info)

            return self.app(environ, with_cookie)
        return self.app(environ, start_response)


def _refuse(start_response: Callable[..., Any], message: str) -> list[bytes]:
    body = (message + "\n").encode()
    start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]


__all__ = ["Guard", "new_token", "local_names", "host_name", "TOKEN_COOKIE"]
