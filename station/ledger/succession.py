"""Field renewal: a device's certificate succeeded by a new one (EST simplereenroll, CMP kur).

A renewal goes through the one issuance path (``Ledger.issue(..., renews=SERIAL)``):
the same CSR policy, intent before signature, HSM signature, durable commit,
audit and duplicate-key refusal (a renewal needs a new key). What differs:

* at the intent, the live certificate named by ``renews`` must be the device's
  current one and the device verified; it moves to ``renewing``: still on the
  whitelist (the board keeps working with it), no longer the device's live
  certificate (the new intent is);
* when the new certificate commits, it is confirmed at once (EST, which has no
  confirmation message, and CMP's implicit confirmation): in the same
  transaction the old one becomes ``superseded`` (not revoked: it was never
  compromised), the whitelist moves to the new serial and the device stays
  ``verified``. A whitelist sync then stops the old one in AWS IoT (inactive);
* if signing fails, the intent is abandoned and the old certificate goes back
  to ``issued``: the device is not failed by a renewal the station could not sign.

A closed batch still renews its boards: closing stops new boards, not the field.
The new certificate row names its predecessor in ``renews``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from station.errors import ConflictError, NotFoundError
from station.ledger import audit
from station.ledger.rawsql import Raw
from station.ledger.schema import CertState, DeviceState

_SQL_BEGIN = "UPDATE certificates SET state = 'renewing' WHERE id = :cid AND state = 'issued'"
_SQL_LINK = "UPDATE certificates SET renews = :old WHERE id = :cid"
_SQL_RENEWING = "SELECT id, serial FROM certificates WHERE device_pk = :did AND state = 'renewing'"
_SQL_SUPERSEDE = "UPDATE certificates SET state = 'superseded' WHERE id = :cid"
_SQL_RESTORE = "UPDATE certificates SET state = 'issued' WHERE id = :cid"
_SQL_WHITELIST_DROP = "DELETE FROM whitelist WHERE device_pk = :did"
_SQL_WHITELIST_ADD = (
    "INSERT INTO whitelist (serial, device_pk, batch_id, added_at) "
    "SELECT c.serial, c.device_pk, c.batch_id, :now FROM certificates c WHERE c.id = :cid"
)
_SQL_DEVICE_VERIFIED = "UPDATE devices SET updated_at = :now, station_id = :station WHERE id = :did"
_SQL_DEVICE_STATE = "SELECT state FROM devices WHERE id = :did"


def check(d: Any, device_id: str, renews: str, pk: str) -> None:
    """May ``d`` (the device row with its live certificate) renew ``renews`` with key ``pk``?

    Codes: renewal-not-current (not the device's live certificate), bad-state
    (the device is not verified), renewal-same-key (a renewal needs a new key).
    """
    if d is None or d.cert_id is None or d.serial != renews.lower():
        raise NotFoundError(
            f"certificate {renews} is not the live certificate of device {device_id!r}",
            code="renewal-not-current",
        )
    if d.cert_state == CertState.INTENT.value:
        raise ConflictError(
            f"device {device_id!r} has an issuance in progress (serial {d.serial})",
            code="issuance-in-progress",
        )
    if d.state != DeviceState.VERIFIED.value:
        raise ConflictError(
            f"device {device_id!r} is {d.state}; only a verified device renews its certificate",
            code="bad-state",
        )
    if d.public_key_sha256 == pk:
        raise ConflictError(
            "a renewal needs a new key: this CSR carries the current certificate's key",
            code="renewal-same-key",
        )


def begin(raw: Raw, cert_id: int) -> None:
    """The old certificate steps aside for the new intent (still whitelisted)."""
    done = raw.run(_SQL_BEGIN, {"cid": cert_id})
    if done.rowcount != 1:
        raise ConflictError("the certificate changed meanwhile", code="ledger-conflict")


def link(raw: Raw, new_cert_id: int, old_serial: str) -> None:
    raw.run(_SQL_LINK, {"cid": new_cert_id, "old": old_serial})


def complete(
    raw: Raw,
    station_id: str,
    device_pk: int,
    device_id: str,
    new_cert_id: int,
    serial: str,
    now: datetime,
) -> bool:
    """At the new certificate's commit: supersede the old one, move the whitelist.

    Returns False when the device was not renewing (a first issuance).
    """
    old = raw.first(_SQL_RENEWING, {"did": device_pk})
    if old is None:
        return False
    ts = raw.ts(now)
    raw.run(_SQL_SUPERSEDE, {"cid": old["id"]})
    raw.run(_SQL_WHITELIST_DROP, {"did": device_pk})
    # The board may have failed (and left the whitelist) while the new certificate was
    # signed: only a board still verified gets its new serial whitelisted.
    state = raw.first(_SQL_DEVICE_STATE, {"did": device_pk})
    still_verified = state is not None and state["state"] == DeviceState.VERIFIED.value
    if still_verified:
        raw.run(_SQL_WHITELIST_ADD, {"cid": new_cert_id, "now": ts})
    raw.run(_SQL_DEVICE_VERIFIED, {"did": device_pk, "now": ts, "station": station_id})
    audit.append(
        raw,
        station_id,
        "cert.supersede",
        device_id,
        {
            "serial": old["serial"],
            "by": serial,
            "device_state": DeviceState.VERIFIED.value
            if still_verified
            else state and state["state"],
        },
        now=now,
    )
    return True


def undo(raw: Raw, station_id: str, device_pk: int, device_id: str, now: datetime) -> bool:
    """The new intent was abandoned: the old certificate is live again. False: no renewal."""
    old = raw.first(_SQL_RENEWING, {"did": device_pk})
    if old is None:
        return False
    raw.run(_SQL_RESTORE, {"cid": old["id"]})
    audit.append(
        raw, station_id, "cert.renewal-abandoned", device_id, {"serial": old["serial"]}, now=now
    )
    return True
