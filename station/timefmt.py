"""Timestamps as the station shows them: RFC 3339, UTC, ``Z``.

One helper for every timestamp a person or a program reads (CLI, reports,
line status, AWS state). The audit log keeps its own stored text (it is
hashed as written: see station/ledger/audit.py).
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime, *, timespec: str = "auto") -> str:
    """``2026-12-07T09:30:00.123Z``: UTC (a naive value is taken as UTC), ``Z`` for the zone."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
