"""Devices: how boards are stored and loaded (the ``devices`` table).

Storage only: which state follows which is :mod:`station.ledger.lifecycle`'s
business, and the audit entry that describes a change is the caller's. Every
row is read by column name; states come back as :class:`DeviceState`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select, and_, bindparam, select

from station.ledger.rawsql import Raw
from station.ledger.records import Device, utc
from station.ledger.schema import CertState, DeviceState, batches, certificates, devices

# A board and its live certificate (or pending intent), if it has one; aliased
# so a query can join them with a batch's (see batches.HEAD_COLUMNS).
LIVE_COLUMNS = (
    "d.id AS d_id, d.batch_id AS d_batch_id, d.state AS d_state, c.id AS c_id, "
    "c.serial AS c_serial, c.state AS c_state, c.public_key_sha256 AS c_key, c.pem AS c_pem, "
    "c.fingerprint AS c_fingerprint"
)
LIVE_CERT_JOIN = (
    "LEFT OUTER JOIN certificates c ON c.device_pk = d.id "
    f"AND c.state IN ('{CertState.INTENT.value}', '{CertState.ISSUED.value}')"
)
_SQL_LIVE = (
    f"SELECT {LIVE_COLUMNS} FROM devices d {LIVE_CERT_JOIN} "  # noqa: S608 - fixed text
    "WHERE d.device_id = :device_id"
)
_SQL_INSERT = (
    "INSERT INTO devices (device_id, batch_id, state, attempts, station_id, created_at, "  # noqa: S608 - fixed text
    f"updated_at) VALUES (:device_id, :batch_id, '{DeviceState.NEW.value}', 0, :station_id, "
    ":now, :now) RETURNING id"
)
_SQL_MOVE = "UPDATE devices SET batch_id = :bid WHERE id = :did"

# Which timestamp column entering a state stamps (fixed names: safe in SQL text).
_STAMP = {
    DeviceState.KEY_READY: "key_ready_at",
    DeviceState.ISSUED: "issued_at",
    DeviceState.INSTALLED: "installed_at",
    DeviceState.VERIFIED: "verified_at",
    DeviceState.REVOKED: "revoked_at",
}


def _set_state_sql(state: DeviceState, with_chain: bool) -> str:
    sets = "state = :state, updated_at = :now, station_id = :station"
    if state in _STAMP:
        sets += f", {_STAMP[state]} = :now"
    if with_chain:
        sets += ", chain_sha256 = :chain"
    return f"UPDATE devices SET {sets} WHERE id = :did"  # noqa: S608 - fixed names


_SQL_SET_STATE: dict[tuple[DeviceState, bool], str] = {
    (state, chain): _set_state_sql(state, chain)
    for state in DeviceState
    if state is not DeviceState.FAILED  # set_failed() records why
    for chain in (False, True)
}


@dataclass(frozen=True, slots=True)
class LiveDevice:
    """A board as a write sees it: its state and its live certificate, if any."""

    id: int
    batch_id: int
    state: DeviceState
    cert_id: int | None
    serial: str | None
    cert_state: CertState | None
    public_key_sha256: str | None
    pem: str | None
    fingerprint: str | None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> LiveDevice:
        cert_state = row["c_state"]
        return cls(
            id=row["d_id"],
            batch_id=row["d_batch_id"],
            state=DeviceState(row["d_state"]),
            cert_id=row["c_id"],
            serial=row["c_serial"],
            cert_state=None if cert_state is None else CertState(cert_state),
            public_key_sha256=row["c_key"],
            pem=row["c_pem"],
            fingerprint=row["c_fingerprint"],
        )

    @property
    def has_issued_certificate(self) -> bool:
        return self.cert_id is not None and self.cert_state is CertState.ISSUED


def live(conn: Connection | Raw, device_id: str) -> LiveDevice | None:
    raw = conn if isinstance(conn, Raw) else Raw(conn)
    row = raw.first(_SQL_LIVE, {"device_id": device_id})
    return None if row is None else LiveDevice.of(row)


def insert(raw: Raw, device_id: str, batch_id: int, station_id: str, now: datetime) -> int:
    """A new board in state ``new``; returns its row id."""
    params = {"device_id": device_id, "batch_id": batch_id, "station_id": station_id}
    return int(raw.value(_SQL_INSERT, {**params, "now": raw.ts(now)}))


def move(raw: Raw, device_pk: int, batch_id: int) -> None:
    raw.run(_SQL_MOVE, {"bid": batch_id, "did": device_pk})


def set_state(
    raw: Raw,
    device_pk: int,
    state: DeviceState,
    now: datetime,
    station_id: str,
    *,
    chain_sha256: str | None = None,
) -> None:
    """Store a new state, stamping the time the board entered it."""
    params: dict[str, Any] = {
        "state": state.value,
        "now": raw.ts(now),
        "station": station_id,
        "did": device_pk,
    }
    if chain_sha256 is not None:
        params["chain"] = chain_sha256
    raw.run(_SQL_SET_STATE[state, chain_sha256 is not None], params)


def set_failed(
    conn: Connection,
    device_pk: int,
    code: str,
    message: str,
    now: datetime,
    station_id: str,
    state: Callable[[DeviceState | None], DeviceState] = lambda _old: DeviceState.FAILED,
) -> tuple[DeviceState | None, DeviceState]:
    """Record why a board failed (attempts + 1); returns the state it left and the one
    ``state(old)`` put it in."""
    row = conn.execute(select(devices.c.state).where(devices.c.id == device_pk)).scalar()
    old = None if row is None else DeviceState(row)
    new = state(old)
    conn.execute(
        devices.update()
        .where(devices.c.id == device_pk)
        .values(
            state=new.value,
            failure_code=code,
            failure_message=message,
            attempts=devices.c.attempts + 1,
            failed_at=now,
            updated_at=now,
            station_id=station_id,
        )
    )
    return old, new


# A board as the ledger hands it out: its batch's name and its issued
# certificate's serial joined in. One select, for listings and the hot read alike.
RECORD_SELECT: Select[Any] = select(
    devices.c.device_id,
    batches.c.name.label("batch"),
    devices.c.state,
    devices.c.failure_code,
    devices.c.failure_message,
    devices.c.attempts,
    devices.c.station_id,
    devices.c.chain_sha256,
    certificates.c.serial,
    devices.c.created_at,
    devices.c.updated_at,
    devices.c.key_ready_at,
    devices.c.issued_at,
    devices.c.installed_at,
    devices.c.verified_at,
    devices.c.failed_at,
    devices.c.revoked_at,
).select_from(
    devices.join(batches, batches.c.id == devices.c.batch_id).outerjoin(
        certificates,
        and_(
            certificates.c.device_pk == devices.c.id,
            certificates.c.state == CertState.ISSUED.value,
        ),
    )
)
_RECORD_BY_ID = RECORD_SELECT.where(devices.c.device_id == bindparam("device_id"))


def _ts(value: Any) -> datetime | None:
    """A timestamp as the driver hands it back (SQLite through the raw cursor: text)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return utc(value)


def device_of(m: Mapping[str, Any]) -> Device:
    """A :class:`Device` from a row of :data:`RECORD_SELECT`, by column name."""
    created, updated = _ts(m["created_at"]), _ts(m["updated_at"])
    assert created is not None and updated is not None  # NOT NULL
    return Device(
        device_id=m["device_id"],
        batch=m["batch"],
        state=m["state"],
        failure_code=m["failure_code"],
        failure_message=m["failure_message"],
        attempts=m["attempts"],
        station_id=m["station_id"],
        chain_sha256=m["chain_sha256"],
        serial=m["serial"],
        created_at=created,
        updated_at=updated,
        key_ready_at=_ts(m["key_ready_at"]),
        issued_at=_ts(m["issued_at"]),
        installed_at=_ts(m["installed_at"]),
        verified_at=_ts(m["verified_at"]),
        failed_at=_ts(m["failed_at"]),
        revoked_at=_ts(m["revoked_at"]),
    )


def record(conn: Connection | Raw, device_id: str) -> Device | None:
    raw = conn if isinstance(conn, Raw) else Raw(conn)
    row = raw.first_of(_RECORD_BY_ID, {"device_id": device_id})
    return None if row is None else device_of(row)
