"""Field renewal: a device's certificate succeeded by a new one (EST simplereenroll, CMP kur).

A renewal goes through the one issuance path (``Ledger.issue(..., renews=SERIAL)``):
the same CSR policy, intent before signature, HSM signature, durable commit,
audit and duplicate-key refusal (a renewal needs a new key). What differs:

* at the intent, the live certificate named by ``renews`` must be the device's
  current one and the device verified; it moves to ``renewing``: still on the
  whitelist (the board keeps working with it), no longer the device's live
  certificate (the new intent is);
* when the new certificate commits, it is confirmed at once (EST, whose
  confirmation is its next request, and CMP's implicit confirmation, the JSON
  API): in the same transaction the old one becomes ``superseded`` (not
  revoked: it was never compromised), the whitelist moves to the new serial
  and the device stays ``verified``. A whitelist sync then stops the old one in
  AWS IoT (inactive);
* or its confirmation waits (``confirm_later``: the serial line, whose
  confirmation is the board's proof with the new key over the new chain, and
  CMP with an explicit certConf): the new certificate is ``issued`` but not
  whitelisted, the old one stays ``renewing`` and whitelisted, until
  :func:`complete` (the proof, the certConf) or :func:`abandon_pending` (a
  failed session, a rejecting certConf). An abandoned renewal's certificate left
  the station, so it is **revoked** (reason ``renewal abandoned``), never
  whitelisted: CRL and OCSP say so to every relying party, and its key stays
  spent. The old certificate is live again and the device stays ``verified``:
  a working field device is not failed by a renewal that did not finish;
* if signing fails, the intent is abandoned and the old certificate goes back
  to ``issued``: the device is not failed by a renewal the station could not sign.

A renewal intent a crash left is recovered unconfirmed (its board never got the
certificate, so superseding the one it uses would take that off the whitelist).
A renewal of the old certificate while an earlier one still waits for its
confirmation abandons the earlier one first (a session a crash or a lost
certConf left behind); one still being signed is ``issuance-in-progress``.
A renewal *from* the successor that waits (CMP kur signed with it, EST
simplereenroll or the JSON API authenticated by it: the board holds and uses
it) confirms it first, in the same transaction, then renews from it. A device
has at most one ``renewing`` certificate: :func:`begin` refuses a second
(``renewal-in-progress``).

A closed batch still renews its boards: closing stops new boards, not the field.
A renewal names the device's own batch (``renewal-other-batch`` otherwise): it
never moves a board into another batch.
The new certificate row names its predecessor in ``renews``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from station.errors import ConflictError, Kind, NotFoundError, StationError
from station.ledger import audit, certificates
from station.ledger.rawsql import Raw
from station.ledger.schema import CertState, DeviceState

# At most one renewing certificate per device: begin() refuses a second one (the
# NOT EXISTS holds against a concurrent writer too); the reads still name an order.
_SQL_BEGIN = (
    "UPDATE certificates SET state = 'renewing' WHERE id = :cid AND state = 'issued' "
    "AND NOT EXISTS (SELECT 1 FROM certificates r WHERE r.device_pk = :did "
    "AND r.state = 'renewing')"
)
_SQL_LINK = "UPDATE certificates SET renews = :old WHERE id = :cid"
_SQL_RENEWING = (
    "SELECT id, serial FROM certificates WHERE device_pk = :did AND state = 'renewing' "
    "ORDER BY id DESC"
)
_SQL_SUPERSEDE = "UPDATE certificates SET state = 'superseded' WHERE id = :cid"
_SQL_RESTORE = "UPDATE certificates SET state = 'issued' WHERE id = :cid"
_SQL_WHITELIST_DROP = "DELETE FROM whitelist WHERE device_pk = :did"
_SQL_WHITELIST_ADD = (
    "INSERT INTO whitelist (serial, device_pk, batch_id, added_at) "
    "SELECT c.serial, c.device_pk, c.batch_id, :now FROM certificates c WHERE c.id = :cid"
)
_SQL_DEVICE_VERIFIED = "UPDATE devices SET updated_at = :now, station_id = :station WHERE id = :did"
_SQL_DEVICE_STATE = "SELECT state FROM devices WHERE id = :did"
# The renewing certificate of a device and its successor, if one is signed or signing.
_SQL_PENDING = (
    "SELECT o.id AS old_id, o.serial AS old_serial, n.id AS new_id, n.serial AS new_serial, "
    "n.state AS new_state FROM certificates o LEFT OUTER JOIN certificates n "
    "ON n.device_pk = o.device_pk AND n.renews = o.serial AND n.state IN ('intent', 'issued') "
    "WHERE o.device_pk = :did AND o.state = 'renewing' ORDER BY o.id DESC, n.id DESC"
)
_SQL_CHAIN = "UPDATE devices SET chain_sha256 = :chain WHERE id = :did"


@dataclass(frozen=True, slots=True)
class Pending:
    """A renewal under way: the old certificate (``renewing``) and its successor."""

    old_id: int
    old_serial: str
    new_id: int | None
    new_serial: str | None
    new_state: CertState | None  # intent (being signed) or issued (waiting for confirmation)

    @property
    def waiting(self) -> bool:
        """Signed and committed, waiting for its confirmation."""
        return self.new_state is CertState.ISSUED


def pending(raw: Raw, device_pk: int) -> Pending | None:
    row = raw.first(_SQL_PENDING, {"did": device_pk})
    if row is None:
        return None
    state = row["new_state"]
    return Pending(
        row["old_id"],
        row["old_serial"],
        row["new_id"],
        row["new_serial"],
        None if state is None else CertState(state),
    )


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


def begin(raw: Raw, cert_id: int, device_pk: int) -> None:
    """The old certificate steps aside for the new intent (still whitelisted).

    Codes: renewal-in-progress (the device already has a renewing certificate),
    ledger-conflict (the certificate changed meanwhile).
    """
    done = raw.run(_SQL_BEGIN, {"cid": cert_id, "did": device_pk})
    if done.rowcount == 1:
        return
    other = raw.first(_SQL_RENEWING, {"did": device_pk})
    if other is not None:
        raise ConflictError(
            f"certificate {other['serial']} of this device is already being renewed",
            code="renewal-in-progress",
        )
    raise ConflictError("the certificate changed meanwhile", code="ledger-conflict")


def confirm_waiting(
    raw: Raw, station_id: str, device_pk: int, device_id: str, p: Pending, now: datetime
) -> None:
    """Confirm the waiting successor ``p`` because a request proved possession of it
    (a renewal from it: CMP kur signed with it, EST or the JSON API authenticated by
    it as the TLS client certificate). The board holds and uses it, which is what a
    certConf or the serial line's proof would have said."""
    assert p.waiting and p.new_id is not None and p.new_serial is not None
    complete(raw, station_id, device_pk, device_id, p.new_id, p.new_serial, now)
    audit.append(
        raw, station_id, "cert.renewal-confirmed", device_id,
        {"serial": p.new_serial, "by": "renewal-from-it"}, now=now,
    )  # fmt: skip


def other_batch(device_id: str, named: str) -> StationError:
    """A renewal stays in the device's own batch (station/enroll/batch_label.py's rule)."""
    return StationError(
        f"device {device_id!r} belongs to another batch than {named!r}; its certificate "
        "is renewed in its own batch",
        code="renewal-other-batch",
        kind=Kind.FORBIDDEN,
    )


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


def record_chain(raw: Raw, device_pk: int, chain_sha256: str) -> None:
    """The digest of the chain the board stored with its new certificate."""
    raw.run(_SQL_CHAIN, {"did": device_pk, "chain": chain_sha256.lower()})


def abandon_pending(
    conn: Connection,
    station_id: str,
    device_pk: int,
    device_id: str,
    code: str,
    now: datetime,
    *,
    reason: str | None = None,
) -> Pending | None:
    """Make the device's pending successor unusable and its old certificate live again.

    A successor still an intent is never signed (``failed``); one already issued
    is revoked with ``reason`` (default: ``renewal abandoned (CODE)``). Returns
    what was pending, or None when nothing was.
    """
    raw = Raw(conn)
    p = pending(raw, device_pk)
    if p is None:
        return None
    if p.new_id is not None and p.new_serial is not None:
        if p.new_state is CertState.INTENT:
            certificates.mark_abandoned(conn, p.new_id, code)
            audit.append(
                raw, station_id, "cert.failed", device_id,
                {"serial": p.new_serial, "code": code}, now=now,
            )  # fmt: skip
        else:
            why = reason or f"renewal abandoned ({code})"
            certificates.mark_revoked(conn, p.new_id, p.new_serial, why, now)
            audit.append(
                raw, station_id, "cert.revoke", device_id,
                {"serial": p.new_serial, "reason": why}, now=now,
            )  # fmt: skip
    raw.run(_SQL_RESTORE, {"cid": p.old_id})
    audit.append(
        raw, station_id, "cert.renewal-abandoned", device_id,
        {"serial": p.old_serial, "by": p.new_serial, "code": code}, now=now,
    )  # fmt: skip
    return p


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
