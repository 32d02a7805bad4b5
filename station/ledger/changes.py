"""A board's changes as the ledger records them: the lifecycle's verdict, the
stored rows and the audit entry, in the caller's write transaction.

The issuer and the ledger's line steps both change boards through these, so a
state change is decided in one table (:mod:`station.ledger.lifecycle`) and
recorded in one way.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from station.errors import ConflictError
from station.ledger import audit, certificates, devices
from station.ledger.devices import LiveDevice
from station.ledger.lifecycle import NEEDS_CERTIFICATE, QUIET_WHEN_UNCHANGED, Event, next_state
from station.ledger.rawsql import Raw
from station.ledger.schema import DeviceState

# Longest failure message stored (the board's or the token's own words).
MAX_FAILURE_MESSAGE = 2000


def apply(
    conn: Connection,
    d: LiveDevice,
    device_id: str,
    event: Event,
    now: datetime,
    station_id: str,
    **detail: Any,
) -> DeviceState:
    """Move the board by ``event`` (refused with the lifecycle's reason code) and audit it.

    ``chain_sha256`` in ``detail`` is stored with the state. Returns the new state.
    """
    target = next_state(d.state, event, device_id)
    if event in NEEDS_CERTIFICATE and not d.has_issued_certificate:
        raise ConflictError(f"device {device_id!r} has no live certificate", code="no-certificate")
    if target is d.state and event in QUIET_WHEN_UNCHANGED:
        return target
    raw = Raw(conn)
    devices.set_state(raw, d.id, target, now, station_id, chain_sha256=detail.get("chain_sha256"))
    audit.append(
        raw,
        station_id,
        "device.state",
        device_id,
        {"from": d.state.value, "to": target.value, **detail},
        now=now,
    )
    return target


def fail(
    conn: Connection,
    device_pk: int,
    device_id: str,
    code: str,
    message: str,
    now: datetime,
    station_id: str,
) -> None:
    """Record why a board failed; a verified board leaves the whitelist."""
    message = message[:MAX_FAILURE_MESSAGE]
    certificates.whitelist_remove_device(conn, device_pk)

    def target(old: DeviceState | None) -> DeviceState:
        return DeviceState.FAILED if old is None else next_state(old, Event.FAIL, device_id)

    old, new = devices.set_failed(conn, device_pk, code, message, now, station_id, target)
    audit.append(
        conn,
        station_id,
        "device.state",
        device_id,
        {
            "from": None if old is None else old.value,
            "to": new.value,
            "code": code,
            "message": message,
        },
        now=now,
    )


def revoke_certificate(
    conn: Connection,
    cert_id: int,
    device_id: str,
    serial: str,
    reason: str,
    now: datetime,
    station_id: str,
) -> None:
    certificates.mark_revoked(conn, cert_id, serial, reason, now)
    audit.append(
        conn, station_id, "cert.revoke", device_id, {"serial": serial, "reason": reason}, now=now
    )
