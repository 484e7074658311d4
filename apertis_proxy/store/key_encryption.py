"""Upstream keys encrypted at rest, with a key from the environment.

`APERTIS_SECRET_KEY` (or a file named by `APERTIS_SECRET_KEY_FILE`) holds one
or more Fernet keys (AES-128-CBC with HMAC-SHA256, from the `cryptography`
package), separated by commas or whitespace.  The first one encrypts; every
one of them decrypts, so a new key is put first, `apertis-proxy db reencrypt`
rewrites every stored key under it, and the old key is then dropped.

A stored value starting with ENCRYPTED_PREFIX is a Fernet token; any other
value is a key stored in plain text, which keeps working (databases from
before encryption was configured) and is reported by `db secrets`.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

ENCRYPTED_PREFIX = "enc:v1:"
ENV_KEY = "APERTIS_SECRET_KEY"
ENV_KEY_FILE = "APERTIS_SECRET_KEY_FILE"


class SecretKeyError(ValueError):
    """The secret key is missing, malformed, or does not open a stored value."""


def is_encrypted(stored: str) -> bool:
    return stored.startswith(ENCRYPTED_PREFIX)


def _fernet():
    try:
        from cryptography import fernet
    except ImportError:
        raise SecretKeyError(
            f"{ENV_KEY} is set but the cryptography package is missing: "
            "pip install 'apertis-proxy[crypto]'") from None
    return fernet


def new_secret_key() -> str:
    return _fernet().Fernet.generate_key().decode("ascii")


class KeyBox:
    """Encrypts with the first of `keys`, decrypts with any of them."""

    def __init__(self, keys: list[str]) -> None:
        fernet = _fernet()
        try:
            self._fernet = fernet.MultiFernet([fernet.Fernet(k.encode("ascii")) for k in keys])
        except (ValueError, UnicodeEncodeError):
            raise SecretKeyError(
                f"{ENV_KEY} must hold Fernet keys (32 url-safe base64-encoded bytes each); "
                "make one with: apertis-proxy db secret-key") from None
        self._invalid = fernet.InvalidToken

    def seal(self, plain: str) -> str:
        return ENCRYPTED_PREFIX + self._fernet.encrypt(plain.encode("utf-8")).decode("ascii")

    def open(self, stored: str) -> str:
        if not is_encrypted(stored):
            return stored
        try:
            return self._fernet.decrypt(stored[len(ENCRYPTED_PREFIX):].encode("ascii")).decode("utf-8")
        except (self._invalid, UnicodeError):
            raise SecretKeyError(f"no key in {ENV_KEY} opens this stored upstream key") from None

    def reseal(self, stored: str) -> str:
        """`stored` encrypted under the first key (plain text is encrypted)."""
        return self.seal(self.open(stored))


def configured_keys(env: Mapping[str, str]) -> list[str]:
    text = env.get(ENV_KEY) or ""
    path = env.get(ENV_KEY_FILE)
    if not text.strip() and path:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise SecretKeyError(f"cannot read {ENV_KEY_FILE} {path}: {exc.strerror}") from None
    return text.replace(",", " ").split()


_cache: tuple[tuple[str, ...], Optional[KeyBox]] = ((), None)


def from_environment(env: Optional[Mapping[str, str]] = None) -> Optional[KeyBox]:
    """The KeyBox for the configured secret keys, or None when none is configured."""
    global _cache
    keys = tuple(configured_keys(os.environ if env is None else env))
    if not keys:
        return None
    if _cache[0] != keys:
        _cache = (keys, KeyBox(list(keys)))
    return _cache[1]


def open_stored(stored: str) -> str:
    """The plain upstream key for a stored value (plain text passes through)."""
    if not is_encrypted(stored):
        return stored
    box = from_environment()
    if box is None:
        raise SecretKeyError(f"an upstream key is stored encrypted but {ENV_KEY} is not set")
    return box.open(stored)


def seal_for_storage(plain: str) -> str:
    """What to store for a new upstream key: encrypted when a secret key is configured."""
    box = from_environment()
    return box.seal(plain) if box is not None else plain
