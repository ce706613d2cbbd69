"""What the usage table says (portal/usage_ledger.py writes it): requests, errors and tokens grouped by principal,
model, day or service over a span of UTC days, with their totals, and the day-by-principal series the Usage page
draws. The REST API (and through it the CLI) and the page call these, so a span or a filter means the same
everywhere; a named key sees only its own rows."""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Dict, List, Optional, Tuple

from sqlalchemy import func

from .db import db
from .errors import ForbiddenError, ValidationError
from .models import Batch, Service, Usage

GROUPS = {"principal": Usage.principal, "model": Usage.model, "day": Usage.day, "service": Usage.service_id}
SPAN = re.compile(r"^([1-9][0-9]{0,4})([dw])$")  # 7d, 2w
DAY = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
SPAN_WORDS = "a date (2026-12-01) or a span back from today (UTC): 7d, 2w"
OWNER = "owner"
CHART_DAYS = 366  # a chart shows at most this many days


def today_utc() -> date:
    return datetime.now(timezone.utc).date()


def parse_day(value: Optional[str], field: str, today: Optional[date] = None) -> Optional[date]:
    """A day as users write it: "2026-12-01", or "7d" / "2w" for that long before today (UTC); None for none.
    Anything else is a ValidationError naming `field`."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    span = SPAN.match(text)
    if span:
        days = int(span.group(1)) * (7 if span.group(2) == "w" else 1)
        return (today or today_utc()) - timedelta(days=days)  # at most 99999 weeks: still after the year 1
    if DAY.match(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
    raise ValidationError(field, f"expected {SPAN_WORDS}, got {text!r}")


@dataclass
class UsageQuery:
    """Which usage rows, grouped how: `since` and `until` are UTC days (both included; None: no bound)."""
    by: str = "principal"
    since: Optional[date] = None
    until: Optional[date] = None
    principal: Optional[str] = None
    model: Optional[str] = None


def usage_query(viewer: str, by: Optional[str] = None, since: Optional[str] = None, until: Optional[str] = None,
                principal: Optional[str] = None, model: Optional[str] = None,
                today: Optional[date] = None) -> UsageQuery:
    """The query of `viewer` ("owner", or "key:<name>", who sees only its own rows: asking for another's is a 403),
    from parameters as users write them (ValidationError naming the parameter at fault)."""
    by = by or "principal"
    if by not in GROUPS:
        raise ValidationError("by", f"expected one of {', '.join(GROUPS)}, got {by!r}")
    first, last = parse_day(since, "since", today), parse_day(until, "until", today)
    if first and last and first > last:
        raise ValidationError("until", f"{last.isoformat()} is before since ({first.isoformat()})")
    if viewer != OWNER:
        if principal and principal != viewer:
            raise ForbiddenError("a key sees only its own usage: leave out principal, or give its own")
        principal = viewer
    return UsageQuery(by, first, last, principal or None, model or None)


def _filtered(query: UsageQuery, rows):
    if query.since:
        rows = rows.filter(Usage.day >= query.since.isoformat())
    if query.until:
        rows = rows.filter(Usage.day <= query.until.isoformat())
    if query.principal:
        rows = rows.filter(Usage.principal == query.principal)
    if query.model:
        rows = rows.filter(Usage.model == query.model)
    return rows


def _figures(requests, errors, prompt, completion) -> dict:
    prompt, completion = int(prompt or 0), int(completion or 0)
    return {"requests": int(requests or 0), "errors": int(errors or 0), "prompt_tokens": prompt,
            "completion_tokens": completion, "total_tokens": prompt + completion}


SUMS = (func.sum(Usage.requests), func.sum(Usage.errors), func.sum(Usage.prompt_tokens),
        func.sum(Usage.completion_tokens))


def usage_summary(query: UsageQuery) -> dict:
    """{"by", "since", "until", "principal", "model", "rows": [{<by>: ..., requests, errors, prompt_tokens,
    completion_tokens, total_tokens}], "totals": {...}}: days in order, anything else by requests (most first)."""
    column = GROUPS[query.by]
    found = _filtered(query, db.session.query(column, *SUMS)).group_by(column).all()
    rows = [{query.by: key, **_figures(*sums)} for key, *sums in found]
    if query.by == "day":
        rows.sort(key=lambda row: row["day"])
    else:
        rows.sort(key=lambda row: (-row["requests"], -row["total_tokens"], row[query.by]))
    if query.by == "service" and rows:
        ids = [row["service"] for row in rows]
        names = dict(db.session.query(Service.id, Service.name).filter(Service.id.in_(ids)))
        names.update((batch_id, f"batch ({endpoint})") for batch_id, endpoint in
                     db.session.query(Batch.id, Batch.endpoint).filter(Batch.id.in_(ids)))
        for row in rows:
            row["name"] = names.get(row["service"])  # None: the service was deleted since
    totals = _figures(*[sum(row[name] for row in rows) for name in ("requests", "errors", "prompt_tokens",
                                                                    "completion_tokens")])
    return {"by": query.by, "since": query.since.isoformat() if query.since else None,
            "until": query.until.isoformat() if query.until else None, "principal": query.principal,
            "model": query.model, "rows": rows, "totals": totals}


def service_tokens(service_id: str) -> Tuple[int, int]:
    """(prompt, completion) tokens a service answered, all days and principals together."""
    prompt, completion = db.session.query(func.sum(Usage.prompt_tokens), func.sum(Usage.completion_tokens)).filter(
        Usage.service_id == service_id).one()
    return int(prompt or 0), int(completion or 0)


def daily_by_principal(query: UsageQuery, metric: str = "requests",
                       today: Optional[date] = None) -> Tuple[List[str], Dict[str, List[int]]]:
    """(days, {principal: one value per day}) for the chart: `metric` is "requests" or "tokens" (prompt and
    completion together); every day from `since` (else the first with usage) through `until` (else today), at most
    CHART_DAYS (the last ones)."""
    value = Usage.requests if metric == "requests" else Usage.prompt_tokens + Usage.completion_tokens
    found = _filtered(query, db.session.query(Usage.day, Usage.principal, func.sum(value))).group_by(
        Usage.day, Usage.principal).all()
    if not found and not query.since:
        return [], {}
    first = query.since or min(date.fromisoformat(day) for day, _, _ in found)
    last = query.until or max([today or today_utc()] + [date.fromisoformat(day) for day, _, _ in found])
    first = max(first, last - timedelta(days=CHART_DAYS - 1))
    days = [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]
    index = {day: n for n, day in enumerate(days)}
    series: Dict[str, List[int]] = {}
    for day, principal, amount in found:
        if day in index:
            series.setdefault(principal, [0] * len(days))[index[day]] += int(amount or 0)
    return days, series
