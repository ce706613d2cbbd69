"""Times as the database keeps them (naive UTC) and as answers give them: ISO 8601 with Z, or Unix seconds (OpenAI's
API)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso(moment) -> Optional[str]:
    return moment.replace(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z") if moment else None


def epoch(moment) -> Optional[int]:
    """A naive UTC time as Unix seconds (OpenAI's times), None for None."""
    return int(moment.replace(tzinfo=timezone.utc).timestamp()) if moment else None
