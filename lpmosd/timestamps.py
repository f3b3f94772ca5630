"""Timestamps as stored: RFC 3339 UTC with second precision (``2026-01-30T12:00:00Z``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Final

from lpmosd.errors import ValidationError

__all__ = ["format_ts", "norm_now", "parse_ts", "utcnow"]


_TS_RE: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.\d{1,9})?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


def utcnow() -> datetime:
    """The current time, aware UTC, truncated to whole seconds (the stored precision)."""
    return datetime.now(UTC).replace(microsecond=0)


def format_ts(value: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with second precision: ``2026-01-30T12:00:00Z``.

    Raises ValueError for a naive datetime (a programming error, not bad input).
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("format_ts needs an aware datetime")
    v = value.astimezone(UTC)
    # f-string, not strftime: %Y does not zero-pad years < 1000 on glibc.
    return f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}Z"


def parse_ts(value: str, field: str = "timestamp") -> datetime:
    """Parse an RFC 3339 timestamp into an aware UTC datetime, truncated to seconds.

    Any offset is accepted (and converted); fractions of a second are dropped, since Go
    writers may send nanoseconds. Anything else raises ValidationError naming ``field``.
    """
    m = _TS_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValidationError(
            f"{field} must be an RFC 3339 timestamp like 2026-01-30T12:00:00Z", field=field
        )
    y, mo, d, h, mi, s, z, sign, oh, om = m.groups()
    try:
        if z:
            tz: timezone = UTC
        else:
            if int(oh) > 23 or int(om) > 59:
                raise ValueError("offset out of range")
            off = timedelta(hours=int(oh), minutes=int(om))
            tz = timezone(-off if sign == "-" else off)
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=tz)
        return dt.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValidationError(f"{field} is not a valid date and time", field=field) from None


def norm_now(now: datetime) -> datetime:
    """``now`` in UTC, truncated to seconds; ValueError for a naive datetime."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    return now.astimezone(UTC).replace(microsecond=0)
