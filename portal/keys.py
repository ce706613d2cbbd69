"""Named API keys: create (only the hash is stored, the secret is shown once), list, revoke, and the cache of
verified keys that lets the proxy's hot path skip the database (a revocation takes effect within
KEY_CACHE_SECONDS). Who may use them, and for what, is portal.auth's rule."""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
from typing import Optional

from flask import current_app

from .db import db
from .errors import NotFoundError, ValidationError
from .models import ApiKey, utcnow

KEY_PREFIX = "pf_"
KEY_CACHE_SECONDS = 5.0  # how long a verified key is trusted before the database is asked again (revocation delay)
EXTENSION = "pilotfish.keys"  # app.extensions[EXTENSION]: the app's KeyCache

NEEDS_LOOKUP = object()  # KeyCache.peek: the answer needs the database


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyCache:
    """Verified API keys, so the hot path hashes once and skips the database for a few seconds."""

    def __init__(self):
        self._entries: dict = {}
        self._lock = threading.Lock()

    def peek(self, key: str):
        """The key's name if it was verified lately, else NEEDS_LOOKUP (never touches the database)."""
        entry = self._entries.get(hash_key(key))
        if entry and time.monotonic() - entry[1] < KEY_CACHE_SECONDS:
            return entry[0]
        return NEEDS_LOOKUP

    def lookup(self, key: str) -> Optional[str]:
        """The name of a live key (from the cache while it is fresh, else from the database), or None."""
        digest = hash_key(key)
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry and now - entry[1] < KEY_CACHE_SECONDS:
            return entry[0]
        row = ApiKey.query.filter_by(key_hash=digest, revoked_at=None).first()
        with self._lock:
            if row is None:
                self._entries.pop(digest, None)
                return None
            self._entries[digest] = (row.name, now)
        return row.name

    def forget(self) -> None:
        with self._lock:
            self._entries.clear()


def init_keys(app) -> KeyCache:
    """Give the app its cache of verified keys."""
    cache = app.extensions[EXTENSION] = KeyCache()
    return cache


def key_cache(app=None) -> KeyCache:
    return (app or current_app).extensions[EXTENSION]


def list_api_keys() -> list:
    """The keys in use (not revoked), oldest first."""
    return ApiKey.query.filter_by(revoked_at=None).order_by(ApiKey.created_at).all()


def create_api_key(name) -> tuple:
    """Create a named key; returns (row, secret). Only the hash is stored."""
    if not isinstance(name, str) or not name.strip() or len(name) > 60 or any(ord(c) < 32 for c in name):
        raise ValidationError("name", "expected a name of 1 to 60 characters")
    name = name.strip()
    if ApiKey.query.filter_by(name=name, revoked_at=None).first():
        raise ValidationError("name", f"a key named {name!r} already exists")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=secrets.token_hex(4), name=name, key_hash=hash_key(secret), hint=secret[:7] + "…")
    db.session.add(row)
    db.session.commit()
    return row, secret


def revoke_api_key(key_id: str) -> None:
    """Revoke a key: it stops working at once in this process, within KEY_CACHE_SECONDS in the others."""
    row = db.session.get(ApiKey, key_id) if isinstance(key_id, str) else None
    if row is None or row.revoked_at is not None:
        raise NotFoundError(f"no API key {key_id!r}")
    row.revoked_at = utcnow()
    db.session.commit()
    key_cache().forget()
