"""How long a service lives when nobody uses it: the idle timeout and the lease.

- The idle timeout (minutes; a launch's own, else its tier's, else the site's; off by default): a RUNNING or
  UNHEALTHY service with no proxied request for that long is stopped ("idle for 30 min"). Idle time counts from the
  last request seen in any worker (the proxy's `last_activity`, which a request in flight keeps fresh), or from when
  the service became ready.
- The lease (seconds): a live service is kept while its holder renews the lease (the Python client's heartbeat,
  `POST /api/services/<id>/lease`) or its traffic is seen; once neither happened for the lease's length, it is
  stopped ("lease expired (no heartbeat for 612 s)").

Durations as users write them (`parse_idle_timeout`, `parse_lease`, and a job's time limit: `parse_time`), the
reconciler's decision (`due_stop`), when a
service will stop if nothing happens (`expected_stop`), and durations in words. Plain Python: no Flask, no database;
the service may be any object with the Service table's fields.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Optional, Tuple

from .errors import ValidationError
from .states import State

IDLE_STATES = State.ROUTABLE  # a service idles once it has answered: RUNNING or UNHEALTHY
LEASE_STATES = State.LIVE  # a lease holds from the launch on
IDLE_TIMEOUT_MAX_MINUTES = 366 * 1440
# The proxy notes traffic at most every ACTIVITY_FLUSH_SECONDS (10 s, portal/proxy/directory.py): a lease shorter than
# a few of those could lapse under steady traffic alone.
LEASE_MIN_SECONDS = 30
LEASE_MAX_SECONDS = 7 * 86400
OFF_WORDS = ("off", "never", "none")

# "1h30m", "2d", "45m", "90s": units in decreasing order, each at most once.
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_NUMBER = "[0-9]{1,7}"


def _duration_shape(units: str) -> str:
    """A JSON Schema pattern (no lookaround: pydantic's regex engine has none) for a non-empty duration in `units`."""
    return "|".join(f"{_NUMBER}{unit}" + "".join(f"({_NUMBER}{smaller})?" for smaller in units[index + 1:])
                    for index, unit in enumerate(units))


OFF_PATTERN = "|".join(OFF_WORDS)
IDLE_TIMEOUT_SHAPE = f"^({OFF_PATTERN}|{_NUMBER}|{_duration_shape('dhm')})$"  # what parse_idle_timeout takes
LEASE_SHAPE = f"^({_NUMBER}|{_duration_shape('dhms')})$"  # what parse_lease takes
_IDLE_DURATION = re.compile(_duration_shape("dhm"))
_LEASE_DURATION = re.compile(_duration_shape("dhms"))
IDLE_TIMEOUT_WORDS = "minutes, or a duration such as 30m, 1h or 1h30m (0 or off: never)"
LEASE_WORDS = f"seconds, or a duration such as 90s, 10m or 1h (at least {LEASE_MIN_SECONDS} s)"


def _seconds_of(value, field: str, expected: str, unit: int, shape: re.Pattern) -> int:
    """Seconds of an integer count of `unit` seconds, or of a string: that count, or a duration `shape` takes
    ("1h30m", "2d", "90s"); anything else is a ValidationError naming `field`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value * unit
    if isinstance(value, str):
        if re.fullmatch(_NUMBER, value):
            return int(value) * unit
        if shape.fullmatch(value):
            return sum(int(number) * _UNIT_SECONDS[letter] for number, letter in re.findall(r"([0-9]+)([dhms])", value))
    raise ValidationError(field, expected)


def parse_idle_timeout(value, field: str = "idle_timeout") -> int:
    """Minutes of an idle timeout (0: no idle stop) from an integer of minutes or a string ("30", "30m", "1h", "off");
    anything else is a ValidationError naming `field`."""
    if isinstance(value, str) and value in OFF_WORDS:
        return 0
    minutes = _seconds_of(value, field, f"expected {IDLE_TIMEOUT_WORDS}, got {value!r}", 60, _IDLE_DURATION) // 60
    if minutes < 0:
        raise ValidationError(field, f"must be at least 1 minute (or 0 for never), got {value!r}")
    if minutes > IDLE_TIMEOUT_MAX_MINUTES:
        raise ValidationError(field, f"must be at most {IDLE_TIMEOUT_MAX_MINUTES // 1440} days, got {value!r}")
    return minutes


def parse_lease(value, field: str = "lease") -> int:
    """Seconds of a lease from an integer of seconds or a string ("600", "10m", "90s"); at least LEASE_MIN_SECONDS;
    anything else is a ValidationError naming `field`."""
    seconds = _seconds_of(value, field, f"expected {LEASE_WORDS}, got {value!r}", 1, _LEASE_DURATION)
    if seconds < LEASE_MIN_SECONDS:
        raise ValidationError(field, f"must be at least {LEASE_MIN_SECONDS} seconds (the heartbeat renews it every "
                                     f"third of it), got {value!r}")
    if seconds > LEASE_MAX_SECONDS:
        raise ValidationError(field, f"must be at most {LEASE_MAX_SECONDS // 86400} days, got {value!r}")
    return seconds


def duration_words(seconds: float) -> str:
    """A duration for people: "45 s", "30 min", "1 h", "1 h 30 min", "2 d 3 h" (rounded down to its two largest
    units)."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        hours, minutes = divmod(seconds // 60, 60)
        return f"{hours} h" + (f" {minutes} min" if minutes else "")
    days, hours = divmod(seconds // 3600, 24)
    return f"{days} d" + (f" {hours} h" if hours else "")


def idle_reason(idle_timeout: int) -> str:
    """The reason of an idle stop: "idle for 30 min"."""
    return f"idle for {duration_words(idle_timeout * 60)}"


def lease_reason(silent_seconds: float) -> str:
    """The reason of a lease's end: "lease expired (no heartbeat for 612 s)"."""
    return f"lease expired (no heartbeat for {int(silent_seconds)} s)"


def _latest(*moments) -> Optional[datetime]:
    known = [moment for moment in moments if moment is not None]
    return max(known) if known else None


def idle_deadline(service) -> Optional[datetime]:
    """When an idle service stops (None: it has no idle timeout, or is not serving): its idle timeout after its last
    request, or after it became ready."""
    if not service.idle_timeout or service.state not in IDLE_STATES:
        return None
    since = _latest(service.last_activity, service.ready_at)
    return since + timedelta(minutes=service.idle_timeout) if since else None


def lease_deadline(service) -> Optional[datetime]:
    """When a leased service stops (None: no lease): the lease's length after its last heartbeat or request, or after
    its launch."""
    if not service.lease_seconds or service.state not in LEASE_STATES:
        return None
    since = _latest(service.lease_renewed_at, service.last_activity, service.created_at)
    return since + timedelta(seconds=service.lease_seconds) if since else None


def expected_stop(service) -> Optional[Tuple[datetime, str]]:
    """(when, why) the portal will stop `service` if nobody uses it or renews its lease; None when it will not (or
    it is already stopping). `why` is the reason it would stop with ("idle for 30 min", "lease expired (...)")."""
    if getattr(service, "stop_requested", False):
        return None
    found = []
    idle_at = idle_deadline(service)
    if idle_at is not None:
        found.append((idle_at, idle_reason(service.idle_timeout)))
    lease_at = lease_deadline(service)
    if lease_at is not None:
        found.append((lease_at, lease_reason(service.lease_seconds)))
    return min(found, key=lambda pair: pair[0]) if found else None


def due_stop(service, now: datetime) -> Optional[str]:
    """The reason to stop `service` at `now` (naive UTC, as the database holds times), or None to keep it: idle for
    longer than its idle timeout, or its lease not renewed (heartbeat or traffic) for longer than its length."""
    if getattr(service, "stop_requested", False):
        return None
    lease_at = lease_deadline(service)
    idle_at = idle_deadline(service)
    if lease_at is not None and now >= lease_at and (idle_at is None or lease_at < idle_at):
        return lease_reason((now - lease_at).total_seconds() + service.lease_seconds)
    if idle_at is not None and now >= idle_at:
        return idle_reason(service.idle_timeout)
    return None


# --- renewal: a service that lives beyond one job's time limit ----------------------------------------------------

RENEW_WORDS = ("true (renewed until stopped), false, how long it lives in all (8h, 2d) or when it ends "
               "(2026-12-01T18:00, the portal's local time, or with Z or an offset)")
END_TIME_SHAPE = "[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9:.]{5,15}(Z|[+-][0-9:]{4,5})?"  # an ISO 8601 time, as parse_end
END_SHAPE = f"^({_duration_shape('dhm')}|{END_TIME_SHAPE})$"  # what parse_end takes: a duration from now, or a time
RENEW_SHAPE = END_SHAPE
_END_DURATION = re.compile(_duration_shape("dhm"))
_END = re.compile(END_SHAPE)
RENEW_MAX_SECONDS = 366 * 86400
RENEW_MIN_SECONDS = 2 * 60  # a job of a minute, and a successor


def parse_end(value, now: datetime, field: str, expected: str, shortest: int, longest: int) -> datetime:
    """The end a user wrote: a duration from `now` ("8h", "2d", "1h30m") or a time (ISO 8601; naive: the portal's
    local time), at least `shortest` and at most `longest` seconds after `now`. `now` and the end are naive UTC, as
    the database holds times; anything else is a ValidationError naming `field` (`expected`: what it takes)."""
    if not isinstance(value, str) or not _END.fullmatch(value):
        raise ValidationError(field, f"expected {expected}, got {value!r}")
    if _END_DURATION.fullmatch(value):
        seconds = sum(int(number) * _UNIT_SECONDS[letter] for number, letter in re.findall(r"([0-9]+)([dhm])", value))
        if seconds > longest:
            raise ValidationError(field, f"must end within {longest // 86400} days, got {value!r}")
        end = now + timedelta(seconds=seconds)
    else:
        try:
            moment = datetime.fromisoformat(value)
            moment = moment.astimezone(timezone.utc)  # a naive time is taken as the portal's local time
        except (ValueError, OverflowError):  # not a time, or one at the calendar's ends
            raise ValidationError(field, f"expected {expected}, got {value!r}") from None
        end = moment.replace(tzinfo=None)
    seconds = (end - now).total_seconds()
    if seconds < shortest:
        if shortest <= 1:
            raise ValidationError(field, f"must be in the future, got {value!r}")
        raise ValidationError(field, f"must end at least {duration_words(shortest).replace('min', 'minutes')} from "
                                     f"now, got {value!r}")
    if seconds > longest:
        raise ValidationError(field, f"must end within {longest // 86400} days, got {value!r}")
    return end


def parse_renewal(value, now: datetime, field: str = "renew") -> Tuple[bool, Optional[datetime]]:
    """(renew, until) of a launch's `renew`: true (until stopped: until None), false, a total lifetime from `now`
    ("8h", "2d") or an end time (parse_end); anything else is a ValidationError naming `field`."""
    if isinstance(value, bool):
        return value, None
    return True, parse_end(value, now, field, RENEW_WORDS, RENEW_MIN_SECONDS, RENEW_MAX_SECONDS)


RENEW_MARGIN_SECONDS = 15.0  # besides twice the last start-up and the drain: the scheduler's own delays


def renewal_lead(startup_seconds: Optional[float], drain_seconds: float) -> float:
    """How long before its job's end a renewed service's successor is submitted: twice the last generation's start-up
    (queue wait, model load, first health check), the drain of the open streams, and a margin."""
    return 2 * (startup_seconds or 60.0) + drain_seconds + RENEW_MARGIN_SECONDS


def job_end(service) -> Optional[datetime]:
    """When the service's current job reaches its time limit (None before it started)."""
    if not service.job_started_at:
        return None
    return service.job_started_at + timedelta(minutes=service.time_limit)


def renewal_ends(service, session_end: Optional[datetime]) -> Optional[datetime]:
    """The latest a renewed service lives: its own end (`renew_until`), and no later than the session it belongs to
    (None: until stopped)."""
    ends = [moment for moment in (service.renew_until, session_end) if moment is not None]
    return min(ends) if ends else None


def successor_due(service, now: datetime, drain_seconds: float, session_end: Optional[datetime]) -> bool:
    """Whether a renewed RUNNING service's successor should be submitted at `now`: its current job ends within the
    lead (renewal_lead), but no earlier than half-way through that job, and the service is to live past the job's
    end."""
    if not service.renew or service.state != State.RUNNING or getattr(service, "stop_requested", False):
        return False
    end = job_end(service)
    if end is None or service.ready_at is None:
        return False
    until = renewal_ends(service, session_end)
    if until is not None and until <= end + timedelta(seconds=RENEW_MARGIN_SECONDS):
        return False
    startup = (service.ready_at - (service.submitted_at or service.created_at)).total_seconds()
    halfway = service.job_started_at + timedelta(minutes=service.time_limit / 2)
    return now >= max(halfway, end - timedelta(seconds=renewal_lead(startup, drain_seconds)))


def successor_minutes(service, now: datetime, session_end: Optional[datetime]) -> int:
    """The time limit of a successor submitted at `now`: the service's own, or what is left of its renewal (rounded up,
    at least a minute)."""
    until = renewal_ends(service, session_end)
    if until is None:
        return service.time_limit
    left = int(-(-(until - now).total_seconds() // 60))
    return max(1, min(service.time_limit, left))


def parse_time(value) -> int:
    """Minutes from an integer, or a Slurm-style "MM", "HH:MM:SS" or "D-HH:MM" string."""
    if isinstance(value, bool):
        raise ValidationError("time", f"expected minutes or HH:MM:SS, got {value!r}")
    if isinstance(value, int):
        minutes = value
    elif isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
        minutes = int(value)
    elif isinstance(value, str) and re.fullmatch(r"([0-9]+-)?[0-9]+(:[0-9][0-9]){1,2}", value):
        text = value
        days = 0
        if "-" in text:
            day_text, text = text.split("-", 1)
            days = int(day_text)
        parts = [int(part) for part in text.split(":")]
        if len(parts) == 3:
            hours, mins, secs = parts
        elif days:
            hours, mins, secs = parts[0], parts[1], 0
        else:
            hours, mins, secs = 0, parts[0], parts[1]
        minutes = days * 1440 + hours * 60 + mins + (1 if secs else 0)
    else:
        raise ValidationError("time", f"expected minutes or HH:MM:SS, got {value!r}")
    if minutes < 1:
        raise ValidationError("time", "must be at least 1 minute")
    return minutes
