"""Batches: how they are stored and loaded (the ``batches`` table).

Storage only: no policy, no audit, no issuance. The statements the line runs
for every board are kept here as SQL text beside the table they touch; every
row is read by column name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select

from station.errors import ConflictError
from station.ledger.rawsql import Raw
from station.ledger.records import Batch, utc
from station.ledger.schema import BatchState, batches, devices

# The columns issuance and enrolment check, aliased so a query can join them
# with a device's (see devices.LIVE_COLUMNS).
HEAD_COLUMNS = (
    "b.id AS b_id, b.name AS b_name, b.state AS b_state, b.planned_count AS b_planned, "
    "b.device_count AS b_devices, b.subject_template AS b_template, b.days AS b_days, "
    "b.crl_url AS b_crl_url, b.ocsp_url AS b_ocsp_url"
)
_SQL_HEAD = f"SELECT {HEAD_COLUMNS} FROM batches b WHERE b.name = :name"  # noqa: S608
_SQL_COUNT = "UPDATE batches SET device_count = device_count + :delta WHERE id = :bid"


@dataclass(frozen=True, slots=True)
class BatchHead:
    """What a write needs to know of a batch: identity, state, room, template."""

    id: int
    name: str
    state: BatchState
    planned_count: int
    device_count: int
    subject_template: str
    days: int
    crl_url: str | None = None
    ocsp_url: str | None = None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> BatchHead:
        return cls(
            id=row["b_id"],
            name=row["b_name"],
            state=BatchState(row["b_state"]),
            planned_count=row["b_planned"],
            device_count=row["b_devices"],
            subject_template=row["b_template"],
            days=row["b_days"],
            crl_url=row["b_crl_url"],
            ocsp_url=row["b_ocsp_url"],
        )

    @property
    def is_open(self) -> bool:
        return self.state is BatchState.OPEN

    @property
    def is_full(self) -> bool:
        """Enrolled boards reach the plan (failed ones included): see :func:`plan_full`."""
        return self.device_count >= self.planned_count


_SQL_FAILED = "SELECT COUNT(*) FROM devices WHERE batch_id = :bid AND state = 'failed'"


def plan_full(raw: Raw, b: BatchHead) -> bool:
    """True when ``planned_count`` of the batch's boards are not failed (README, "Batches").

    The plan is about boards shipped: a failed board does not use it up, so a
    replacement may take its place. Counted only at the plan's edge, so the usual
    enrolment reads no COUNT(*).
    """
    if not b.is_full:
        return False
    failed = int(raw.value(_SQL_FAILED, {"bid": b.id}) or 0)
    return b.device_count - failed >= b.planned_count


def plan_full_error(b: BatchHead) -> ConflictError:
    return ConflictError(
        f"batch {b.name!r} has its {b.planned_count} planned boards (failed boards not counted)",
        code="batch-full",
    )


def head(conn: Connection | Raw, name: str) -> BatchHead | None:
    raw = conn if isinstance(conn, Raw) else Raw(conn)
    row = raw.first(_SQL_HEAD, {"name": name})
    return None if row is None else BatchHead.of(row)


def count_device(raw: Raw, batch_id: int, delta: int) -> None:
    """A device joined (+1) or left (-1) the batch."""
    raw.run(_SQL_COUNT, {"bid": batch_id, "delta": delta})


def insert(
    conn: Connection,
    *,
    name: str,
    product: str,
    planned_count: int,
    key_mode: str,
    subject_template: str,
    days: int,
    operator: str | None,
    station_id: str,
    now: datetime,
    crl_url: str | None = None,
    ocsp_url: str | None = None,
) -> None:
    conn.execute(
        batches.insert().values(
            name=name,
            product=product,
            planned_count=planned_count,
            key_mode=key_mode,
            subject_template=subject_template,
            days=days,
            state=BatchState.OPEN.value,
            operator=operator,
            station_id=station_id,
            device_count=0,
            created_at=now,
            crl_url=crl_url,
            ocsp_url=ocsp_url,
        )
    )


def close(conn: Connection, batch_id: int, now: datetime) -> None:
    conn.execute(
        batches.update()
        .where(batches.c.id == batch_id)
        .values(state=BatchState.CLOSED.value, closed_at=now)
    )


def _batch(row: Any) -> Batch:
    m = row._mapping
    created = utc(m["created_at"])
    assert created is not None  # NOT NULL
    return Batch(
        name=m["name"],
        product=m["product"],
        planned_count=m["planned_count"],
        key_mode=m["key_mode"],
        subject_template=m["subject_template"],
        days=m["days"],
        state=m["state"],
        operator=m["operator"],
        station_id=m["station_id"],
        device_count=m["device_count"],
        created_at=created,
        closed_at=utc(m["closed_at"]),
        crl_url=m["crl_url"],
        ocsp_url=m["ocsp_url"],
    )


def load(conn: Connection, name: str) -> Batch | None:
    row = conn.execute(select(batches).where(batches.c.name == name)).first()
    return None if row is None else _batch(row)


def load_all(conn: Connection, *, state: str | None = None) -> list[Batch]:
    stmt = select(batches).order_by(batches.c.created_at, batches.c.id)
    if state is not None:
        stmt = stmt.where(batches.c.state == state)
    return [_batch(r) for r in conn.execute(stmt)]


def device_counts(conn: Connection, batch: str | None = None) -> dict[str, dict[str, int]]:
    """Devices per batch and state: ``{batch: {state: n}}``."""
    stmt = (
        select(batches.c.name, devices.c.state, func.count().label("n"))
        .select_from(devices.join(batches, batches.c.id == devices.c.batch_id))
        .group_by(batches.c.name, devices.c.state)
    )
    if batch is not None:
        stmt = stmt.where(batches.c.name == batch)
    out: dict[str, dict[str, int]] = {}
    for row in conn.execute(stmt):
        out.setdefault(row.name, {})[row.state] = row.n
    return out
