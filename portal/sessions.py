"""Login sessions kept on the server: the browser's cookie holds only a random id (256 bits), the `sessions` table its
SHA-256 with the session's CSRF token, when it was opened, last seen, when it ends at the latest, and whether it was
logged out. A session is valid while it is not logged out, was opened with the portal's current token, was used within
`session_idle` seconds, and its absolute end (`session_max` after the login, and no later than `session_end`, the Open
OnDemand job's end) has not come.

Each worker keeps the sessions it verified in memory (SessionCache), so the proxy's hot path on the event loop never
queries the database: `peek` answers from memory or says NEEDS_LOOKUP (the caller then asks `lookup` in a thread).
A logout commits, then touches PILOTFISH_HOME/sessions.changed; every worker looks at that file's mark at most every
MARK_CHECK_SECONDS and forgets all it cached when it moved, so a logged-out cookie stops working everywhere within
about a second. Verified entries are re-read after CACHE_SECONDS anyway. `last_seen` is written at most once per
`touch_interval` (a minute, less for short idle times) per worker and session, never on every request.
"""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

from . import change_marks
from .db import db
from .keys import NEEDS_LOOKUP
from .models import LoginSession, utcnow

CHANGED_FILE = "sessions.changed"  # touched after every logout (sessions_changed)
MARK_CHECK_SECONDS = 0.25  # how often a worker looks at the mark
CACHE_SECONDS = 30.0  # how long a verified session is trusted before the database is read again
EXTENSION = "pilotfish.sessions"  # app.extensions[EXTENSION]: the app's SessionCache

__all__ = ["NEEDS_LOOKUP", "Session", "SessionCache", "session_cache", "init_sessions"]


def digest(secret: str) -> str:
    return hashlib.sha256(b"pilotfish-session:" + secret.encode()).hexdigest()


def _epoch(moment: datetime) -> float:
    return moment.replace(tzinfo=timezone.utc).timestamp()


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc).replace(tzinfo=None)


@dataclass
class Session:
    """A valid session as a worker knows it."""
    id: str  # the SHA-256 of the cookie's value
    csrf: str
    expires: float  # epoch seconds
    last_seen: float  # epoch seconds: the latest use this worker knows of
    written: float  # epoch seconds: the last_seen the database holds
    checked: float  # monotonic seconds: when it was last read from the database


class SessionCache:
    """The sessions this worker verified, and the rules of a session's life."""

    def __init__(self, home: Path, token_id: str, idle: float, max_age: float, end: Optional[float]):
        self.token_id = token_id
        self.idle, self.max_age, self.end = idle, max_age, end
        self.touch_interval = min(60.0, idle / 4)
        self._mark_file = Path(home) / CHANGED_FILE
        self._entries: dict = {}
        self._lock = threading.Lock()
        self._mark = self._read_mark()
        self._mark_checked = time.monotonic()

    # --- the mark every logout moves --------------------------------------------------------------------------

    def _read_mark(self) -> tuple:
        return change_marks.state(self._mark_file)

    def _follow_mark(self) -> None:
        now = time.monotonic()
        if now - self._mark_checked < MARK_CHECK_SECONDS:
            return
        self._mark_checked = now
        mark = self._read_mark()
        if mark != self._mark:
            with self._lock:
                self._mark = mark
                self._entries.clear()

    def changed(self) -> None:
        """Tell every worker (this one at once) to forget the sessions it verified."""
        with self._lock:
            self._entries.clear()
        change_marks.move(self._mark_file)

    # --- reading ---------------------------------------------------------------------------------------------

    def peek(self, secret: str):
        """The session from memory, None when it is known to have ended, or NEEDS_LOOKUP (never the database)."""
        self._follow_mark()
        entry = self._entries.get(digest(secret))
        if entry is None:
            return NEEDS_LOOKUP
        now = time.time()
        if now >= entry.expires:
            return None
        if (now - entry.last_seen > self.idle or now - entry.written >= self.touch_interval
                or time.monotonic() - entry.checked > CACHE_SECONDS):
            return NEEDS_LOOKUP  # maybe another worker saw it since; or last_seen is due to be written
        entry.last_seen = now
        return entry

    def lookup(self, secret: str) -> Optional[Session]:
        """The valid session of a cookie's value (from memory while it can answer, else the database), or None.
        Writes last_seen when it is due. Needs an app context."""
        found = self.peek(secret)
        if found is not NEEDS_LOOKUP:
            return found
        key = digest(secret)
        row = db.session.get(LoginSession, key)
        now = time.time()
        known = self._entries.get(key)
        last_seen = max(_epoch(row.last_seen), known.last_seen if known else 0.0) if row is not None else 0.0
        if (row is None or row.revoked_at is not None or row.token_id != self.token_id
                or now >= _epoch(row.expires_at) or now - last_seen > self.idle):
            with self._lock:
                self._entries.pop(key, None)
            db.session.rollback()
            return None
        written = _epoch(row.last_seen)
        if now - written >= self.touch_interval:
            LoginSession.query.filter_by(id=key, revoked_at=None).update({"last_seen": _moment(now)},
                                                                         synchronize_session=False)
            written = now
        entry = Session(id=key, csrf=row.csrf, expires=_epoch(row.expires_at), last_seen=now, written=written,
                        checked=time.monotonic())
        db.session.commit()
        with self._lock:
            self._entries[key] = entry
        return entry

    # --- opening and ending ------------------------------------------------------------------------------------

    def open(self) -> tuple:
        """A new session: (the cookie's value, the Session). Sessions ended a day ago or more are deleted."""
        secret = secrets.token_urlsafe(32)
        now = time.time()
        expires = now + self.max_age
        if self.end is not None:
            expires = min(expires, self.end)
        row = LoginSession(id=digest(secret), csrf=secrets.token_urlsafe(24), token_id=self.token_id,
                           created_at=_moment(now), last_seen=_moment(now), expires_at=_moment(expires))
        db.session.add(row)
        cutoff = utcnow() - timedelta(days=1)
        LoginSession.query.filter((LoginSession.expires_at < cutoff) | (LoginSession.revoked_at < cutoff)).delete(
            synchronize_session=False)
        db.session.commit()
        entry = Session(id=row.id, csrf=row.csrf, expires=expires, last_seen=now, written=now,
                        checked=time.monotonic())
        with self._lock:
            self._entries[row.id] = entry
        return secret, entry

    def revoke(self, secret: str) -> None:
        """Log a session out: at once in this worker, within about a second in the others."""
        LoginSession.query.filter_by(id=digest(secret), revoked_at=None).update({"revoked_at": utcnow()},
                                                                                synchronize_session=False)
        db.session.commit()
        self.changed()


def init_sessions(app, token_id: str) -> SessionCache:
    settings = app.config["PILOTFISH"]
    cache = app.extensions[EXTENSION] = SessionCache(settings.home, token_id, settings.session_idle,
                                                     settings.session_max, settings.session_end)
    return cache


def session_cache(app) -> SessionCache:
    return app.extensions[EXTENSION]
