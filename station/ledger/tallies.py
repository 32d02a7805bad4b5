"""Aggregates of the ledger for metrics: what every channel did, read at scrape time.

Counters kept in a process tell only what that process saw (one API worker,
not the line, not `station sign`). These are computed by the database from
the ledger every worker and the line write to, so one scrape of any worker
tells the truth for all of them. Each is one grouped query; none reads rows
into Python, so a scrape costs the same for 8 boards and 100,000.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, case, func, select

from station.ledger.schema import batches, certificates, devices

# Steps of a verified board, each from one ledger timestamp to the next.
# "cycle" is the whole of it, from first enrolment (retries included) to verification.
STEPS: dict[str, tuple[str, str]] = {
    "issue": ("key_ready_at", "issued_at"),
    "install": ("issued_at", "installed_at"),
    "prove": ("installed_at", "verified_at"),
    "cycle": ("created_at", "verified_at"),
}
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


@dataclass
class StepHistogram:
    buckets: list[tuple[float, int]]  # (upper bound, cumulative count)
    count: int
    total: float


@dataclass
class Tallies:
    issued: dict[str, int] = field(default_factory=dict)  # batch -> certificates issued
    revoked: dict[str, int] = field(default_factory=dict)  # batch -> certificates revoked
    failed_by_reason: dict[tuple[str, str], int] = field(default_factory=dict)
    failed_attempts: dict[str, int] = field(default_factory=dict)  # batch -> sum(attempts)
    steps: dict[str, StepHistogram] = field(default_factory=dict)


def _seconds(dialect: str, later: Any, earlier: Any) -> Any:
    if dialect == "sqlite":
        return (func.julianday(later) - func.julianday(earlier)) * 86400.0
    return func.extract("epoch", later - earlier)


def tallies(engine: Engine) -> Tallies:
    out = Tallies()
    dialect = engine.dialect.name
    with engine.connect() as conn:
        rows = conn.execute(
            select(batches.c.name, certificates.c.state, func.count())
            .select_from(certificates.join(batches, batches.c.id == certificates.c.batch_id))
            .where(certificates.c.issued_at.is_not(None))
            .group_by(batches.c.name, certificates.c.state)
        )
        for name, state, n in rows:
            out.issued[name] = out.issued.get(name, 0) + n
            if state == "revoked":
                out.revoked[name] = out.revoked.get(name, 0) + n
        joined = devices.join(batches, batches.c.id == devices.c.batch_id)
        for name, code, n in conn.execute(
            select(batches.c.name, devices.c.failure_code, func.count())
            .select_from(joined)
            .where(devices.c.state == "failed")
            .group_by(batches.c.name, devices.c.failure_code)
        ):
            out.failed_by_reason[(name, code or "unknown")] = n
        for name, n in conn.execute(
            select(batches.c.name, func.coalesce(func.sum(devices.c.attempts), 0))
            .select_from(joined)
            .group_by(batches.c.name)
        ):
            out.failed_attempts[name] = int(n)
        for step, (start, end) in STEPS.items():
            a, b = devices.c[start], devices.c[end]
            seconds = _seconds(dialect, b, a)
            done = and_(devices.c.state == "verified", a.is_not(None), b.is_not(None))
            cols = [func.count(), func.coalesce(func.sum(seconds), 0.0)] + [
                func.coalesce(func.sum(case((seconds <= le, 1), else_=0)), 0) for le in STEP_BUCKETS
            ]
            row = conn.execute(select(*cols).where(done)).one()
            count, total = int(row[0]), float(row[1])
            out.steps[step] = StepHistogram(
                [(le, int(n)) for le, n in zip(STEP_BUCKETS, row[2:], strict=True)], count, total
            )
    return out


@dataclass
class BatchQuality:
    first_pass: int = 0  # verified with no recorded failure
    failures: dict[str, int] = field(default_factory=dict)  # boards now failed, by reason


def batch_quality(engine: Engine, names: list[str]) -> dict[str, BatchQuality]:
    """First-pass boards and failures by reason of the named batches (two grouped queries)."""
    out = {name: BatchQuality() for name in names}
    if not names:
        return out
    joined = devices.join(batches, batches.c.id == devices.c.batch_id)
    with engine.connect() as conn:
        for name, n in conn.execute(
            select(batches.c.name, func.count())
            .select_from(joined)
            .where(
                batches.c.name.in_(names),
                devices.c.verified_at.is_not(None),
                devices.c.attempts == 0,
            )
            .group_by(batches.c.name)
        ):
            out[name].first_pass = n
        for name, code, n in conn.execute(
            select(batches.c.name, devices.c.failure_code, func.count())
            .select_from(joined)
            .where(batches.c.name.in_(names), devices.c.state == "failed")
            .group_by(batches.c.name, devices.c.failure_code)
        ):
            out[name].failures[code or "unknown"] = n
    return out


def verified_per_minute(engine: Engine, now: datetime, minutes: int = 60) -> list[int]:
    """Boards verified in each of the last ``minutes`` minutes, oldest first (every batch)."""
    since = now - timedelta(minutes=minutes)
    counts = [0] * minutes
    with engine.connect() as conn:
        for (at,) in conn.execute(
            select(devices.c.verified_at).where(devices.c.verified_at >= since)
        ):
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            i = int((at - since).total_seconds() // 60)
            if 0 <= i < minutes:
                counts[i] += 1
    return counts
