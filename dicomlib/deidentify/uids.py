"""Keyed, deterministic UID replacement: the same UID gives the same new UID in every instance and every
run with the same key, so studies, series and every reference stay consistent; another key gives others.

The new UID is `2.25.` and the decimal of 128 bits of HMAC-SHA256(key, uid): the UUID-derived form of
PS3.5 B.2, at most 44 characters, never containing the old UID.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "2.25."


def keyed(key: bytes, purpose: bytes, value: str) -> bytes:
    """HMAC-SHA256 of `value` under `key`, separated by purpose so a UID and a patient never collide."""
    return hmac.new(key, purpose + b"\0" + value.encode("utf-8"), hashlib.sha256).digest()


def map_uid(uid: str, key: bytes) -> str:
    """The replacement of one UID (surrounding spaces and the NUL pad of an odd-length value ignored)."""
    cleaned = uid.strip().rstrip("\0")
    if not cleaned:
        return cleaned
    return PREFIX + str(int.from_bytes(keyed(key, b"uid", cleaned)[:16], "big"))
