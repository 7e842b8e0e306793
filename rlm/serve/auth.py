"""Who may talk to a server: the bearer key and the rule for binding beyond loopback.

A server that listens beyond loopback runs code and spends model budget for whoever
reaches it, so it refuses to start without a key there. On loopback the key is
optional, and enforced when given (other local users and browsers reach loopback too).
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from rlm.errors import ConfigError

__all__ = ["AUTH_KEY_ENV", "auth_key_from", "bearer_matches", "check_bind", "is_loopback"]

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
