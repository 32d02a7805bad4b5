"""Verified on first authenticated contact: how EST and CMP boards prove their key.

The serial line proves possession with a nonce the board signs. A board enrolled
over EST or CMP proves the same the first time it authenticates a request with
its new certificate: it could only do so holding the certificate's key, and
having installed the certificate. What counts as that contact is the channel's:

* EST: the certificate presented as the TLS client certificate on any EST
  request (the handshake's CertificateVerify is a signature with the key);
* CMP: a request protected by a signature with the certificate (a renewal).

The rule lives here, once: the certificate must be the board's live one (not a
superseded or revoked one still accepted by TLS), issued, and the board in a
state a proof of possession moves to verified (the lifecycle's
``AWAITING_PROOF``: issued, installed). Then the board is verified and its serial
whitelisted, in one write with the audit entry naming the proof; otherwise
nothing changes (a verified board stays as it is; a failed or revoked one is not
brought back by a handshake).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Connection, Engine

from station.errors import ConflictError
from station.ledger import certificates, changes, devices
from station.ledger.devices import LiveDevice
from station.ledger.groupcommit import GroupCommitter
from station.ledger.lifecycle import AWAITING_PROOF, Event
from station.ledger.rawsql import Raw
from station.ledger.schema import CertState, DeviceState


def awaits_proof_by(d: LiveDevice | None, serial: str) -> bool:
    """Would a request authenticated by certificate ``serial`` verify this board?"""
    return (
        d is not None
        and d.serial == serial.lower()
        and d.cert_state is CertState.ISSUED
        and d.state in AWAITING_PROOF
    )


def require_live(d: LiveDevice, device_id: str, serial: str | None) -> LiveDevice:
    """``d``, if certificate ``serial`` (None: any) is the board's live, issued one.

    Codes: certificate-not-live.
    """
    if serial is None:
        return d
    if d.serial != serial.lower() or d.cert_state is not CertState.ISSUED:
        raise ConflictError(
            f"certificate {serial} is not the live certificate of device {device_id!r}",
            code="certificate-not-live",
        )
    return d


def verify(
    conn: Connection, d: LiveDevice, device_id: str, now: datetime, station_id: str, **detail: str
) -> None:
    """The board proved its key: verified, its live serial whitelisted (one transaction)."""
    if d.state is DeviceState.VERIFIED:
        return
    target = changes.apply(
        conn, d, device_id, Event.VERIFY, now, station_id, serial=d.serial, **detail
    )
    assert target is DeviceState.VERIFIED and d.serial is not None
    certificates.whitelist_add(Raw(conn), d.serial, d.id, d.batch_id, now)


class Contact:
    """``Ledger.contact``: the rule above, for the EST and CMP routes."""

    def __init__(self, engine: Engine, writes: GroupCommitter, station_id: str) -> None:
        self._engine = engine
        self._writes = writes
        self._station_id = station_id

    def authenticated(self, device_id: str, serial: str, *, proof: str) -> bool:
        """Certificate ``serial`` of ``device_id`` authenticated a request (``proof``
        says how, for the audit: ``est-tls-client-certificate``, ``cmp-signature``).

        Returns True when this contact verified the board. A read first: a board
        already verified (every later request) costs no write.
        """
        with self._engine.connect() as conn:
            if not awaits_proof_by(devices.live(conn, device_id), serial):
                return False
        now = datetime.now(UTC)

        def write(conn: Connection) -> bool:
            d = devices.live(conn, device_id)  # again, in the write: it may have moved
            if d is None or not awaits_proof_by(d, serial):
                return False
            verify(conn, d, device_id, now, self._station_id, proof=proof)
            return True

        return self._writes.submit(write, durable=True)
