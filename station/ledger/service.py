"""The ledger service: the one place that changes batches, devices and certificates.

The CLI, the HTTP API and the serial-line driver all call :class:`Ledger`.
Every change happens in one serialised write transaction together with the
audit entry that describes it.

Issuance survives a crash at any instant:

1. record the intent (device, CSR, reserved serial, signing instant) and commit;
2. sign through the HSM;
3. commit the certificate;
4. only then return it.

A crash before 3 leaves an ``intent`` row that :meth:`Ledger.recover` signs
again (same serial, same instant, so the same certificate body) or marks
failed; a certificate is never returned before the ledger holds it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import namedtuple
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from sqlalchemy import Connection, Engine, and_, func, select
from sqlalchemy.exc import IntegrityError

from station import policy
from station.errors import ConflictError, Kind, NotFoundError, PolicyError, StationError
from station.ledger import audit
from station.ledger.db import make_engine, upgrade, write_transaction
from station.ledger.groupcommit import GroupCommitter
from station.ledger.rawsql import Raw
from station.ledger.records import (
    AuditReport,
    Batch,
    CertificateRecord,
    Device,
    IssueResult,
    RecoveryReport,
    utc,
)
from station.ledger.schema import (
    BatchState,
    CertState,
    DeviceState,
    KeyMode,
    api_tokens,
    batches,
    certificates,
    challenges,
    devices,
    whitelist,
)
from station.whitelist import DelistedCertificate, WhitelistEntry, serial_hex

if TYPE_CHECKING:
    from station.ca import CertificateAuthority

# A batch whose template is "*" issues the subject the CSR presents (after
# policy); the device id is the CSR's CN. `station sign` without --batch uses it.
AS_PRESENTED = "*"
ADHOC_BATCH = "adhoc"
ADHOC_PLANNED = 2**31 - 1

# The HTTP API's roles (api/auth.py says which route each may call).
TOKEN_ROLES = ("board", "operator", "qa", "admin")
CHALLENGE_TTL = timedelta(seconds=120)

# Result rows are untyped tuples as far as mypy can tell.
_Row = Any

# Hot-path statements, run on the driver cursor (see rawsql.py). Row shapes
# are named tuples, so the code reads them like SQLAlchemy rows.
_BatchRow = namedtuple(
    "_BatchRow", "id name state planned_count device_count subject_template days"
)
_BATCH_COLUMNS = (
    "b.id, b.name, b.state, b.planned_count, b.device_count, b.subject_template, b.days"
)
_SQL_BATCH = f"SELECT {_BATCH_COLUMNS} FROM batches b WHERE b.name = :name"  # noqa: S608

_DeviceRow = namedtuple(
    "_DeviceRow",
    "id batch_id state cert_id serial cert_state public_key_sha256 pem fingerprint",
)
_LIVE_DEVICE_COLUMNS = (
    "d.id, d.batch_id, d.state, c.id, c.serial, c.state, c.public_key_sha256, c.pem, c.fingerprint"
)
# A board's live certificate (or pending intent), if it has one.
_LIVE_CERT_JOIN = (
    "LEFT OUTER JOIN certificates c ON c.device_pk = d.id AND c.state IN ('intent', 'issued')"
)
_SQL_DEVICE = (
    f"SELECT {_LIVE_DEVICE_COLUMNS} FROM devices d {_LIVE_CERT_JOIN} "  # noqa: S608 - fixed text
    "WHERE d.device_id = :device_id"
)

# Everything the intent checks, in one statement: the batch, the board and its
# live certificate if any, and which board (if any) already holds this key.
_SQL_INTENT_CHECKS = (
    f"SELECT {_BATCH_COLUMNS}, {_LIVE_DEVICE_COLUMNS}, "  # noqa: S608 - fixed text
    "(SELECT hd.device_id FROM certificates hc JOIN devices hd ON hd.id = hc.device_pk "
    "WHERE hc.public_key_sha256 = :pk AND hc.state != 'failed' LIMIT 1), "
    "(SELECT hc.serial FROM certificates hc "
    "WHERE hc.public_key_sha256 = :pk AND hc.state != 'failed' LIMIT 1) "
    f"FROM batches b LEFT OUTER JOIN devices d ON d.device_id = :device_id {_LIVE_CERT_JOIN} "
    "WHERE b.name = :name"
)
_SQL_BATCH_COUNT = "UPDATE batches SET device_count = device_count + :delta WHERE id = :bid"
_SQL_INSERT_DEVICE = (
    "INSERT INTO devices (device_id, batch_id, state, attempts, station_id, created_at, "
    "updated_at) VALUES (:device_id, :batch_id, 'new', 0, :station_id, :now, :now) "
    "RETURNING id"
)
_SQL_MOVE_DEVICE = "UPDATE devices SET batch_id = :bid WHERE id = :did"
_SQL_INSERT_INTENT = (
    "INSERT INTO certificates (serial, device_pk, batch_id, station_id, state, csr_der, "
    "public_key_sha256, subject, sign_time, days, backdate_seconds, created_at) "
    "VALUES (:serial, :device_pk, :batch_id, :station_id, 'intent', :csr_der, :pk, "
    ":subject, :now, :days, :backdate, :now) RETURNING id"
)
_SQL_MARK_ISSUED = (
    "UPDATE certificates SET state = 'issued', pem = :pem, fingerprint = :fp, "
    "not_before = :nb, not_after = :na, issued_at = :now WHERE id = :cid AND state = 'intent'"
)
_SQL_DEVICE_ISSUED = (
    "UPDATE devices SET state = 'issued', issued_at = :now, updated_at = :now, "
    "station_id = :station WHERE id = :did"
)
_SQL_INSERT_CHALLENGE = (
    "INSERT INTO challenges (nonce, device_pk, created_at, expires_at) "
    "VALUES (:nonce, :did, :now, :expires)"
)
_SQL_WHITELIST_ADD = (
    "INSERT INTO whitelist (serial, device_pk, batch_id, added_at) "
    "VALUES (:serial, :did, :bid, :now)"
)
# Which timestamp column a step stamps (fixed names: safe to format into SQL).
_STAMP = {
    DeviceState.KEY_READY: "key_ready_at",
    DeviceState.ISSUED: "issued_at",
    DeviceState.INSTALLED: "installed_at",
    DeviceState.VERIFIED: "verified_at",
    DeviceState.REVOKED: "revoked_at",
}


def _batch_row(conn: Connection | Raw, name: str) -> Any:
    raw = conn if isinstance(conn, Raw) else Raw(conn)
    row = raw.one(_SQL_BATCH, {"name": name})
    return None if row is None else _BatchRow._make(row)


def _device_by_id(conn: Connection | Raw, device_id: str) -> Any:
    raw = conn if isinstance(conn, Raw) else Raw(conn)
    row = raw.one(_SQL_DEVICE, {"device_id": device_id})
    return None if row is None else _DeviceRow._make(row)


# The columns of _DEVICE_COLUMNS, in their order (_device reads either).
_SQL_DEVICE_RECORD = (
    "SELECT d.device_id, b.name, d.state, d.failure_code, d.failure_message, d.attempts, "
    "d.station_id, d.chain_sha256, c.serial, d.created_at, d.updated_at, d.key_ready_at, "
    "d.issued_at, d.installed_at, d.verified_at, d.failed_at, d.revoked_at "
    "FROM devices d JOIN batches b ON b.id = d.batch_id LEFT OUTER JOIN certificates c "
    "ON c.device_pk = d.id AND c.state = 'issued' WHERE d.device_id = :device_id"
)


def _ts(value: Any) -> datetime | None:
    """A timestamp as the driver hands it back (SQLite: SQLAlchemy's text), in UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return utc(value)


def _device_record(conn: Connection | Raw, device_id: str) -> Device:
    """Codes: unknown-device."""
    raw = conn if isinstance(conn, Raw) else Raw(conn)
    row = raw.one(_SQL_DEVICE_RECORD, {"device_id": device_id})
    if row is None:
        raise NotFoundError(f"no device {device_id!r} in the ledger", code="unknown-device")
    return _device(row)


_DEVICE_COLUMNS = (
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
)

_DEVICE_SELECT = select(*_DEVICE_COLUMNS).select_from(
    devices.join(batches, batches.c.id == devices.c.batch_id).outerjoin(
        certificates,
        and_(
            certificates.c.device_pk == devices.c.id,
            certificates.c.state == CertState.ISSUED.value,
        ),
    )
)


def _on_disk(_conn: Connection) -> None:
    """An empty durable write: returns once everything committed before it is synced."""


def _now() -> datetime:
    return datetime.now(UTC)


def _device(row: _Row) -> Device:
    """A device from a row in ``_DEVICE_COLUMNS`` order (SQLAlchemy or the driver's)."""
    stamps = [_ts(v) for v in row[9:17]]
    return Device(
        device_id=row[0],
        batch=row[1],
        state=row[2],
        failure_code=row[3],
        failure_message=row[4],
        attempts=row[5],
        station_id=row[6],
        chain_sha256=row[7],
        serial=row[8],
        created_at=stamps[0] or _now(),
        updated_at=stamps[1] or _now(),
        key_ready_at=stamps[2],
        issued_at=stamps[3],
        installed_at=stamps[4],
        verified_at=stamps[5],
        failed_at=stamps[6],
        revoked_at=stamps[7],
    )


def _batch(row: _Row) -> Batch:
    m = row._mapping
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
        created_at=utc(m["created_at"]) or _now(),
        closed_at=utc(m["closed_at"]),
    )


def _subject_for(template: str, device_id: str, csr: x509.CertificateSigningRequest) -> x509.Name:
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


@dataclass(frozen=True, slots=True)
class _CertCommit:
    """A signed certificate waiting for its durable commit, its columns worked out
    before the write lock is taken (the lock is held only for the statements)."""

    cert_id: int
    device_pk: int
    device_id: str
    pem: str
    fingerprint: str
    serial: str
    not_before: datetime
    not_after: datetime

    @classmethod
    def of(
        cls, cert_id: int, device_pk: int, device_id: str, cert: x509.Certificate
    ) -> _CertCommit:
        return cls(
            cert_id,
            device_pk,
            device_id,
            cert.public_bytes(serialization.Encoding.PEM).decode(),
            cert.fingerprint(hashes.SHA256()).hex(),
            serial_hex(cert.serial_number),
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
        )


class Ledger:
    """Batches, devices, certificates, the whitelist and the audit chain.

    ``Ledger(url_or_engine, station_id)`` opens (and migrates) the ledger; one
    instance is safe to share between threads. Every refusal is a
    :class:`station.errors.StationError` with a stable reason code.
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
        self._templates: dict[str, str] = {}  # batch -> subject template, as last read
        if migrate:
            upgrade(self.engine)

    @property
    def write_failure(self) -> str | None:
        """Why this ledger takes no more writes until it is opened again, or None.

        Set when a sync of its log to disk failed (``ledger-sync-failed``).
        """
        return self._writes.failure

    @classmethod
    def from_settings(cls, settings: Any) -> Ledger:
        """The ledger a :class:`station.settings.Settings` points at."""
        return cls(
            settings.resolved_database_url(),
            settings.station_id,
            backdate_seconds=settings.backdate_seconds,
        )

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
    ) -> Batch:
        """Open a batch. Codes: bad-batch, bad-key-mode, bad-template, batch-exists."""
        if not name or len(name) > 128 or not name.isprintable():
            raise PolicyError("a batch name is 1-128 printable characters", code="bad-batch")
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
        with write_transaction(self.engine) as conn:
            if _batch_row(conn, name) is not None:
                raise ConflictError(f"batch {name!r} already exists", code="batch-exists")
            conn.execute(
                batches.insert().values(
                    name=name,
                    product=product,
                    planned_count=planned_count,
                    key_mode=mode.value,
                    subject_template=subject_template,
                    days=days,
                    state=BatchState.OPEN.value,
                    operator=operator,
                    station_id=self.station_id,
                    device_count=0,
                    created_at=now,
                )
            )
            audit.append(
                conn,
                self.station_id,
                "batch.create",
                name,
                {
                    "product": product,
                    "planned_count": planned_count,
                    "key_mode": mode.value,
                    "subject_template": subject_template,
                    "days": days,
                    "operator": operator,
                },
                now=now,
            )
        return self.get_batch(name)

    def get_batch(self, name: str) -> Batch:
        """Codes: unknown-batch."""
        with self.engine.connect() as conn:
            row = conn.execute(select(batches).where(batches.c.name == name)).first()
        if row is None:
            raise NotFoundError(f"no batch named {name!r}", code="unknown-batch")
        return _batch(row)

    def list_batches(self, *, state: str | None = None) -> list[Batch]:
        stmt = select(batches).order_by(batches.c.created_at, batches.c.id)
        if state is not None:
            stmt = stmt.where(batches.c.state == state)
        with self.engine.connect() as conn:
            return [_batch(r) for r in conn.execute(stmt)]

    def close_batch(self, name: str, *, operator: str | None = None) -> Batch:
        """Close a batch: no more issuance in it. Codes: unknown-batch, batch-closed."""
        now = _now()
        with write_transaction(self.engine) as conn:
            row = _batch_row(conn, name)
            if row is None:
                raise NotFoundError(f"no batch named {name!r}", code="unknown-batch")
            if row.state == BatchState.CLOSED.value:
                raise ConflictError(f"batch {name!r} is already closed", code="batch-closed")
            conn.execute(
                batches.update()
                .where(batches.c.id == row.id)
                .values(state=BatchState.CLOSED.value, closed_at=now)
            )
            audit.append(
                conn,
                self.station_id,
                "batch.close",
                name,
                {"operator": operator, "devices": row.device_count},
                now=now,
            )
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

    def counts(self, batch: str | None = None) -> dict[str, dict[str, int]]:
        """Devices per batch and state: ``{batch: {state: n}}`` (dashboard, metrics, reports)."""
        stmt = (
            select(batches.c.name, devices.c.state, func.count())
            .select_from(devices.join(batches, batches.c.id == devices.c.batch_id))
            .group_by(batches.c.name, devices.c.state)
        )
        if batch is not None:
            stmt = stmt.where(batches.c.name == batch)
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            if batch is not None:
                self._batch_id(conn, batch)
            for name, state, n in conn.execute(stmt):
                out.setdefault(name, {})[state] = n
        if batch is not None:
            out.setdefault(batch, {})
        return out

    # ---------------------------------------------------------------- issuance

    def issue(
        self,
        batch: str,
        device_id: str,
        csr_der_or_pem: bytes,
        ca: CertificateAuthority,
        *,
        reprovision: bool = False,
    ) -> IssueResult:
        """Issue (or hand back) the certificate of ``device_id`` in ``batch``.

        The same device with the same public key gets its certificate back
        (``reused=True``). Codes: malformed-csr, bad-signature, weak-key,
        unsupported-key, ... (policy), subject-mismatch, device-id-mismatch,
        unknown-batch, batch-closed, batch-full, already-provisioned
        (a live certificate for another key; pass ``reprovision=True`` to revoke
        it), duplicate-key, issuance-in-progress, sign-failed.
        """
        from station.ca import DeviceProfile

        csr = policy.load_csr(csr_der_or_pem)
        policy.check_csr(csr)
        policy.check_device_id(device_id)
        pk = policy.public_key_sha256(csr)
        csr_der = csr.public_bytes(serialization.Encoding.DER)

        for attempt in range(5):
            try:
                planned = self._record_intent(
                    batch, device_id, csr, csr_der, pk, reprovision, ca.chain_pem
                )
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

        cert_id, device_pk, serial, subject, sign_time, days = planned
        try:
            cert = ca.issue(
                csr,
                subject=subject,
                serial=serial,
                profile=DeviceProfile(days=days, backdate_seconds=self.backdate_seconds),
                now=sign_time,
            )
        except Exception as exc:
            self._abandon(cert_id, device_pk, device_id, serial, "sign-failed", str(exc))
            if isinstance(exc, StationError):
                raise
            raise StationError(
                f"the CA could not sign: {exc}", code="sign-failed", kind=Kind.UNAVAILABLE
            ) from exc
        if self.after_sign is not None:
            self.after_sign(cert)
        commit = _CertCommit.of(cert_id, device_pk, device_id, cert)
        fingerprint = self._commit_certificate(commit)
        return IssueResult(
            certificate=cert,
            chain_pem=commit.pem.encode() + ca.chain_pem,
            serial=serial,
            fingerprint=fingerprint,
            reused=False,
            device_id=device_id,
            batch=batch,
        )

    def _record_intent(
        self,
        batch_name: str,
        device_id: str,
        csr: x509.CertificateSigningRequest,
        csr_der: bytes,
        pk: str,
        reprovision: bool,
        chain_pem: bytes,
    ) -> IssueResult | tuple[int, int, int, x509.Name, datetime, int]:
        from station.ca import new_serial

        now = _now()
        # The subject (or why the CSR does not fit) worked out before the write
        # lock, from the batch's template as last seen; checked against the
        # template read in the transaction, and redone there if it changed.
        seen_template = self._templates.get(batch_name)
        early: x509.Name | PolicyError | None = None
        if seen_template is not None:
            try:
                early = _subject_for(seen_template, device_id, csr)
            except PolicyError as exc:
                early = exc
        serial = new_serial()

        def write(conn: Connection) -> IssueResult | tuple[int, int, int, x509.Name, datetime, int]:
            raw = Raw(conn)
            row = raw.one(
                _SQL_INTENT_CHECKS, {"name": batch_name, "device_id": device_id, "pk": pk}
            )
            if row is None:
                raise NotFoundError(f"no batch named {batch_name!r}", code="unknown-batch")
            nb, nd = len(_BatchRow._fields), len(_DeviceRow._fields)
            b = _BatchRow._make(row[:nb])
            d = None if row[nb] is None else _DeviceRow._make(row[nb : nb + nd])
            holder = None if row[nb + nd] is None else (row[nb + nd], row[nb + nd + 1])
            if b.state != BatchState.OPEN.value:
                raise ConflictError(f"batch {batch_name!r} is closed", code="batch-closed")
            if early is not None and b.subject_template == seen_template:
                if isinstance(early, PolicyError):
                    raise early
                subject = early
            else:
                subject = _subject_for(b.subject_template, device_id, csr)
                self._templates[batch_name] = b.subject_template

            if d is not None and d.cert_id is not None:
                if d.cert_state == CertState.INTENT.value:
                    raise ConflictError(
                        f"device {device_id!r} has an issuance in progress (serial "
                        f"{d.serial}); run recovery if a station crashed",
                        code="issuance-in-progress",
                    )
                if d.public_key_sha256 == pk and d.batch_id == b.id:
                    return self._reuse(conn, d, device_id, batch_name, chain_pem, now)
                if not reprovision:
                    raise ConflictError(
                        f"device {device_id!r} already has live certificate {d.serial} "
                        "for another key; re-provision to replace it",
                        code="already-provisioned",
                    )
                self._revoke_cert(conn, d.cert_id, d.id, device_id, d.serial, "reprovisioned", now)

            # (A re-provisioning just revoked leaves the key held: revoked is not failed.)
            if holder is not None:
                raise ConflictError(
                    f"this public key is already certified (device {holder[0]!r}, "
                    f"serial {holder[1]}); every board needs its own key",
                    code="duplicate-key",
                )

            ts = raw.ts(now)
            if d is None or d.batch_id != b.id:
                if b.device_count >= b.planned_count:
                    raise ConflictError(
                        f"batch {batch_name!r} already has its {b.planned_count} devices",
                        code="batch-full",
                    )
                raw.run(_SQL_BATCH_COUNT, {"bid": b.id, "delta": 1})
            if d is None:
                device_pk = int(
                    raw.value(
                        _SQL_INSERT_DEVICE,
                        {
                            "device_id": device_id,
                            "batch_id": b.id,
                            "station_id": self.station_id,
                            "now": ts,
                        },
                    )
                )
            else:
                device_pk = d.id
                if d.batch_id != b.id:
                    raw.run(_SQL_BATCH_COUNT, {"bid": d.batch_id, "delta": -1})
                    raw.run(_SQL_MOVE_DEVICE, {"bid": b.id, "did": d.id})

            cert_id = int(
                raw.value(
                    _SQL_INSERT_INTENT,
                    {
                        "serial": serial_hex(serial),
                        "device_pk": device_pk,
                        "batch_id": b.id,
                        "station_id": self.station_id,
                        "csr_der": csr_der,
                        "pk": pk,
                        "subject": subject.rfc4514_string(),
                        "now": ts,
                        "days": b.days,
                        "backdate": self.backdate_seconds,
                    },
                )
            )
            audit.append(
                raw,
                self.station_id,
                "cert.intent",
                device_id,
                {"serial": serial_hex(serial), "batch": batch_name, "public_key_sha256": pk},
                now=now,
            )
            return cert_id, device_pk, serial, subject, now, b.days

        # Not durable: losing an intent in a power cut loses nothing that left the station.
        return self._writes.submit(write, durable=False)

    def _reuse(
        self,
        conn: Connection,
        d: _Row,
        device_id: str,
        batch: str,
        chain_pem: bytes,
        now: datetime,
    ) -> IssueResult:
        cert = x509.load_pem_x509_certificate(d.pem.encode())
        if d.state in (DeviceState.FAILED.value, DeviceState.REVOKED.value):
            # A board that failed after issuance asks again with the same key:
            # same certificate, and it is back on the issued step.
            self._transition(conn, d.id, device_id, d.state, DeviceState.ISSUED, now)
        return IssueResult(
            certificate=cert,
            chain_pem=d.pem.encode() + chain_pem,
            serial=cert.serial_number,
            fingerprint=d.fingerprint,
            reused=True,
            device_id=device_id,
            batch=batch,
        )

    def _commit_certificate(self, c: _CertCommit) -> str:
        """Make the signed certificate durable; returns its fingerprint.

        Concurrent callers share one durable commit (see groupcommit.py).
        """
        return self._writes.submit(lambda conn: self._apply_commit(conn, c, _now()), durable=True)

    def _apply_commit(self, conn: Connection, c: _CertCommit, now: datetime) -> str:
        fingerprint, serial = c.fingerprint, c.serial
        raw = Raw(conn)
        ts = raw.ts(now)
        done = raw.run(
            _SQL_MARK_ISSUED,
            {
                "cid": c.cert_id,
                "pem": c.pem,
                "fp": fingerprint,
                "nb": raw.ts(c.not_before),
                "na": raw.ts(c.not_after),
                "now": ts,
            },
        )
        if done.rowcount != 1:
            raise ConflictError(
                f"intent {serial} was resolved elsewhere; certificate discarded",
                code="intent-resolved",
            )
        raw.run(_SQL_DEVICE_ISSUED, {"did": c.device_pk, "now": ts, "station": self.station_id})
        audit.append(
            raw,
            self.station_id,
            "cert.issued",
            c.device_id,
            {
                "serial": serial,
                "fingerprint": fingerprint,
                "not_after": c.not_after.isoformat(),
                "device_state": DeviceState.ISSUED.value,
            },
            now=now,
        )
        return fingerprint

    def _abandon(
        self, cert_id: int, device_pk: int, device_id: str, serial: int, code: str, message: str
    ) -> None:
        now = _now()

        def write(conn: Connection) -> None:
            done = conn.execute(
                certificates.update()
                .where(certificates.c.id == cert_id, certificates.c.state == CertState.INTENT.value)
                .values(state=CertState.FAILED.value, failure_code=code)
            )
            if done.rowcount != 1:
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
            self._fail(conn, device_pk, device_id, code, message, now)

        self._writes.submit(write, durable=True)

    def recover(
        self,
        ca: CertificateAuthority,
        *,
        all_stations: bool = False,
        older_than: timedelta | None = None,
    ) -> RecoveryReport:
        """Resolve this station's intents that have no certificate (run at start-up).

        Each is signed again with its recorded serial, subject and signing
        instant, then committed; one that cannot be signed is marked failed.
        ``older_than`` leaves alone intents young enough to belong to a run of
        this station that is still signing them.
        """
        from station.ca import DeviceProfile

        stmt = (
            select(
                certificates.c.id,
                certificates.c.serial,
                certificates.c.device_pk,
                certificates.c.csr_der,
                certificates.c.sign_time,
                certificates.c.days,
                certificates.c.backdate_seconds,
                devices.c.device_id,
                batches.c.subject_template,
            )
            .select_from(
                certificates.join(devices, devices.c.id == certificates.c.device_pk).join(
                    batches, batches.c.id == certificates.c.batch_id
                )
            )
            .where(certificates.c.state == CertState.INTENT.value)
            .order_by(certificates.c.id)
        )
        if not all_stations:
            stmt = stmt.where(certificates.c.station_id == self.station_id)
        if older_than is not None:
            stmt = stmt.where(certificates.c.created_at < _now() - older_than)
        with self.engine.connect() as conn:
            intents = conn.execute(stmt).all()
        resigned: list[str] = []
        failed: list[tuple[str, str]] = []
        for it in intents:
            try:
                csr = policy.load_csr(it.csr_der)
                subject = _subject_for(it.subject_template, it.device_id, csr)
                cert = ca.issue(
                    csr,
                    subject=subject,
                    serial=int(it.serial, 16),
                    profile=DeviceProfile(days=it.days, backdate_seconds=it.backdate_seconds),
                    now=utc(it.sign_time),
                )
            except Exception as exc:
                code = exc.code if isinstance(exc, StationError) else "recovery-failed"
                self._abandon(it.id, it.device_pk, it.device_id, int(it.serial, 16), code, str(exc))
                failed.append((it.serial, code))
                continue
            try:
                self._commit_certificate(_CertCommit.of(it.id, it.device_pk, it.device_id, cert))
            except ConflictError:
                continue  # resolved meanwhile by another recovery
            resigned.append(it.serial)
        return RecoveryReport(resigned=tuple(resigned), failed=tuple(failed))

    # ------------------------------------------------------ steps of the line

    def _step(self, write: Callable[[Connection], Any], device_id: str, *, durable: bool) -> Device:
        """Run a line step's write and read the board back in the same transaction."""

        def job(conn: Connection) -> Device:
            write(conn)
            return _device_record(conn, device_id)

        device: Device = self._writes.submit(job, durable=durable)
        return device

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

    def _enrol(self, conn: Connection, batch: str, device_id: str, now: datetime) -> _Row:
        raw = Raw(conn)
        b = _batch_row(raw, batch)
        if b is None:
            raise NotFoundError(f"no batch named {batch!r}", code="unknown-batch")
        d = _device_by_id(raw, device_id)
        if d is not None and d.batch_id == b.id:
            return d
        if b.state != BatchState.OPEN.value:
            raise ConflictError(f"batch {batch!r} is closed", code="batch-closed")
        if d is not None and d.cert_id is not None:
            raise ConflictError(
                f"device {device_id!r} already has live certificate {d.serial} in another batch",
                code="already-provisioned",
            )
        if b.device_count >= b.planned_count:
            raise ConflictError(
                f"batch {batch!r} already has its {b.planned_count} devices", code="batch-full"
            )
        raw.run(_SQL_BATCH_COUNT, {"bid": b.id, "delta": 1})
        if d is None:
            raw.run(
                _SQL_INSERT_DEVICE,
                {
                    "device_id": device_id,
                    "batch_id": b.id,
                    "station_id": self.station_id,
                    "now": raw.ts(now),
                },
            )
            audit.append(raw, self.station_id, "device.enrol", device_id, {"batch": batch}, now=now)
        else:
            raw.run(_SQL_BATCH_COUNT, {"bid": d.batch_id, "delta": -1})
            raw.run(_SQL_MOVE_DEVICE, {"bid": b.id, "did": d.id})
            audit.append(raw, self.station_id, "device.move", device_id, {"batch": batch}, now=now)
        row = _device_by_id(raw, device_id)
        assert row is not None
        return row

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
                d = self._device_row(conn, device_id)
            if d.state == DeviceState.VERIFIED.value:
                raise ConflictError(
                    f"device {device_id!r} is already provisioned and verified",
                    code="already-provisioned",
                )
            self._require(d, device_id, DeviceState.KEY_READY)
            self._transition(conn, d.id, device_id, d.state, DeviceState.KEY_READY, now)

        return self._step(write, device_id, durable=False)

    def mark_installed(self, device_id: str, chain_sha256: str) -> Device:
        """The board stored the chain and reported its digest. Codes: unknown-device, bad-state."""
        now = _now()

        def write(conn: Connection) -> None:
            d = self._device_row(conn, device_id)
            self._require(d, device_id, DeviceState.INSTALLED)
            self._transition(
                conn,
                d.id,
                device_id,
                d.state,
                DeviceState.INSTALLED,
                now,
                chain_sha256=chain_sha256.lower(),
            )

        return self._step(write, device_id, durable=False)

    def mark_verified(self, device_id: str) -> Device:
        """Proof of possession passed: the board is verified and its serial whitelisted.

        Only from ``issued`` or ``installed`` with a live certificate (idempotent
        on an already verified board). Codes: unknown-device, bad-state.
        """
        now = _now()

        def write(conn: Connection) -> None:
            d = self._device_row(conn, device_id)
            self._verify(conn, d, device_id, now)

        return self._step(write, device_id, durable=True)

    def _verify(self, conn: Connection, d: _Row, device_id: str, now: datetime) -> None:
        if d.state == DeviceState.VERIFIED.value:
            return
        self._require(d, device_id, DeviceState.VERIFIED)
        raw = Raw(conn)
        raw.run(
            _SQL_WHITELIST_ADD,
            {"serial": d.serial, "did": d.id, "bid": d.batch_id, "now": raw.ts(now)},
        )
        self._transition(conn, d.id, device_id, d.state, DeviceState.VERIFIED, now, serial=d.serial)

    def mark_failed(self, device_id: str, code: str, message: str) -> Device:
        """Record why a board failed (attempts + 1); a later issue() may retry it.

        A verified board that fails leaves the whitelist. Codes: unknown-device.
        """
        now = _now()

        def write(conn: Connection) -> None:
            d = self._device_row(conn, device_id)
            self._fail(conn, d.id, device_id, code, message, now)

        return self._step(write, device_id, durable=False)

    def _fail(
        self,
        conn: Connection,
        device_pk: int,
        device_id: str,
        code: str,
        message: str,
        now: datetime,
    ) -> None:
        row = conn.execute(select(devices.c.state).where(devices.c.id == device_pk)).first()
        old = row.state if row is not None else None
        conn.execute(whitelist.delete().where(whitelist.c.device_pk == device_pk))
        conn.execute(
            devices.update()
            .where(devices.c.id == device_pk)
            .values(
                state=DeviceState.FAILED.value,
                failure_code=code,
                failure_message=message[:2000],
                attempts=devices.c.attempts + 1,
                failed_at=now,
                updated_at=now,
                station_id=self.station_id,
            )
        )
        audit.append(
            conn,
            self.station_id,
            "device.state",
            device_id,
            {"from": old, "to": DeviceState.FAILED.value, "code": code, "message": message[:2000]},
            now=now,
        )

    def revoke(self, device_id: str, reason: str) -> Device:
        """Revoke the board's live certificate (ledger and whitelist); the board is ``revoked``.

        Codes: unknown-device, no-certificate.
        """
        if not reason:
            raise PolicyError("a revocation needs a reason", code="bad-reason")
        now = _now()

        def write(conn: Connection) -> None:
            d = self._device_row(conn, device_id)
            if d.cert_id is None or d.cert_state != CertState.ISSUED.value:
                raise NotFoundError(
                    f"device {device_id!r} has no live certificate", code="no-certificate"
                )
            self._revoke_cert(conn, d.cert_id, d.id, device_id, d.serial, reason, now)
            self._transition(conn, d.id, device_id, d.state, DeviceState.REVOKED, now)

        return self._step(write, device_id, durable=True)

    def _revoke_cert(
        self,
        conn: Connection,
        cert_id: int,
        device_pk: int,
        device_id: str,
        serial: str,
        reason: str,
        now: datetime,
    ) -> None:
        conn.execute(whitelist.delete().where(whitelist.c.serial == serial))
        conn.execute(
            certificates.update()
            .where(certificates.c.id == cert_id)
            .values(state=CertState.REVOKED.value, revoked_at=now, revoke_reason=reason)
        )
        audit.append(
            conn,
            self.station_id,
            "cert.revoke",
            device_id,
            {"serial": serial, "reason": reason},
            now=now,
        )

    # Which states a step may start from.
    _FROM: dict[DeviceState, tuple[str, ...]] = {
        DeviceState.KEY_READY: ("new", "key-ready", "failed", "revoked"),
        DeviceState.INSTALLED: ("issued", "installed"),
        DeviceState.VERIFIED: ("issued", "installed"),
    }

    def _require(self, d: _Row, device_id: str, target: DeviceState) -> None:
        allowed = self._FROM[target]
        if d.state not in allowed:
            raise ConflictError(
                f"device {device_id!r} is {d.state}; {target.value} needs {' or '.join(allowed)}",
                code="bad-state",
            )
        needs_cert = target in (DeviceState.INSTALLED, DeviceState.VERIFIED)
        if needs_cert and (d.cert_id is None or d.cert_state != CertState.ISSUED.value):
            raise ConflictError(
                f"device {device_id!r} has no live certificate", code="no-certificate"
            )

    def _transition(
        self,
        conn: Connection,
        device_pk: int,
        device_id: str,
        old: str,
        new: DeviceState,
        now: datetime,
        **detail: Any,
    ) -> None:
        raw = Raw(conn)
        ts = raw.ts(now)
        sets = "state = :state, updated_at = :now, station_id = :station"
        params: dict[str, Any] = {
            "state": new.value,
            "now": ts,
            "station": self.station_id,
            "did": device_pk,
        }
        stamp = _STAMP.get(new)
        if stamp:
            sets += f", {stamp} = :now"
        if "chain_sha256" in detail:
            sets += ", chain_sha256 = :chain"
            params["chain"] = detail["chain_sha256"]
        raw.run(f"UPDATE devices SET {sets} WHERE id = :did", params)  # noqa: S608 - fixed names
        audit.append(
            raw,
            self.station_id,
            "device.state",
            device_id,
            {"from": old, "to": new.value, **detail},
            now=now,
        )

    def _device_row(self, conn: Connection, device_id: str) -> _Row:
        d = _device_by_id(conn, device_id)
        if d is None:
            raise NotFoundError(f"no device {device_id!r} in the ledger", code="unknown-device")
        return d

    # ------------------------------------------------------ proof of possession

    def create_challenge(self, device_id: str, *, ttl: timedelta = CHALLENGE_TTL) -> bytes:
        """A fresh 32-byte nonce for the board to sign; single use, expires after ``ttl``."""
        nonce = secrets.token_bytes(32)
        now = _now()

        def write(conn: Connection) -> None:
            d = self._device_row(conn, device_id)
            raw = Raw(conn)
            raw.run(
                _SQL_INSERT_CHALLENGE,
                {
                    "nonce": nonce.hex(),
                    "did": d.id,
                    "now": raw.ts(now),
                    "expires": raw.ts(now + ttl),
                },
            )

        self._writes.submit(write, durable=False)
        return nonce

    def verify_proof(self, device_id: str, nonce: bytes, signature: bytes) -> Device:
        """Check the board's signature over ``nonce`` with its certificate's key; then verified.

        ECDSA-SHA256 (DER signature) for EC keys, PKCS#1 v1.5 SHA-256 for RSA.
        Codes: no-challenge, challenge-expired, bad-proof, unknown-device, bad-state.
        """
        now = _now()

        def write(conn: Connection) -> StationError | None:
            failure: StationError | None = None
            d = self._device_row(conn, device_id)
            ch = conn.execute(
                select(challenges).where(
                    challenges.c.nonce == nonce.hex(), challenges.c.device_pk == d.id
                )
            ).first()
            if ch is None or ch.used_at is not None:
                raise PolicyError(
                    f"no open challenge with this nonce for {device_id!r}", code="no-challenge"
                )
            # Single use whatever the outcome, so a nonce cannot be tried twice.
            conn.execute(
                challenges.update().where(challenges.c.nonce == ch.nonce).values(used_at=now)
            )
            expires = utc(ch.expires_at)
            if expires is not None and expires < now:
                failure = PolicyError("the challenge has expired", code="challenge-expired")
            elif d.pem is None or d.cert_state != CertState.ISSUED.value:
                failure = ConflictError(
                    f"device {device_id!r} has no live certificate", code="no-certificate"
                )
            elif not _signature_ok(d.pem, nonce, signature):
                failure = PolicyError(
                    "the signature over the nonce does not verify with the certificate's key",
                    code="bad-proof",
                )
            if failure is None:
                self._verify(conn, d, device_id, now)
            else:
                audit.append(
                    conn, self.station_id, "proof.refused", device_id, {"code": failure.code}
                )
            return failure

        # Durable: a good proof whitelists the board; a refused one burns the nonce.
        failure = self._writes.submit(write, durable=True)
        if failure is not None:
            raise failure
        return self.get_device(device_id)

    # ------------------------------------------------------------------ queries

    def get_device(self, device_id: str) -> Device:
        """Codes: unknown-device."""
        with self.engine.connect() as conn:
            return _device_record(conn, device_id)

    def list_devices(
        self,
        batch: str | None = None,
        state: str | None = None,
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> Iterator[Device]:
        """Devices in enrolment order, streamed; ``limit``/``offset`` page them.

        Codes: unknown-batch, bad-state (an unknown state name).
        """
        stmt = _DEVICE_SELECT.order_by(devices.c.id)
        if state is not None:
            if state not in {s.value for s in DeviceState}:
                raise PolicyError(
                    f"state {state!r} is not one of {', '.join(DeviceState)}", code="bad-state"
                )
            stmt = stmt.where(devices.c.state == state)
        if limit is not None:
            stmt = stmt.limit(limit)
        if offset:
            stmt = stmt.offset(offset)
        with self.engine.connect() as conn:
            if batch is not None:
                stmt = stmt.where(devices.c.batch_id == self._batch_id(conn, batch))
        return self._stream(stmt, _device)

    def certificates(self, device_id: str) -> list[CertificateRecord]:
        """Every certificate (and intent) the ledger holds for a board, oldest first."""
        stmt = (
            select(
                certificates,
                devices.c.device_id,
                batches.c.name.label("batch"),
            )
            .select_from(
                certificates.join(devices, devices.c.id == certificates.c.device_pk).join(
                    batches, batches.c.id == certificates.c.batch_id
                )
            )
            .where(devices.c.device_id == device_id)
            .order_by(certificates.c.id)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return [_cert_record(r) for r in rows]

    def certificate(self, serial: int | str) -> CertificateRecord:
        """One certificate by serial (int or lowercase hex). Codes: unknown-certificate."""
        key = serial_hex(serial) if isinstance(serial, int) else serial.lower()
        stmt = (
            select(certificates, devices.c.device_id, batches.c.name.label("batch"))
            .select_from(
                certificates.join(devices, devices.c.id == certificates.c.device_pk).join(
                    batches, batches.c.id == certificates.c.batch_id
                )
            )
            .where(certificates.c.serial == key)
        )
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            raise NotFoundError(f"no certificate with serial {key}", code="unknown-certificate")
        return _cert_record(row)

    def whitelist(self, batch: str | None = None) -> Iterator[WhitelistEntry]:
        """Verified, unrevoked certificates, streamed from the server (constant memory).

        Codes: unknown-batch (checked at once, before the first entry is read).
        """
        stmt = (
            select(
                whitelist.c.serial,
                devices.c.device_id,
                batches.c.name,
                certificates.c.fingerprint,
                certificates.c.not_after,
            )
            .select_from(
                whitelist.join(certificates, certificates.c.serial == whitelist.c.serial)
                .join(devices, devices.c.id == whitelist.c.device_pk)
                .join(batches, batches.c.id == whitelist.c.batch_id)
            )
            .order_by(whitelist.c.serial)
        )
        if batch is not None:
            with self.engine.connect() as conn:
                stmt = stmt.where(whitelist.c.batch_id == self._batch_id(conn, batch))

        def entry(row: _Row) -> WhitelistEntry:
            return WhitelistEntry(
                serial=row.serial,
                device_id=row.device_id,
                batch=row.name,
                fingerprint=row.fingerprint,
                not_after=utc(row.not_after) or _now(),
            )

        return self._stream(stmt, entry)

    def delisted_serials(self) -> Iterator[DelistedCertificate]:
        """Issued or revoked certificates not on the whitelist, by serial, streamed.

        What a whitelist sync must take out of AWS: revoked certificates and those of
        boards that failed (or were never verified). Each carries its fingerprint (the
        AWS certificateId) and whether it was revoked.
        """
        stmt = (
            select(certificates.c.serial, certificates.c.fingerprint, certificates.c.state)
            .select_from(
                certificates.outerjoin(whitelist, whitelist.c.serial == certificates.c.serial)
            )
            .where(
                certificates.c.state.in_([CertState.ISSUED.value, CertState.REVOKED.value]),
                certificates.c.fingerprint.is_not(None),
                whitelist.c.serial.is_(None),
            )
            .order_by(certificates.c.serial)
        )
        return self._stream(
            stmt,
            lambda row: DelistedCertificate(
                serial=row.serial,
                fingerprint=row.fingerprint,
                revoked=row.state == CertState.REVOKED.value,
            ),
        )

    def _stream(self, stmt: Any, convert: Callable[[_Row], Any]) -> Iterator[Any]:
        def rows() -> Iterator[Any]:
            with self.engine.connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=1000).execute(stmt)
                try:
                    for row in result:
                        yield convert(row)
                finally:
                    result.close()

        return rows()

    def _batch_id(self, conn: Connection, name: str) -> int:
        row = _batch_row(conn, name)
        if row is None:
            raise NotFoundError(f"no batch named {name!r}", code="unknown-batch")
        return int(row.id)

    # ------------------------------------------------------------------- audit

    def audit_verify(self) -> audit.BrokenLink | None:
        """The first broken link of the audit chain, or None when it holds."""
        return self.audit_report().broken

    def audit_report(self) -> AuditReport:
        with self.engine.connect() as conn:
            checked, broken, head = audit.verify(conn)
        return AuditReport(entries=checked, broken=broken, head=head)

    def audit_entry_hash(self, seq: int) -> str | None:
        """The stored hash of audit entry ``seq`` (None if there is none): a recorded
        head still in the chain proves no entry up to it was removed."""
        with self.engine.connect() as conn:
            return audit.entry_hash_at(conn, seq)

    # --------------------------------------------------------------- API tokens

    def create_token(self, name: str, role: str) -> str:
        """A new bearer token for the HTTP API; only its SHA-256 is stored.

        Codes: bad-token-name, bad-role, token-exists.
        """
        # Names are printed and logged: no control characters (log injection).
        if not 1 <= len(name) <= 128 or not name.isprintable():
            raise PolicyError("a token name is 1-128 printable characters", code="bad-token-name")
        if role not in TOKEN_ROLES:
            raise PolicyError(
                f"role {role!r} is not one of {', '.join(TOKEN_ROLES)}", code="bad-role"
            )
        token = secrets.token_urlsafe(32)
        now = _now()
        with write_transaction(self.engine) as conn:
            if conn.execute(select(api_tokens.c.id).where(api_tokens.c.name == name)).first():
                raise ConflictError(f"a token named {name!r} exists", code="token-exists")
            conn.execute(
                api_tokens.insert().values(
                    name=name, role=role, token_sha256=_token_hash(token), created_at=now
                )
            )
            audit.append(conn, self.station_id, "token.create", name, {"role": role}, now=now)
        return token

    def lookup_token(self, plaintext: str) -> tuple[str, str] | None:
        """(name, role) of a live token, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(api_tokens.c.name, api_tokens.c.role).where(
                    api_tokens.c.token_sha256 == _token_hash(plaintext),
                    api_tokens.c.revoked_at.is_(None),
                )
            ).first()
        return (row.name, row.role) if row is not None else None

    def revoke_token(self, name: str) -> None:
        """Codes: unknown-token."""
        now = _now()
        with write_transaction(self.engine) as conn:
            done = conn.execute(
                api_tokens.update()
                .where(api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            if done.rowcount != 1:
                raise NotFoundError(f"no live token named {name!r}", code="unknown-token")
            audit.append(conn, self.station_id, "token.revoke", name, {}, now=now)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _cert_record(row: _Row) -> CertificateRecord:
    m = row._mapping
    return CertificateRecord(
        serial=m["serial"],
        device_id=m["device_id"],
        batch=m["batch"],
        station_id=m["station_id"],
        state=m["state"],
        subject=m["subject"],
        public_key_sha256=m["public_key_sha256"],
        fingerprint=m["fingerprint"],
        not_before=utc(m["not_before"]),
        not_after=utc(m["not_after"]),
        pem=m["pem"],
        created_at=utc(m["created_at"]) or _now(),
        issued_at=utc(m["issued_at"]),
        revoked_at=utc(m["revoked_at"]),
        revoke_reason=m["revoke_reason"],
        failure_code=m["failure_code"],
    )


def _signature_ok(pem: str, nonce: bytes, signature: bytes) -> bool:
    key = x509.load_pem_x509_certificate(pem.encode()).public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, nonce, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, nonce, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True
