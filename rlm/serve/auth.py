"""Who may talk to a server: the bearer key, the rule for binding beyond loopback, and
which Host and Origin headers a request may carry.

A server that listens beyond loopback runs code and spends model budget for whoever
reaches it, so it refuses to start without a key there. On loopback the key is
optional, and enforced when given (other local users and browsers reach loopback too).

Browsers reach loopback too: a web page can send a "simple" cross-origin POST (no
preflight), and with DNS rebinding it can read the answers. So a request is answered
only when its Host names this server (loopback names by default, more with
``--allowed-host``; 421 otherwise), its Origin, if any, is one of those hosts (403
otherwise), and a POST body is declared ``application/json`` (415 otherwise), which no
simple request can be.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Iterable
from urllib.parse import urlsplit

from rlm.errors import ConfigError

__all__ = [
    "AUTH_KEY_ENV",
    "HostRule",
    "auth_key_from",
    "bearer_matches",
    "check_bind",
    "is_json_content_type",
    "is_loopback",
]

AUTH_KEY_ENV = "RLM_SERVE_AUTH_KEY"


def auth_key_from(flag: str | None) -> str | None:
    """The key from ``--auth-key``, else from RLM_SERVE_AUTH_KEY; None when neither is set."""
    key = flag if flag is not None else os.environ.get(AUTH_KEY_ENV)
    if key is not None and not key.strip():
        raise ConfigError(f"the auth key is empty: pass a non-empty --auth-key or {AUTH_KEY_ENV}")
    return key


def is_loopback(host: str) -> bool:
    """True for a host that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_bind(host: str, auth_key: str | None) -> None:
    """Refuse (ConfigError) to listen beyond loopback without an auth key."""
    if auth_key is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without an auth key: anyone who reaches it could run "
            f"code and spend your model budget. Pass --auth-key KEY (or set {AUTH_KEY_ENV}), "
            "or listen on 127.0.0.1"
        )


def bearer_matches(header: str | None, auth_key: str | None) -> bool:
    """True when no key is configured, or ``header`` is ``Bearer <the key>``."""
    if auth_key is None:
        return True
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant time, so the key cannot be guessed byte by byte from response times.
    return hmac.compare_digest(token.strip().encode(), auth_key.encode())


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARD_BINDS = ("0.0.0.0", "::", "")


def _split_host(value: str) -> tuple[str, int | None]:
    """``name[:port]`` or ``[v6][:port]`` as a lower-case name and a port (None: absent);
    ValueError when it is not one."""
    parts = urlsplit("//" + value.strip())
    name = (parts.hostname or "").lower()
    if not name or parts.username is not None or parts.path or parts.query or parts.fragment:
        raise ValueError(value)
    return name, parts.port


class HostRule:
    """The Host and Origin headers a server answers: the loopback names, the address it
    listens on (unless that is a wildcard such as 0.0.0.0), and ``extra`` names.

    An allowed name matches on any port; ``name:port`` only on that port; ``*`` allows
    any host (for a server behind a proxy that checks names itself).
    """

    def __init__(self, bind_host: str, extra: Iterable[str] = ()) -> None:
        self.any_host = False
        self.names: set[str] = set(LOOPBACK_NAMES)
        self.pairs: set[tuple[str, int]] = set()
        bind = bind_host.strip("[]").lower()
        if bind not in _WILDCARD_BINDS:
            self.names.add(bind)
        for value in extra:
            if value.strip() == "*":
                self.any_host = True
                continue
            try:
                name, port = _split_host(value)
            except ValueError:
                raise ConfigError(
                    f"--allowed-host wants a host name or address, optionally with :PORT, not {value!r}"
                ) from None
            if port is None:
                self.names.add(name)
            else:
                self.pairs.add((name, port))

    def allows_host(self, header: str | None) -> bool:
        """Whether a request's Host header names this server."""
        if self.any_host:
            return True
        if not header:
            return False
        try:
            name, port = _split_host(header)
        except ValueError:
            return False
        return name in self.names or (port is not None and (name, port) in self.pairs)

    def allows_origin(self, header: str | None) -> bool:
        """Whether a request's Origin header (absent for non-browser clients) is one of the
        allowed hosts, over http or https. ``null`` (sandboxed frames, files) never is."""
        if header is None:
            return True
        parts = urlsplit(header.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            return False
        return self.allows_host(parts.netloc)

    def refusal(self, host: str | None, origin: str | None) -> tuple[int, str] | None:
        """``(status, message)`` for a request to refuse by its Host or Origin, or None."""
        if not self.allows_host(host):
            return 421, (
                f"this server does not answer for host {host!r}: it answers for loopback names "
                "and the hosts given with --allowed-host (a DNS-rebinding web page gets this too)"
            )
        if not self.allows_origin(origin):
            return 403, (
                f"requests from web pages at {origin!r} are refused: only pages served from an "
                "allowed host may call this server (see --allowed-host)"
            )
        return None


def is_json_content_type(header: str | None) -> bool:
    """Whether a Content-Type header declares ``application/json`` (parameters allowed):
    no "simple" cross-origin request from a web page can carry it."""
    if not header:
        return False
    return header.split(";", 1)[0].strip().lower() == "application/json"
