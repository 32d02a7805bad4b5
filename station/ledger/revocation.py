"""A revocation that holds: what a revoked board may no longer do.

A board an admin revoked (stolen, returned, compromised) stays ``revoked`` on
every channel: the HTTP API, the serial line and the CLI alike are refused
``device-revoked`` when they ask for a key step, a certificate or a challenge
for it. Only ``Ledger.issue(..., reprovision=True, reason=...)`` (an operator or
admin, never a board token) brings it back, and that is audited
(``device.reprovision`` with the reason). A failure recorded on a revoked board
leaves it revoked: a failed board may retry, a revoked one may not.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection

from station.errors import ConflictError, NotFoundError
from station.ledger import changes, succession
from station.ledger.devices import LiveDevice
from station.ledger.lifecycle import Event
from station.ledger.rawsql import Raw


def device_revoked(device_id: str) -> ConflictError:
    return ConflictError(
        f"device {device_id!r} is revoked; only an operator re-provisioning it with a "
        "reason brings it back",
        code="device-revoked",
    )


def revoke_device(
    conn: Connection,
    d: LiveDevice,
    device_id: str,
    reason: str,
    now: datetime,
    station_id: str,
    *,
    serial: str | None = None,
) -> None:
    """Revoke the board's live certificate and make it ``revoked``.

    A board with a renewal under way (station.ledger.succession) has its live
    certificate ``renewing``, not ``issued``: that one is revoked, and the pending
    successor with it (an intent is never signed, a certificate waiting for its
    confirmation is revoked too), so nothing of the board stays whitelisted or
    can be confirmed later. ``serial``: only if that is the board's live certificate
    (its renewing one, or the successor waiting for its confirmation), checked in
    the same transaction. Codes: no-certificate, certificate-not-live.
    """
    p = succession.pending(Raw(conn), d.id)
    if serial is not None:
        live = {p.old_serial, p.new_serial} if p is not None else set()
        if d.has_issued_certificate:
            live.add(d.serial)
        if serial.lower() not in live:
            raise ConflictError(
                f"certificate {serial} is not the live certificate of device {device_id!r}",
                code="certificate-not-live",
            )
    if p is not None:
        succession.abandon_pending(conn, station_id, d.id, device_id, "device-revoked", now,
                                   reason=reason)  # fmt: skip
        cert_id, serial = p.old_id, p.old_serial
    elif d.has_issued_certificate:
        assert d.cert_id is not None and d.serial is not None
        cert_id, serial = d.cert_id, d.serial
    else:
        raise NotFoundError(f"device {device_id!r} has no live certificate", code="no-certificate")
    changes.revoke_certificate(conn, cert_id, device_id, serial, reason, now, station_id)
    changes.apply(conn, d, device_id, Event.REVOKE, now, station_id)
