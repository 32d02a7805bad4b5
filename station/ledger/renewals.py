"""A renewal whose confirmation comes after its commit (station.ledger.succession).

The serial line confirms a renewal with the board's proof of possession: the
board signs the proof message with its **new** key after it stored the **new**
chain (:meth:`Renewals.challenge`, :meth:`Renewals.prove`). CMP confirms with the
board's certConf (:meth:`Renewals.confirm`). A session that fails, or a certConf
that rejects, abandons the renewal (:meth:`Renewals.abandon`): the new
certificate is revoked, the old one is live again, the device stays verified.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine

from station.errors import ConflictError, PolicyError, StationError
from station.ledger import audit, challenges, devices, proof, succession
from station.ledger.devices import LiveDevice
from station.ledger.groupcommit import GroupCommitter
from station.ledger.rawsql import Raw
from station.ledger.reads import unknown_device


@dataclass(frozen=True, slots=True)
class PendingRenewal:
    """A device's renewal waiting for its confirmation."""

    device_id: str
    old_serial: str  # still live and whitelisted
    new_serial: str  # issued, not whitelisted


def _now() -> datetime:
    return datetime.now(UTC)


def _no_renewal(device_id: str) -> ConflictError:
    return ConflictError(
        f"device {device_id!r} has no renewal waiting for its confirmation", code="no-renewal"
    )


class Renewals:
    def __init__(self, engine: Engine, writes: GroupCommitter, station_id: str) -> None:
        self._engine = engine
        self._writes = writes
        self._station_id = station_id

    def _waiting(self, raw: Raw, device_id: str) -> tuple[LiveDevice, succession.Pending]:
        d = devices.live(raw, device_id)
        if d is None:
            raise unknown_device(device_id)
        p = succession.pending(raw, d.id)
        if p is None or not p.waiting or p.new_serial != d.serial:
            raise _no_renewal(device_id)
        return d, p

    def pending(self, device_id: str) -> PendingRenewal | None:
        """The device's renewal waiting for its confirmation, or None."""
        with self._engine.connect() as conn:
            try:
                _, p = self._waiting(Raw(conn), device_id)
            except StationError:
                return None
        assert p.new_serial is not None
        return PendingRenewal(device_id, p.old_serial, p.new_serial)

    def challenge(self, device_id: str, *, ttl: timedelta = proof.CHALLENGE_TTL) -> bytes:
        """A nonce for the board to sign with its new key. Codes: unknown-device, no-renewal."""
        nonce = proof.new_nonce()
        now = _now()

        def write(conn: Connection) -> None:
            raw = Raw(conn)
            d, _ = self._waiting(raw, device_id)
            challenges.replace(raw, nonce, d.id, now, now + ttl)

        self._writes.submit(write, durable=False)
        return nonce

    def prove(
        self, device_id: str, nonce: bytes, signature: bytes, *, chain_sha256: str | None = None
    ) -> PendingRenewal:
        """The board's signature over the proof message with the new certificate's key
        confirms the renewal: the old certificate is superseded and the whitelist
        moves to the new serial (``chain_sha256``: the chain the board stored).

        The challenge is spent whatever the answer; a refusal is audited
        (``proof.refused``) and leaves the renewal pending for the caller to abandon.
        Codes: unknown-device, no-renewal, no-challenge, challenge-expired, bad-proof.
        """
        now = _now()

        def write(conn: Connection) -> PendingRenewal | StationError:
            raw = Raw(conn)
            d, p = self._waiting(raw, device_id)
            expires_at = challenges.spend(raw, nonce, d.id)
            failure: StationError | None
            if expires_at is None:
                failure = PolicyError(
                    f"no open challenge with this nonce for {device_id!r}", code="no-challenge"
                )
            else:
                failure = proof.refusal(
                    device_id, expires_at=expires_at, now=now, certificate_pem=d.pem,
                    nonce=nonce, signature=signature,
                )  # fmt: skip
            if failure is not None:
                detail = {"code": failure.code, "serial": p.new_serial}
                audit.append(raw, self._station_id, "proof.refused", device_id, detail, now=now)
                return failure
            return self._complete(raw, d, p, device_id, now, chain_sha256)

        # Durable: a good proof moves the whitelist; a refused one spends the nonce.
        done = self._writes.submit(write, durable=True)
        if isinstance(done, StationError):
            raise done
        return done

    def confirm(self, device_id: str, serial: str) -> bool:
        """Confirm the renewal whose new certificate is ``serial`` (CMP certConf);
        False when no such renewal waits (a first enrolment, or one revoked meanwhile)."""
        now = _now()

        def write(conn: Connection) -> bool:
            raw = Raw(conn)
            try:
                d, p = self._waiting(raw, device_id)
            except StationError:
                return False
            if p.new_serial != serial.lower():
                return False
            self._complete(raw, d, p, device_id, now, None)
            return True

        return self._writes.submit(write, durable=True)

    def abandon(self, device_id: str, code: str, *, serial: str | None = None) -> bool:
        """The renewal failed (a session that did not finish, a rejecting certConf): its
        certificate is revoked and never whitelisted, the old one is live again and the
        device stays as it was. ``serial``: only the renewal to that certificate.
        False when no renewal waits."""
        now = _now()

        def write(conn: Connection) -> bool:
            raw = Raw(conn)
            try:
                d, p = self._waiting(raw, device_id)
            except StationError:
                return False
            if serial is not None and p.new_serial != serial.lower():
                return False
            succession.abandon_pending(conn, self._station_id, d.id, device_id, code, now)
            return True

        return self._writes.submit(write, durable=True)

    def _complete(
        self,
        raw: Raw,
        d: LiveDevice,
        p: succession.Pending,
        device_id: str,
        now: datetime,
        chain_sha256: str | None,
    ) -> PendingRenewal:
        assert p.new_id is not None and p.new_serial is not None
        # A board failed meanwhile (off the whitelist): complete() supersedes, whitelists nothing.
        succession.complete(raw, self._station_id, d.id, device_id, p.new_id, p.new_serial, now)
        if chain_sha256 is not None:
            succession.record_chain(raw, d.id, chain_sha256)
        return PendingRenewal(device_id, p.old_serial, p.new_serial)
