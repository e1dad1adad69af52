"""The web view's authentication and CSRF tokens, standard library only.

Passwords are stored as ``pbkdf2_sha256$<iterations>$<salt>$<hash>`` (`hash_password`), so
no clear-text password sits in a settings file. A CSRF token is an HMAC of a per-browser
random cookie value under a key derived from that hash: it is the same in every server
process that shares the settings (no session store), and useless without the cookie.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from ironflow_celery.errors import ConfigurationError

__all__ = [
    "ITERATIONS",
    "basic_credentials",
    "csrf_token",
    "hash_password",
    "new_nonce",
    "valid_csrf",
    "verify_password",
]

ITERATIONS = 600_000
"""PBKDF2-SHA256 rounds (OWASP's 2023 figure for this hash)."""
_SCHEME = "pbkdf2_sha256"


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: str | None = None) -> str:
    """`password` as ``pbkdf2_sha256$<iterations>$<salt>$<hex hash>``."""
    if not password:
        raise ConfigurationError("the web view's password must not be empty")
    salt = salt or secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"{_SCHEME}${iterations}${salt}${digest.hex()}"


def check_hash(stored: str) -> None:
    """Refuse a `stored` hash that `hash_password` did not make (a setting error)."""
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != _SCHEME or not parts[1].isdigit():
        raise ConfigurationError(
            "ironflow_web_password_hash is not a pbkdf2_sha256$<iterations>$<salt>$<hash> "
            "value; make one with `ironflow-celery web --hash-password`"
        )


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches `stored` (constant-time comparison)."""
    check_hash(stored)
    _, iterations, salt, expected = stored.split("$")
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), int(iterations))
    return hmac.compare_digest(digest.hex(), expected)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """User and password of an ``Authorization: Basic …`` header; None when absent or bad."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def new_nonce() -> str:
    """A fresh random value for the CSRF cookie."""
    return secrets.token_urlsafe(32)


def _key(password_hash: str) -> bytes:
    return hashlib.sha256(b"ironflow-web-csrf\0" + password_hash.encode()).digest()


def csrf_token(password_hash: str, nonce: str, user: str) -> str:
    """The token forms carry for the browser holding cookie `nonce`, signed in as `user`."""
    message = f"{nonce}\0{user}".encode()
    return hmac.new(_key(password_hash), message, hashlib.sha256).hexdigest()


def valid_csrf(password_hash: str, nonce: str | None, user: str, token: str | None) -> bool:
    """Whether a POST's `token` matches its cookie `nonce` and user."""
    if not nonce or not token:
        return False
    return hmac.compare_digest(csrf_token(password_hash, nonce, user), token)
