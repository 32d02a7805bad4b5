"""The issuer: every way a certificate is asked for ends here.

Issuance survives a crash at any instant:

1. check the CSR (policy) and the batch, and record the intent (device, CSR,
   reserved serial, signing instant), not yet synced;
2. sign through the token (any :class:`Signer`);
3. commit the certificate, synced;
4. only then hand it out.

A crash before 3 leaves an ``intent`` row that :meth:`Issuer.recover` signs
again (same serial, same instant, so the same certificate body) or marks
failed; a certificate is never handed out before the ledger holds it.
The issuer knows the repositories and the unit of work, not HTTP or serial frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError

from station import policy
from station.ca import DeviceProfile, new_serial
from station.errors import ConflictError, Kind, PolicyError, StationError
from station.ledger import audit, batches, certificates, changes, devices, succession
from station.ledger.batches import BatchHead
from station.ledger.certificates import SignedCertificate
from station.ledger.devices import LiveDevice
from station.ledger.groupcommit import GroupCommitter
from station.ledger.lifecycle import Event
from station.ledger.rawsql import Raw
from station.ledger.reads import unknown_batch
from station.ledger.records import IssueResult, RecoveryReport
from station.ledger.revocation import device_revoked
from station.ledger.schema import CertState, DeviceState
from station.ledger.textrules import check_text
from station.request import CertRequest, load_request
from station.whitelist import serial_hex

# A batch whose template is "*" issues the subject the CSR presents (after
# policy); the device id is the CSR's CN. `station sign` without --batch uses it.
AS_PRESENTED = "*"

# Everything the intent checks, in one statement: the batch, the board and its
# live certificate if any, and which board (if any) already holds this key.
SQL_INTENT_CHECKS = (
    f"SELECT {batches.HEAD_COLUMNS}, {devices.LIVE_COLUMNS}, "  # noqa: S608 - fixed text
    f"{certificates.KEY_HOLDER_COLUMNS} "
    f"FROM batches b LEFT OUTER JOIN devices d ON d.device_id = :device_id "
    f"{devices.LIVE_CERT_JOIN} WHERE b.name = :name"
)


#: Recovery's code for an intent whose key the station made and lost in a crash.
KEY_LOST = "serverkeygen-key-lost"
_KEY_LOST_MESSAGE = (
    "the station made this board's key (EST serverkeygen) and lost it in a crash before "
    "answering; nothing was issued: the board should ask again (serverkeygen)"
)


class Signer(Protocol):
    """What the issuer needs of a CA: its chain and a signature in the token."""

    @property
    def chain_pem(self) -> bytes: ...

    def issue(
        self,
        csr: CertRequest,
        *,
        subject: x509.Name,
        serial: int,
        profile: DeviceProfile,
        now: datetime | None = None,
    ) -> x509.Certificate: ...


def subject_for(template: str, device_id: str, csr: CertRequest) -> x509.Name:
    """The subject the certificate gets; refuses a CSR that does not fit the batch."""
    presented = csr.subject  # parsed anew on every access: once here
    cn = policy.common_name(presented)
    if template == AS_PRESENTED:
        if cn is None:
            raise PolicyError("the CSR has no single CN to name the device", code="missing-cn")
        if cn != device_id:
            raise PolicyError(
                f"the CSR names device {cn!r}, the board is {device_id!r}",
                code="device-id-mismatch",
            )
        return presented
    expected = policy.subject_from_template(template, device_id)
    if cn is not None and cn != device_id and policy.common_name(expected) == device_id:
        raise PolicyError(
            f"the CSR names device {cn!r}, the board's hardware id is {device_id!r}",
            code="device-id-mismatch",
        )
    policy.check_subject(presented, expected)
    return expected


def batch_closed(batch: str) -> ConflictError:
    return ConflictError(f"batch {batch!r} is closed", code="batch-closed")


def issuance_in_progress(device_id: str, serial: str | None) -> ConflictError:
    return ConflictError(
        f"device {device_id!r} has an issuance in progress (serial {serial}); run "
        "recovery if a station crashed",
        code="issuance-in-progress",
    )


def already_provisioned(device_id: str, serial: str | None) -> ConflictError:
    return ConflictError(
        f"device {device_id!r} already has live certificate {serial} for another key; "
        "re-provision to replace it",
        code="already-provisioned",
    )


@dataclass(frozen=True, slots=True)
class _Planned:
    """An intent recorded, waiting for its signature."""

    cert_id: int
    device_pk: int
    serial: int
    subject: x509.Name
    sign_time: datetime
    days: int
    crl_url: str | None = None
    ocsp_url: str | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def _on_disk(_conn: Connection) -> None:
    """An empty durable write: returns once everything committed before it is synced."""


class Issuer:
    """Issue and recover certificates through one unit of work."""

    def __init__(
        self, engine: Engine, writes: GroupCommitter, station_id: str, backdate_seconds: int
    ) -> None:
        self._engine = engine
        self._writes = writes
        self.station_id = station_id
        self.backdate_seconds = backdate_seconds
        self.templates: dict[str, str] = {}  # batch -> subject template, as last read
        #: Test seam: called with the certificate after the token signed it and
        #: before the ledger commits it (crash-recovery tests raise here).
        self.after_sign: Callable[[x509.Certificate], None] | None = None

    def issue(
        self,
        batch: str,
        device_id: str,
        csr_der_or_pem: bytes | CertRequest,
        ca: Signer,
        *,
        reprovision: bool = False,
        reason: str | None = None,
        renews: str | None = None,
        confirm_later: bool = False,
        station_made_key: bool = False,
    ) -> IssueResult:
        # Bytes are a PKCS#10 (serial line, JSON API, CLI); EST and CMP hand the request
        # they parsed for their own checks (PKCS#10 or CRMF), so it is parsed once.
        csr = (
            policy.load_csr(csr_der_or_pem) if isinstance(csr_der_or_pem, bytes) else csr_der_or_pem
        )
        policy.check_csr(csr)
        policy.check_device_id(device_id)
        pk = policy.public_key_sha256(csr)
        csr_der = csr.public_bytes(serialization.Encoding.DER)
        if reason is not None:
            check_text(reason, "a re-provisioning reason", max_chars=256)
        comeback = reason if reprovision else None

        for attempt in range(5):
            try:
                planned = self._record_intent(
                    batch, device_id, csr, csr_der, pk, reprovision, ca.chain_pem, comeback, renews,
                    station_made_key,
                )  # fmt: skip
                break
            except IntegrityError as exc:
                # A serial collision (new serial next time) or a concurrent writer
                # that slipped past a check (the next attempt's checks see it).
                if attempt == 4:
                    raise ConflictError(
                        "the ledger refused the intent repeatedly", code="ledger-conflict"
                    ) from exc
        if isinstance(planned, IssueResult):
            # Handed back only once it is on disk: the row just read may be one
            # that another group or process committed and has not synced yet
            # (or could not: then this fails too, ledger-sync-failed).
            self._writes.submit(_on_disk, durable=True)
            return planned

        p = planned
        try:
            cert = ca.issue(
                csr,
                subject=p.subject,
                serial=p.serial,
                profile=DeviceProfile(
                    days=p.days,
                    backdate_seconds=self.backdate_seconds,
                    crl_url=p.crl_url,
                    ocsp_url=p.ocsp_url,
                ),
                now=p.sign_time,
            )
        except Exception as exc:
            self.abandon(p.cert_id, p.device_pk, device_id, p.serial, "sign-failed", str(exc))
            if isinstance(exc, StationError):
                raise
            raise StationError(
                f"the CA could not sign: {exc}", code="sign-failed", kind=Kind.UNAVAILABLE
            ) from exc
        if self.after_sign is not None:
            self.after_sign(cert)
        signed = SignedCertificate.of(p.cert_id, p.device_pk, device_id, cert)
        fingerprint = self._commit(signed, confirm=not confirm_later)
        return IssueResult(
            certificate=cert,
            chain_pem=signed.pem.encode() + ca.chain_pem,
            serial=p.serial,
            fingerprint=fingerprint,
            reused=False,
            device_id=device_id,
            batch=batch,
        )

    def _record_intent(
        self,
        batch_name: str,
        device_id: str,
        csr: CertRequest,
        csr_der: bytes,
        pk: str,
        reprovision: bool,
        chain_pem: bytes,
        comeback: str | None = None,
        renews: str | None = None,
        station_made_key: bool = False,
    ) -> IssueResult | _Planned:
        now = _now()
        # The subject (or why the CSR does not fit) worked out before the write
        # lock, from the batch's template as last seen; checked against the
        # template read in the transaction, and redone there if it changed.
        seen_template = self.templates.get(batch_name)
        early: x509.Name | PolicyError | None = None
        if seen_template is not None:
            try:
                early = subject_for(seen_template, device_id, csr)
            except PolicyError as exc:
                early = exc
        serial = new_serial()

        def write(conn: Connection) -> IssueResult | _Planned:
            raw = Raw(conn)
            row = raw.first(
                SQL_INTENT_CHECKS, {"name": batch_name, "device_id": device_id, "pk": pk}
            )
            if row is None:
                raise unknown_batch(batch_name)
            b = BatchHead.of(row)
            d = None if row["d_id"] is None else LiveDevice.of(row)
            # A closed batch stops new boards, not the field renewal of its own.
            if not b.is_open and renews is None:
                raise batch_closed(batch_name)
            if early is not None and b.subject_template == seen_template:
                if isinstance(early, PolicyError):
                    raise early
                subject = early
            else:
                subject = subject_for(b.subject_template, device_id, csr)
                self.templates[batch_name] = b.subject_template

            # A revoked board comes back only re-provisioned with a reason (revocation.py).
            revoked = d is not None and d.state is DeviceState.REVOKED
            if revoked and not comeback:
                raise device_revoked(device_id)
            if renews is not None:
                # A renewal stays in the device's own batch, open or closed.
                if d is not None and d.batch_id != b.id:
                    raise succession.other_batch(device_id, batch_name)
                if d is not None and d.cert_state is CertState.INTENT:
                    # Another renewal (or issuance) is being signed, or a crash left
                    # its intent: not "not current", which points at re-provisioning.
                    raise issuance_in_progress(device_id, d.serial)
                if d is not None and d.cert_state is CertState.ISSUED:
                    stale = succession.pending(raw, d.id)
                    if stale is not None and stale.waiting:
                        if stale.old_serial == renews.lower():
                            # An earlier renewal of this certificate, never confirmed.
                            succession.abandon_pending(
                                conn, self.station_id, d.id, device_id, "renewal-restarted", now
                            )
                        elif stale.new_serial == renews.lower():
                            # A renewal from the successor still waiting for its
                            # confirmation: every caller authenticated the request with
                            # it (CMP signature, TLS client certificate), so the board
                            # holds it and uses it: confirmed here, then renewed from.
                            succession.confirm_waiting(
                                raw, self.station_id, d.id, device_id, stale, now
                            )
                        d = devices.live(raw, device_id)
                succession.check(d, device_id, renews, pk)
                assert d is not None and d.cert_id is not None
                succession.begin(raw, d.cert_id, d.id)
            elif d is not None and d.cert_id is not None:
                if d.cert_state is CertState.INTENT:
                    raise issuance_in_progress(device_id, d.serial)
                if d.public_key_sha256 == pk and d.batch_id == b.id:
                    return self._reuse(conn, d, device_id, batch_name, chain_pem, now)
                if not reprovision:
                    raise already_provisioned(device_id, d.serial)
                assert d.serial is not None
                changes.revoke_certificate(
                    conn, d.cert_id, device_id, d.serial, "reprovisioned", now, self.station_id
                )

            # (A re-provisioning just revoked leaves the key held: revoked is not failed.)
            if row["holder_device"] is not None:
                raise ConflictError(
                    f"this public key is already certified (device {row['holder_device']!r}, "
                    f"serial {row['holder_serial']}); every board needs its own key",
                    code="duplicate-key",
                )

            if d is None or d.batch_id != b.id:
                if batches.plan_full(raw, b):
                    raise batches.plan_full_error(b)
                batches.count_device(raw, b.id, +1)
            elif d.state is DeviceState.FAILED and batches.plan_full(raw, b):
                raise batches.plan_full_error(b)  # a failed board's retry takes a place
            if d is None:
                device_pk = devices.insert(raw, device_id, b.id, self.station_id, now)
            else:
                device_pk = d.id
                if d.batch_id != b.id:
                    batches.count_device(raw, d.batch_id, -1)
                    devices.move(raw, d.id, b.id)
                if revoked:
                    detail = {"reason": comeback, "batch": batch_name}
                    audit.append(
                        raw, self.station_id, "device.reprovision", device_id, detail, now=now
                    )
                    changes.apply(conn, d, device_id, Event.REPROVISION, now, self.station_id)

            cert_id = certificates.insert_intent(
                raw,
                serial=serial_hex(serial),
                device_pk=device_pk,
                batch_id=b.id,
                station_id=self.station_id,
                csr_der=csr_der,
                public_key_sha256=pk,
                subject=subject.rfc4514_string(),
                now=now,
                days=b.days,
                backdate_seconds=self.backdate_seconds,
                station_made_key=station_made_key,
            )
            detail = {"serial": serial_hex(serial), "batch": batch_name, "public_key_sha256": pk}
            if renews is not None:
                succession.link(raw, cert_id, renews.lower())
                detail["renews"] = renews.lower()
            audit.append(raw, self.station_id, "cert.intent", device_id, detail, now=now)
            return _Planned(cert_id, device_pk, serial, subject, now, b.days, b.crl_url, b.ocsp_url)

        # Not durable: losing an intent in a power cut loses nothing that left the station.
        return self._writes.submit(write, durable=False)

    def _reuse(
        self,
        conn: Connection,
        d: LiveDevice,
        device_id: str,
        batch: str,
        chain_pem: bytes,
        now: datetime,
    ) -> IssueResult:
        assert d.pem is not None and d.fingerprint is not None  # an issued certificate
        cert = x509.load_pem_x509_certificate(d.pem.encode())
        changes.apply(conn, d, device_id, Event.REISSUE, now, self.station_id)
        return IssueResult(
            certificate=cert,
            chain_pem=d.pem.encode() + chain_pem,
            serial=cert.serial_number,
            fingerprint=d.fingerprint,
            reused=True,
            device_id=device_id,
            batch=batch,
        )

    def _commit(self, signed: SignedCertificate, *, confirm: bool = True) -> str:
        """Make the signed certificate durable; returns its fingerprint.

        A renewal is confirmed here unless ``confirm`` is False (its confirmation
        comes later: station.ledger.succession). Concurrent callers share one
        durable commit (see groupcommit.py).
        """

        def write(conn: Connection) -> str:
            now = _now()
            raw = Raw(conn)
            if not certificates.mark_issued(raw, signed, now):
                raise ConflictError(
                    f"intent {signed.serial} was resolved elsewhere; certificate discarded",
                    code="intent-resolved",
                )
            if confirm:
                renewed = succession.complete(
                    raw, self.station_id, signed.device_pk, signed.device_id, signed.cert_id,
                    signed.serial, now,
                )  # fmt: skip
            else:
                renewed = succession.pending(raw, signed.device_pk) is not None
            if not renewed:
                devices.set_state(raw, signed.device_pk, DeviceState.ISSUED, now, self.station_id)
            audit.append(
                raw,
                self.station_id,
                "cert.issued",
                signed.device_id,
                {
                    "serial": signed.serial,
                    "fingerprint": signed.fingerprint,
                    "not_after": signed.not_after.isoformat(),
                    "device_state": (DeviceState.VERIFIED if renewed else DeviceState.ISSUED).value,
                    **({} if confirm or not renewed else {"confirmation": "pending"}),
                },
                now=now,
            )
            return signed.fingerprint

        return self._writes.submit(write, durable=True)

    def abandon(
        self, cert_id: int, device_pk: int, device_id: str, serial: int, code: str, message: str
    ) -> None:
        """An intent that will not be signed: the certificate row and the board fail."""
        now = _now()

        def write(conn: Connection) -> None:
            if not certificates.mark_abandoned(conn, cert_id, code):
                # Resolved meanwhile (another process's recovery signed and committed
                # it): the certificate and the board's step stand as they are.
                return
            audit.append(
                conn,
                self.station_id,
                "cert.failed",
                device_id,
                {"serial": serial_hex(serial), "code": code},
                now=now,
            )
            if succession.undo(Raw(conn), self.station_id, device_pk, device_id, now):
                return  # a renewal the token could not sign: the old certificate stands
            changes.fail(conn, device_pk, device_id, code, message, now, self.station_id)

        self._writes.submit(write, durable=True)

    def recover(
        self,
        ca: Signer,
        *,
        all_stations: bool = False,
        older_than: timedelta | None = None,
    ) -> RecoveryReport:
        """Resolve intents that have no certificate (this station's, or every station's).

        Each is signed again with its recorded serial, subject and signing
        instant, then committed; one that cannot be signed is marked failed, and so
        is one whose key the station made (``serverkeygen-key-lost``: the key died
        with the process, the board asks again).
        ``older_than`` leaves alone intents young enough to belong to a run
        that is still signing them.
        """
        with self._engine.connect() as conn:
            intents = certificates.open_intents(
                conn,
                station_id=None if all_stations else self.station_id,
                created_before=None if older_than is None else _now() - older_than,
            )
        resigned: list[str] = []
        failed: list[tuple[str, str]] = []
        for it in intents:
            serial = int(it.serial, 16)
            if it.station_made_key:
                # The key lived only in the crashed process (EST serverkeygen): signing
                # again would certify a key nobody holds, and the board could never
                # ask again (already-provisioned). Failed: its next request is a new key.
                self.abandon(it.id, it.device_pk, it.device_id, serial, KEY_LOST, _KEY_LOST_MESSAGE)
                failed.append((it.serial, KEY_LOST))
                continue
            try:
                csr = load_request(it.csr_der)
                cert = ca.issue(
                    csr,
                    subject=subject_for(it.subject_template, it.device_id, csr),
                    serial=serial,
                    profile=DeviceProfile(
                        days=it.days,
                        backdate_seconds=it.backdate_seconds,
                        crl_url=it.crl_url,
                        ocsp_url=it.ocsp_url,
                    ),
                    now=it.sign_time,
                )
            except Exception as exc:
                code = exc.code if isinstance(exc, StationError) else "recovery-failed"
                self.abandon(it.id, it.device_pk, it.device_id, serial, code, str(exc))
                failed.append((it.serial, code))
                continue
            try:
                # A renewal's board never got this certificate: only its confirmation
                # (station.ledger.renewals) may supersede the one the board still uses.
                signed = SignedCertificate.of(it.id, it.device_pk, it.device_id, cert)
                self._commit(signed, confirm=it.renews is None)
            except ConflictError:
                continue  # resolved meanwhile by another recovery
            resigned.append(it.serial)
        return RecoveryReport(resigned=tuple(resigned), failed=tuple(failed))
