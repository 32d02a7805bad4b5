"""The ledger: the one place that changes batches, devices and certificates.

The CLI, the HTTP API and the serial-line driver all call :class:`Ledger`, a
facade over small parts (docs/architecture.md draws them):

- storage by aggregate: :mod:`.batches`, :mod:`.devices`, :mod:`.certificates`
  (and the whitelist), :mod:`.challenges`, :mod:`.tokens`, :mod:`.audit`;
- one unit of work, :class:`~station.ledger.groupcommit.GroupCommitter`: every
  write is a job submitted to it (``durable=`` says whether it must be synced
  before its caller goes on); it hides the group commit, the write gate and
  what a fork does to them;
- :mod:`.issuer`: policy, intent, signature, commit, recovery;
- :mod:`.lifecycle`: which event moves a board from which state, as a table,
  applied and audited by :mod:`.changes`;
- :mod:`.proof`: challenges and their answers.

Every change happens in one write transaction together with the audit entry
that describes it. Every refusal is a :class:`station.errors.StationError`
with a stable reason code and a kind.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from cryptography import x509
from sqlalchemy import Connection, Engine

from station import policy
from station.errors import ConflictError, NotFoundError, PolicyError, StationError
from station.filemodes import private_dir
from station.ledger import audit, batches, challenges, changes, contact, devices, proof, tokens
from station.ledger.channel_audit import ChannelAudit
from station.ledger.cmp_transactions import CmpTransactions
from station.ledger.contact import Contact
from station.ledger.db import make_engine, upgrade
from station.ledger.devices import LiveDevice
from station.ledger.groupcommit import GroupCommitter
from station.ledger.issuer import AS_PRESENTED, Issuer, Signer
from station.ledger.lifecycle import Event
from station.ledger.prechecks import Prechecks
from station.ledger.rawsql import Raw
from station.ledger.reads import LedgerReads, unknown_batch, unknown_device
from station.ledger.records import (
    Batch,
    Device,
    IssueResult,
    RecoveryReport,
)
from station.ledger.renewals import Renewals
from station.ledger.revocation import device_revoked, revoke_device
from station.ledger.schema import BatchState, DeviceState, KeyMode
from station.ledger.textrules import check_batch_name, check_text, clean_text
from station.ledger.tokens import TOKEN_ROLES, Role
from station.request import CertRequest

__all__ = ["ADHOC_BATCH", "AS_PRESENTED", "TOKEN_ROLES", "Ledger"]

ADHOC_BATCH = "adhoc"
ADHOC_PLANNED = 2**31 - 1
CHALLENGE_TTL = proof.CHALLENGE_TTL

T = TypeVar("T")


def _now() -> datetime:
    return datetime.now(UTC)


class Ledger(LedgerReads):
    """Batches, devices, certificates, the whitelist and the audit chain.

    ``Ledger(url_or_engine, station_id)`` opens (and migrates) the ledger; one
    instance is safe to share between threads.
    """

    #: Test seam: called with the certificate after the HSM signed it and
    #: before the ledger commits it (crash-recovery tests raise here).
    after_sign: Callable[[x509.Certificate], None] | None = None

    def __init__(
        self,
        engine_or_url: Engine | str,
        station_id: str,
        *,
        backdate_seconds: int = 300,
        migrate: bool = True,
    ) -> None:
        if isinstance(engine_or_url, str):
            self.engine = make_engine(engine_or_url)
            self._owns_engine = True
        else:
            self.engine = engine_or_url
            self._owns_engine = False
        self.station_id = station_id
        self.backdate_seconds = backdate_seconds
        self._writes = GroupCommitter(self.engine)
        self._issuer = Issuer(self.engine, self._writes, station_id, backdate_seconds)
        self.cmp_transactions = CmpTransactions(self.engine, self._writes)  # api/routers/cmp.py
        self.channel_audit = ChannelAudit(self._writes, station_id)  # EST's and CMP's refusals
        # Verified on first authenticated contact (EST, CMP): station/ledger/contact.py.
        self.contact = Contact(self.engine, self._writes, station_id)
        self.renewals = Renewals(self.engine, self._writes, station_id)  # confirmed later
        self.prechecks = Prechecks(self.engine)  # the issuer's refusals, early (serverkeygen)
        self._issuer.after_sign = self._after_sign
        self._templates = self._issuer.templates
        if migrate:
            upgrade(self.engine)

    def _after_sign(self, cert: x509.Certificate) -> None:
        if self.after_sign is not None:
            self.after_sign(cert)

    @property
    def write_failure(self) -> str | None:
        """Why this ledger takes no more writes until it is opened again, or None.

        Set when a sync of its log to disk failed (``ledger-sync-failed``).
        """
        return self._writes.failure

    @classmethod
    def from_settings(cls, settings: Any) -> Ledger:
        """The ledger a :class:`station.settings.Settings` points at (``ledger-unreachable``
        when its database cannot be opened)."""
        from station.ledger.opening import ledger_errors

        url = settings.resolved_database_url()
        with ledger_errors(url):
            private_dir(settings.data_dir)
            return cls(url, settings.station_id, backdate_seconds=settings.backdate_seconds)

    def close(self) -> None:
        self._writes.close()
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ batches

    def create_batch(
        self,
        name: str,
        *,
        product: str,
        planned_count: int,
        key_mode: str,
        subject_template: str,
        days: int = 3650,
        operator: str | None = None,
        crl_url: str | None = None,
        ocsp_url: str | None = None,
    ) -> Batch:
        """Open a batch. Codes: bad-batch, bad-text, bad-key-mode, bad-template, bad-url,
        batch-exists.

        ``crl_url`` and ``ocsp_url`` go into the batch's device certificates (CRL
        distribution point, AIA OCSP), e.g. the station's own ``/crl`` and ``/ocsp``.
        """
        from station.ca import check_publication_url

        check_batch_name(name)
        check_text(product, "a product")
        if operator is not None:
            check_text(operator, "an operator")
        for url in (crl_url, ocsp_url):
            if url is not None:
                check_publication_url(url)
        if planned_count < 1:
            raise PolicyError("the planned count must be at least 1", code="bad-batch")
        if not 1 <= days <= 36500:
            raise PolicyError("validity must be 1 to 36500 days", code="bad-batch")
        try:
            mode = KeyMode(key_mode)
        except ValueError:
            raise PolicyError(
                f"key mode {key_mode!r} is not one of {', '.join(KeyMode)}", code="bad-key-mode"
            ) from None
        if subject_template != AS_PRESENTED:
            policy.validate_template(subject_template)
        now = _now()

        def write(conn: Connection) -> None:
            if batches.head(conn, name) is not None:
                raise ConflictError(f"batch {name!r} already exists", code="batch-exists")
            batches.insert(
                conn,
                name=name,
                product=product,
                planned_count=planned_count,
                key_mode=mode.value,
                subject_template=subject_template,
                days=days,
                operator=operator,
                station_id=self.station_id,
                now=now,
                crl_url=crl_url,
                ocsp_url=ocsp_url,
            )
            detail = {
                "product": product,
                "planned_count": planned_count,
                "key_mode": mode.value,
                "subject_template": subject_template,
                "days": days,
                "operator": operator,
                **({"crl_url": crl_url} if crl_url else {}),
                **({"ocsp_url": ocsp_url} if ocsp_url else {}),
            }
            audit.append(conn, self.station_id, "batch.create", name, detail, now=now)

        self._writes.run_alone(write)
        return self.get_batch(name)

    def close_batch(self, name: str, *, operator: str | None = None) -> Batch:
        """Close a batch: no more issuance in it. Codes: unknown-batch, batch-closed."""
        now = _now()

        def write(conn: Connection) -> None:
            b = batches.head(conn, name)
            if b is None:
                raise unknown_batch(name)
            if b.state is BatchState.CLOSED:
                raise ConflictError(f"batch {name!r} is already closed", code="batch-closed")
            batches.close(conn, b.id, now)
            detail = {"operator": operator, "devices": b.device_count}
            audit.append(conn, self.station_id, "batch.close", name, detail, now=now)

        self._writes.run_alone(write)
        return self.get_batch(name)

    def ensure_adhoc_batch(self, *, days: int = 3650) -> Batch:
        """The implicit open batch of `station sign` without --batch (subject as presented)."""
        try:
            return self.get_batch(ADHOC_BATCH)
        except NotFoundError:
            pass
        try:
            return self.create_batch(
                ADHOC_BATCH,
                product="adhoc",
                planned_count=ADHOC_PLANNED,
                key_mode=KeyMode.BOARD_ECC.value,
                subject_template=AS_PRESENTED,
                days=days,
            )
        except ConflictError:  # another station created it meanwhile
            return self.get_batch(ADHOC_BATCH)

    # ---------------------------------------------------------------- issuance

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
        """Issue (or hand back) the certificate of ``device_id`` in ``batch``: a PKCS#10
        (bytes) or a request already parsed (EST, CMP; station/request.py). ``renews``: the serial
        this one succeeds (station/ledger/succession.py), confirmed at its commit or, with
        ``confirm_later``, by ``renewals`` (the serial line's proof, CMP's certConf).
        ``station_made_key``: the station made the key and holds it only in memory
        (EST serverkeygen): recovery abandons such an intent (serverkeygen-key-lost).

        The same device with the same public key gets its certificate back
        (``reused=True``). Codes: malformed-csr, bad-signature, weak-key,
        unsupported-key, ... (policy), subject-mismatch, device-id-mismatch,
        unknown-batch, batch-closed, batch-full, already-provisioned
        (a live certificate for another key; pass ``reprovision=True`` to revoke
        it), duplicate-key, issuance-in-progress, sign-failed, device-revoked (a
        revoked board comes back only re-provisioned with a ``reason``, audited:
        station.ledger.revocation); renewal-* (station/ledger/succession.py).
        """
        return self._issuer.issue(
            batch, device_id, csr_der_or_pem, ca, reprovision=reprovision, reason=reason,
            renews=renews, confirm_later=confirm_later, station_made_key=station_made_key,
        )  # fmt: skip

    def recover(
        self,
        ca: Signer,
        *,
        all_stations: bool = False,
        older_than: timedelta | None = None,
    ) -> RecoveryReport:
        """Resolve this station's intents that have no certificate (run at start-up);
        see :meth:`station.ledger.issuer.Issuer.recover`."""
        return self._issuer.recover(ca, all_stations=all_stations, older_than=older_than)

    # ------------------------------------------------------ steps of the line

    def _step(self, write: Callable[[Connection], Any], device_id: str, *, durable: bool) -> Device:
        """Run a line step's write and read the board back in the same transaction."""

        def job(conn: Connection) -> Device:
            write(conn)
            device = devices.record(conn, device_id)
            if device is None:
                raise unknown_device(device_id)
            return device

        return self._writes.submit(job, durable=durable)

    def _live(self, conn: Connection, device_id: str) -> LiveDevice:
        d = devices.live(conn, device_id)
        if d is None:
            raise unknown_device(device_id)
        return d

    def register_device(self, batch: str, device_id: str) -> Device:
        """Enrol a board in a batch before it has a key (state ``new``); idempotent.

        Codes: unknown-batch, batch-closed, batch-full, already-provisioned
        (the board is enrolled in another batch with a live certificate).
        """
        policy.check_device_id(device_id)
        now = _now()

        def write(conn: Connection) -> None:
            self._enrol(conn, batch, device_id, now)

        return self._step(write, device_id, durable=False)

    def _enrol(self, conn: Connection, batch: str, device_id: str, now: datetime) -> LiveDevice:
        raw = Raw(conn)
        b = batches.head(raw, batch)
        if b is None:
            raise unknown_batch(batch)
        d = devices.live(raw, device_id)
        if d is not None and d.batch_id == b.id:
            return d
        if not b.is_open:
            raise ConflictError(f"batch {batch!r} is closed", code="batch-closed")
        if d is not None and d.cert_id is not None:
            raise ConflictError(
                f"device {device_id!r} already has live certificate {d.serial} in another batch",
                code="already-provisioned",
            )
        if batches.plan_full(raw, b):
            raise batches.plan_full_error(b)
        batches.count_device(raw, b.id, +1)
        if d is None:
            devices.insert(raw, device_id, b.id, self.station_id, now)
            action = "device.enrol"
        else:
            batches.count_device(raw, d.batch_id, -1)
            devices.move(raw, d.id, b.id)
            action = "device.move"
        audit.append(raw, self.station_id, action, device_id, {"batch": batch}, now=now)
        enrolled = devices.live(raw, device_id)
        assert enrolled is not None
        return enrolled

    def mark_key_ready(self, device_id: str, *, batch: str | None = None) -> Device:
        """The board holds its key (board-ecc) or the station loaded it (see-rsa).

        With ``batch`` an unknown board is enrolled first. Codes: unknown-device,
        already-provisioned (a verified board), bad-state.
        """
        now = _now()

        def write(conn: Connection) -> None:
            if batch is not None:
                policy.check_device_id(device_id)
                d = self._enrol(conn, batch, device_id, now)
            else:
                d = self._live(conn, device_id)
            changes.apply(conn, d, device_id, Event.KEY_READY, now, self.station_id)

        return self._step(write, device_id, durable=False)

    def mark_installed(self, device_id: str, chain_sha256: str) -> Device:
        """The board stored the chain and reported its digest. Codes: unknown-device, bad-state."""
        now = _now()

        def write(conn: Connection) -> None:
            d = self._live(conn, device_id)
            changes.apply(
                conn,
                d,
                device_id,
                Event.INSTALL,
                now,
                self.station_id,
                chain_sha256=chain_sha256.lower(),
            )

        return self._step(write, device_id, durable=False)

    def mark_verified(self, device_id: str, *, serial: str | None = None) -> Device:
        """Proof of possession passed: the board is verified and its serial whitelisted.

        Only from ``issued`` or ``installed`` with a live certificate (idempotent
        on an already verified board; ``serial``: only that one). Codes: unknown-device,
        bad-state, certificate-not-live."""
        now = _now()

        def write(conn: Connection) -> None:
            d = contact.require_live(self._live(conn, device_id), device_id, serial)
            self._verify(conn, d, device_id, now)

        return self._step(write, device_id, durable=True)

    def _verify(self, conn: Connection, d: LiveDevice, device_id: str, now: datetime) -> None:
        contact.verify(conn, d, device_id, now, self.station_id)

    def mark_failed(self, device_id: str, code: str, message: str) -> Device:
        """Record why a board failed (attempts + 1); a later issue() may retry it.

        A verified board that fails leaves the whitelist. Codes: unknown-device.
        """
        now = _now()
        code, message = clean_text(code, max_chars=64), clean_text(message)

        def write(conn: Connection) -> None:
            d = self._live(conn, device_id)
            changes.fail(conn, d.id, device_id, code, message, now, self.station_id)

        return self._step(write, device_id, durable=False)

    def revoke(self, device_id: str, reason: str, *, serial: str | None = None) -> Device:
        """Revoke the board's live certificate (ledger and whitelist); the board is ``revoked``.

        A renewal under way is revoked with it (station.ledger.revocation); ``serial``:
        only that one. Codes: unknown-device, no-certificate, certificate-not-live."""
        if not reason:
            raise PolicyError("a revocation needs a reason", code="bad-reason")
        check_text(reason, "a revocation reason", max_chars=256)
        now = _now()

        def write(conn: Connection) -> None:
            d = self._live(conn, device_id)
            revoke_device(conn, d, device_id, reason, now, self.station_id, serial=serial)

        return self._step(write, device_id, durable=True)

    # ------------------------------------------------------ proof of possession

    def create_challenge(self, device_id: str, *, ttl: timedelta = CHALLENGE_TTL) -> bytes:
        """A fresh 32-byte nonce for the board to sign; it replaces the board's open
        challenge, is spent by any answer and expires after ``ttl``.

        Codes: unknown-device, device-revoked, already-verified, no-certificate.
        """
        nonce = proof.new_nonce()
        now = _now()

        def write(conn: Connection) -> None:
            d = self._live(conn, device_id)
            proof.may_challenge(device_id, d.state, d.has_issued_certificate)
            challenges.replace(Raw(conn), nonce, d.id, now, now + ttl)

        self._writes.submit(write, durable=False)
        return nonce

    def verify_proof(self, device_id: str, nonce: bytes, signature: bytes) -> Device:
        """Check the board's signature over the proof message for ``device_id`` and
        ``nonce`` (``firmware_hooks.protocol.proof_message``, the same bytes on the
        serial line and over HTTP) with its certificate's key; then verified.

        The challenge is spent whatever the answer, and every refusal is audited
        (``proof.refused`` with its code). Codes: unknown-device, no-challenge,
        challenge-expired, device-revoked, no-certificate, bad-proof, bad-state
        (see :mod:`station.ledger.proof`).
        """
        now = _now()

        def write(conn: Connection) -> StationError | None:
            failure = self._proof_refusal(conn, device_id, nonce, signature, now)
            if failure is not None:
                audit.append(
                    conn, self.station_id, "proof.refused", device_id, {"code": failure.code}
                )
            return failure

        # Durable: a good proof whitelists the board; a refused one spends the nonce.
        failure = self._writes.submit(write, durable=True)
        if failure is not None:
            raise failure
        return self.get_device(device_id)

    def _proof_refusal(
        self, conn: Connection, device_id: str, nonce: bytes, signature: bytes, now: datetime
    ) -> StationError | None:
        """Verify the board (None), or the refusal to record and raise."""
        d = devices.live(conn, device_id)
        if d is None:
            return unknown_device(device_id)
        expires_at = challenges.spend(Raw(conn), nonce, d.id)
        if expires_at is None:
            return PolicyError(
                f"no open challenge with this nonce for {device_id!r}", code="no-challenge"
            )
        if d.state is DeviceState.REVOKED and expires_at >= now:
            return device_revoked(device_id)
        failure = proof.refusal(
            device_id,
            expires_at=expires_at,
            now=now,
            certificate_pem=d.pem if d.has_issued_certificate else None,
            nonce=nonce,
            signature=signature,
        )
        if failure is not None:
            return failure
        try:
            self._verify(conn, d, device_id, now)
        except StationError as exc:  # refused before it wrote anything (bad-state)
            return exc
        return None

    # --------------------------------------------------------------- API tokens

    def create_token(self, name: str, role: str, *, expires_in: timedelta | None = None) -> str:
        """A new bearer token for the HTTP API; only its SHA-256 is stored. It works
        until revoked, or for ``expires_in`` when given.

        Codes: bad-token-name, bad-role, bad-duration, token-exists.
        """
        # Names are printed and logged: no control characters (log injection).
        try:
            check_text(name, "a token name")
        except PolicyError as exc:
            raise PolicyError(exc.message, code="bad-token-name") from None
        try:
            checked_role = Role(role)
        except ValueError:
            raise PolicyError(
                f"role {role!r} is not one of {', '.join(TOKEN_ROLES)}", code="bad-role"
            ) from None
        tokens.check_lifetime(expires_in)
        token = secrets.token_urlsafe(32)
        now = _now()
        expires = None if expires_in is None else now + expires_in

        def write(conn: Connection) -> None:
            if tokens.exists(conn, name):
                raise ConflictError(f"a token named {name!r} exists", code="token-exists")
            tokens.insert(conn, name, checked_role, token, now, expires)
            detail = {
                "role": checked_role.value,
                "expires_at": None if expires is None else expires.isoformat(),
            }
            audit.append(conn, self.station_id, "token.create", name, detail, now=now)

        self._writes.run_alone(write)
        return token

    def lookup_token(self, plaintext: str) -> tuple[str, str] | None:
        """(name, role) of a live token, or None."""
        found = self.lookup_token_record(plaintext)
        return None if found is None else (found.name, found.role)

    def lookup_token_record(self, plaintext: str) -> tokens.TokenRecord | None:
        """The record of a live token (not revoked, not expired), or None; records its use."""
        now = _now()
        with self.engine.connect() as conn:
            row = tokens.live_row(conn, plaintext, now)
        if row is None:
            return None
        if tokens.needs_touch(row, now):
            # A ledger that takes no writes (ledger-sync-failed) still authenticates.
            with contextlib.suppress(StationError):
                self._writes.submit(lambda c: tokens.touch(c, row.id, now), durable=False)
        return tokens.record(row)

    def revoke_token(self, name: str) -> tokens.TokenRecord:
        """Codes: unknown-token (no live token of that name)."""
        now = _now()

        def write(conn: Connection) -> tokens.TokenRecord:
            if not tokens.revoke(conn, name, now):
                raise NotFoundError(f"no live token named {name!r}", code="unknown-token")
            audit.append(conn, self.station_id, "token.revoke", name, {}, now=now)
            revoked = tokens.by_name(conn, name)
            assert revoked is not None
            return revoked

        return self._writes.run_alone(write)
