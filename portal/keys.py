"""Named API keys: create (only the hash is stored, the secret is shown once), list, revoke, what each may do (its
grant: scopes, models, end, rates), and the cache of verified keys that lets the proxy's hot path skip the database (a
revocation takes effect within KEY_CACHE_SECONDS). Who may use them, and for what, is portal.auth's rule.

A key's scopes: `use` (call models: /v1/..., /services/<id>/...), `read` (see the portal's state: GET pages and API
reads, /metrics) and `launch` (change it: launch, stop, renew, downloads, benchmarks); a new key has all three. Its
models (null: any) limit what it may call and launch; after its end (`expires_at`) it is refused (401); its rates
(requests and tokens per minute, null: unlimited) are kept by portal.rate_limits."""
from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from datetime import datetime, timezone
from typing import Dict, FrozenSet, Iterable, NamedTuple, Optional

from flask import current_app

from .db import db
from .errors import ForbiddenError, NotFoundError, ValidationError
from .lifetimes import END_SHAPE, parse_end
from .models import KEY_SCOPES, ApiKey, utcnow

KEY_PREFIX = "pf_"
KEY_CACHE_SECONDS = 5.0  # how long a verified key is trusted before the database is asked again (revocation delay)
EXTENSION = "pilotfish.keys"  # app.extensions[EXTENSION]: the app's KeyCache

NEEDS_LOOKUP = object()  # KeyCache.peek: the answer needs the database

SCOPES = KEY_SCOPES  # use, read, launch: in the order they are written and listed
SCOPE_WORDS = {"use": "call models", "read": "read the portal's state",
               "launch": "launch, stop or change anything"}
MODEL_NAME_MAX = 200  # a Hugging Face repo id is at most 96 characters; room for other names
MODELS_MAX = 100
RATE_MAX = 10_000_000
EXPIRES_WORDS = ("how long it lasts (30d, 12h, 90m, 1d12h) or when it ends (2026-12-01T18:00, the portal's local "
                 "time, or with Z or an offset)")
EXPIRES_MAX_SECONDS = 5 * 366 * 86400  # five years
EXPIRES_SHAPE = END_SHAPE  # what parse_expiry takes (a JSON Schema pattern)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --- what a key may do ----------------------------------------------------------------------------------------

class KeyGrant(NamedTuple):
    """What a live key may do, as the cache holds it: its scopes, its models (None: any), its end (epoch seconds,
    None: never) and its rates (None: unlimited)."""
    name: str
    scopes: FrozenSet[str]
    models: Optional[FrozenSet[str]]
    expires_at: Optional[float]
    requests_per_minute: Optional[int]
    tokens_per_minute: Optional[int]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def expired(self, now: Optional[float] = None) -> bool:
        return self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at

    @property
    def rate_limited(self) -> bool:
        """Whether the key has a rate (its requests then go through portal.rate_limits; others never do)."""
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


def _epoch(moment: Optional[datetime]) -> Optional[float]:
    return moment.replace(tzinfo=timezone.utc).timestamp() if moment is not None else None


def grant_of_row(row: ApiKey) -> KeyGrant:
    models = row.model_list
    return KeyGrant(row.name, frozenset(row.scope_list), frozenset(models) if models is not None else None,
                    _epoch(row.expires_at), row.requests_per_minute, row.tokens_per_minute)


# --- the cache of verified keys ------------------------------------------------------------------------------

class KeyCache:
    """Verified API keys and their grants, so the hot path hashes once and skips the database for a few seconds."""

    def __init__(self):
        self._entries: dict = {}  # sha256 of the key -> (KeyGrant, when verified: monotonic)
        self._by_name: Dict[str, KeyGrant] = {}  # the grant of each key verified lately, by its name
        self._lock = threading.Lock()

    def peek_grant(self, key: str):
        """The key's grant if it was verified lately, else NEEDS_LOOKUP (never touches the database)."""
        entry = self._entries.get(hash_key(key))
        if entry and time.monotonic() - entry[1] < KEY_CACHE_SECONDS:
            return entry[0]
        return NEEDS_LOOKUP

    def lookup_grant(self, key: str) -> Optional[KeyGrant]:
        """The grant of a live key (from the cache while it is fresh, else from the database), or None. An expired key
        is still found (so its refusal can say when it ended)."""
        digest = hash_key(key)
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry and now - entry[1] < KEY_CACHE_SECONDS:
            return entry[0]
        row = ApiKey.query.filter_by(key_hash=digest, revoked_at=None).first()
        with self._lock:
            if row is None:
                gone = self._entries.pop(digest, None)
                if gone is not None and self._by_name.get(gone[0].name) is gone[0]:
                    del self._by_name[gone[0].name]
                return None
            grant = grant_of_row(row)
            self._entries[digest] = (grant, now)
            self._by_name[grant.name] = grant
        return grant

    def peek(self, key: str):
        """The key's name if it was verified lately, else NEEDS_LOOKUP (never touches the database)."""
        grant = self.peek_grant(key)
        return grant if grant is NEEDS_LOOKUP else grant.name

    def lookup(self, key: str) -> Optional[str]:
        """The name of a live key (from the cache while it is fresh, else from the database), or None."""
        grant = self.lookup_grant(key)
        return grant.name if grant is not None else None

    def grant(self, name: str) -> Optional[KeyGrant]:
        """The grant of the key named `name` as last verified here, from the cache alone (never the database): right
        after its key was authenticated, it is that key's."""
        return self._by_name.get(name)

    def forget(self) -> None:
        """Verify every key in the database again at its next use (the grants by name stay until then, so a request
        authenticated just before still finds its key's grant)."""
        with self._lock:
            self._entries.clear()


def init_keys(app) -> KeyCache:
    """Give the app its cache of verified keys."""
    cache = app.extensions[EXTENSION] = KeyCache()
    return cache


def key_cache(app=None) -> KeyCache:
    return (app or current_app).extensions[EXTENSION]


def live_grant(name: str) -> Optional[KeyGrant]:
    """The grant of the live key `name`: the cache's, else the database's (Flask's threads only), or None."""
    grant = key_cache().grant(name)
    if grant is not None:
        return grant
    row = ApiKey.query.filter_by(name=name, revoked_at=None).first()
    return grant_of_row(row) if row is not None else None


def check_key_model(principal: Optional[str], model: str, doing: str = "launch", field: str = "model") -> None:
    """A key limited to models may launch (or benchmark) only those: else a 403 naming the model (its `field`: an
    adapter's is `adapters`). Any principal but a key ("owner") may do it with any model. An adapter is a model of its
    own: a key limited to its base may not launch or call it."""
    if not (isinstance(principal, str) and principal.startswith("key:")):
        return
    name = principal[4:]
    grant = live_grant(name)
    if grant is None:
        raise ForbiddenError(f"API key {name!r} was revoked")
    if not grant.allows_model(model):
        raise ForbiddenError(f"{field}: API key {name!r} may not {doing} {model!r}: it may use "
                             f"{', '.join(sorted(grant.models))}", field=field)


# --- create, list, revoke, last use ----------------------------------------------------------------------------

def list_api_keys() -> list:
    """The keys in use (not revoked, expired ones included), oldest first."""
    return ApiKey.query.filter_by(revoked_at=None).order_by(ApiKey.created_at).all()


def check_scopes(scopes) -> list:
    """Scopes as given (a list, or a comma-separated string), in SCOPES' order; a ValidationError naming `scopes`."""
    if isinstance(scopes, str):
        scopes = [part.strip() for part in scopes.split(",")]
    expected = f"expected one or more of {', '.join(SCOPES)}"
    if not isinstance(scopes, (list, tuple)) or not scopes:
        raise ValidationError("scopes", f"{expected}, got {scopes!r}")
    for scope in scopes:
        if scope not in SCOPES:
            raise ValidationError("scopes", f"{expected}, got {scope!r}")
    return [scope for scope in SCOPES if scope in scopes]


def check_models(models) -> list:
    """Model names (repo ids), each once; a ValidationError naming `models`."""
    if not isinstance(models, (list, tuple)) or not models:
        raise ValidationError("models", f"expected a list of model names (repo ids such as org/name; leave it out "
                                        f"for any model), got {models!r}")
    if len(models) > MODELS_MAX:
        raise ValidationError("models", f"at most {MODELS_MAX} models, got {len(models)}")
    checked = []
    for model in models:
        if not isinstance(model, str) or not model.strip() or len(model) > MODEL_NAME_MAX or \
                any(ord(c) < 32 or ord(c) == 127 for c in model):
            raise ValidationError("models", f"expected model names of 1 to {MODEL_NAME_MAX} characters, got "
                                            f"{model!r}")
        if model.strip() not in checked:
            checked.append(model.strip())
    return checked


def check_rate(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= RATE_MAX:
        raise ValidationError(field, f"expected a whole number from 1 to {RATE_MAX:,} (leave it out: unlimited), "
                                     f"got {value!r}")
    return value


def parse_expiry(value, now: datetime) -> datetime:
    """A key's end as written ("30d", "12h", "90m", an ISO 8601 time): naive UTC, in the future, at most five years
    away; else a ValidationError naming `expires`."""
    return parse_end(value, now, "expires", EXPIRES_WORDS, 1, EXPIRES_MAX_SECONDS)


def create_api_key(name, scopes: Optional[Iterable[str]] = None, models: Optional[Iterable[str]] = None,
                   expires: Optional[str] = None, requests_per_minute: Optional[int] = None,
                   tokens_per_minute: Optional[int] = None) -> tuple:
    """Create a named key; returns (row, secret). Only the hash is stored. `scopes` (default: use, read, launch),
    `models` (default: any), `expires` (a duration or an ISO time; default: never) and the rates (default:
    unlimited) are checked first: a ValidationError naming the field, and nothing is created."""
    if not isinstance(name, str) or not name.strip() or len(name) > 60 or any(ord(c) < 32 for c in name):
        raise ValidationError("name", "expected a name of 1 to 60 characters")
    name = name.strip()
    scopes = check_scopes(scopes) if scopes is not None else list(SCOPES)
    models = check_models(models) if models is not None else None
    expires_at = parse_expiry(expires, utcnow()) if expires is not None else None
    rpm = check_rate(requests_per_minute, "requests_per_minute") if requests_per_minute is not None else None
    tpm = check_rate(tokens_per_minute, "tokens_per_minute") if tokens_per_minute is not None else None
    if ApiKey.query.filter_by(name=name, revoked_at=None).first():
        raise ValidationError("name", f"a key named {name!r} already exists")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=secrets.token_hex(4), name=name, key_hash=hash_key(secret), hint=secret[:7] + "…",
                 scopes=",".join(scopes), models_json=json.dumps(models) if models is not None else None,
                 expires_at=expires_at, requests_per_minute=rpm, tokens_per_minute=tpm)
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


def mark_used(last_use: Dict[str, datetime]) -> int:
    """Record when each live key (by name) was last used: `last_use` maps names to naive UTC times (as the database
    holds them). Called every few seconds by a background flush, never on a request's path; a time never moves a
    key's last use back. Returns how many keys were updated."""
    updated = 0
    for name, moment in last_use.items():
        if moment.tzinfo is not None:
            moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
        updated += ApiKey.query.filter(ApiKey.name == name, ApiKey.revoked_at.is_(None),
                                       (ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < moment)).update(
            {"last_used_at": moment}, synchronize_session=False)
    db.session.commit()
    return updated
