"""Certificates and the whitelist: how they are stored and loaded.

Storage only. An intent row reserves a serial before the token signs; the
commit fills in the certificate; the whitelist holds the serials of verified
boards. Hot statements are SQL text beside the tables they touch; every row is
read by column name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from sqlalchemy import Connection, Select, select

from station.ledger.rawsql import Raw
from station.ledger.records import CertificateRecord, utc
from station.ledger.schema import CertState, batches, certificates, devices, whitelist
from station.whitelist import DelistedCertificate, WhitelistEntry, serial_hex

_NOT_FAILED = f"'{CertState.FAILED.value}'"

# Which board (and serial) already holds a public key: every board needs its own.
# Both columns come from the same certificate row: the first (by id) that holds the key.
KEY_HOLDER_COLUMNS = (
    "(SELECT hd.device_id FROM certificates hc JOIN devices hd ON hd.id = hc.device_pk "  # noqa: S608 - fixed text
    f"WHERE hc.public_key_sha256 = :pk AND hc.state != {_NOT_FAILED} "
    "ORDER BY hc.id LIMIT 1) AS holder_device, "
    "(SELECT hc.serial FROM certificates hc "
    f"WHERE hc.public_key_sha256 = :pk AND hc.state != {_NOT_FAILED} "
    "ORDER BY hc.id LIMIT 1) AS holder_serial"
)
_SQL_INSERT_INTENT = (
    "INSERT INTO certificates (serial, device_pk, batch_id, station_id, state, csr_der, "  # noqa: S608 - fixed text
    "public_key_sha256, subject, sign_time, days, backdate_seconds, created_at, station_made_key) "
    f"VALUES (:serial, :device_pk, :batch_id, :station_id, '{CertState.INTENT.value}', "
    ":csr_der, :pk, :subject, :now, :days, :backdate, :now, :made) RETURNING id"
)
_SQL_MARK_ISSUED = (
    f"UPDATE certificates SET state = '{CertState.ISSUED.value}', pem = :pem, fingerprint = :fp, "  # noqa: S608 - fixed text
    "not_before = :nb, not_after = :na, issued_at = :now "
    f"WHERE id = :cid AND state = '{CertState.INTENT.value}'"
)
_SQL_WHITELIST_ADD = (
    "INSERT INTO whitelist (serial, device_pk, batch_id, added_at) "
    "VALUES (:serial, :did, :bid, :now)"
)


@dataclass(frozen=True, slots=True)
class SignedCertificate:
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
    ) -> SignedCertificate:
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


def insert_intent(
    raw: Raw,
    *,
    serial: str,
    device_pk: int,
    batch_id: int,
    station_id: str,
    csr_der: bytes,
    public_key_sha256: str,
    subject: str,
    now: datetime,
    days: int,
    backdate_seconds: int,
    station_made_key: bool = False,
) -> int:
    """Reserve ``serial`` for a board before the token signs; returns the row id.

    ``station_made_key``: the key is the station's, held only in memory (EST
    serverkeygen); recovery abandons such an intent rather than sign it again."""
    params = {
        "serial": serial,
        "device_pk": device_pk,
        "batch_id": batch_id,
        "station_id": station_id,
        "csr_der": csr_der,
        "pk": public_key_sha256,
        "subject": subject,
        "now": raw.ts(now),
        "days": days,
        "backdate": backdate_seconds,
        "made": station_made_key,
    }
    return int(raw.value(_SQL_INSERT_INTENT, params))


def mark_issued(raw: Raw, signed: SignedCertificate, now: datetime) -> bool:
    """Fill in the intent with its certificate; False when it was resolved elsewhere."""
    done = raw.run(
        _SQL_MARK_ISSUED,
        {
            "cid": signed.cert_id,
            "pem": signed.pem,
            "fp": signed.fingerprint,
            "nb": raw.ts(signed.not_before),
            "na": raw.ts(signed.not_after),
            "now": raw.ts(now),
        },
    )
    return bool(done.rowcount == 1)


def mark_abandoned(conn: Connection, cert_id: int, code: str) -> bool:
    """An intent that will never be signed; False when it was resolved meanwhile."""
    done = conn.execute(
        certificates.update()
        .where(certificates.c.id == cert_id, certificates.c.state == CertState.INTENT.value)
        .values(state=CertState.FAILED.value, failure_code=code)
    )
    return bool(done.rowcount == 1)


def mark_revoked(conn: Connection, cert_id: int, serial: str, reason: str, now: datetime) -> None:
    """Revoke a certificate and take its serial off the whitelist."""
    conn.execute(whitelist.delete().where(whitelist.c.serial == serial))
    conn.execute(
        certificates.update()
        .where(certificates.c.id == cert_id)
        .values(state=CertState.REVOKED.value, revoked_at=now, revoke_reason=reason)
    )


@dataclass(frozen=True, slots=True)
class Intent:
    """An intent a crash left unsigned or uncommitted, with what re-signing needs."""

    id: int
    serial: str
    device_pk: int
    device_id: str
    csr_der: bytes
    sign_time: datetime
    days: int
    backdate_seconds: int
    subject_template: str
    crl_url: str | None = None
    ocsp_url: str | None = None
    renews: str | None = None  # a field renewal's predecessor
    station_made_key: bool = False  # the key died with the process: never signed again


def open_intents(
    conn: Connection, *, station_id: str | None, created_before: datetime | None
) -> list[Intent]:
    """Intents without a certificate, oldest first (``station_id=None``: every station's)."""
    stmt = (
        select(
            certificates.c.id,
            certificates.c.serial,
            certificates.c.device_pk,
            certificates.c.csr_der,
            certificates.c.sign_time,
            certificates.c.days,
            certificates.c.backdate_seconds,
            certificates.c.renews,
            certificates.c.station_made_key,
            devices.c.device_id,
            batches.c.subject_template,
            batches.c.crl_url,
            batches.c.ocsp_url,
        )
        .select_from(
            certificates.join(devices, devices.c.id == certificates.c.device_pk).join(
                batches, batches.c.id == certificates.c.batch_id
            )
        )
        .where(certificates.c.state == CertState.INTENT.value)
        .order_by(certificates.c.id)
    )
    if station_id is not None:
        stmt = stmt.where(certificates.c.station_id == station_id)
    if created_before is not None:
        stmt = stmt.where(certificates.c.created_at < created_before)
    out = []
    for row in conn.execute(stmt):
        m = row._mapping
        sign_time = utc(m["sign_time"])
        assert sign_time is not None  # NOT NULL
        out.append(
            Intent(
                id=m["id"],
                serial=m["serial"],
                device_pk=m["device_pk"],
                device_id=m["device_id"],
                csr_der=m["csr_der"],
                sign_time=sign_time,
                days=m["days"],
                backdate_seconds=m["backdate_seconds"],
                subject_template=m["subject_template"],
                crl_url=m["crl_url"],
                ocsp_url=m["ocsp_url"],
                renews=m["renews"],
                station_made_key=bool(m["station_made_key"]),
            )
        )
    return out


_RECORD_SELECT = select(
    certificates, devices.c.device_id, batches.c.name.label("batch")
).select_from(
    certificates.join(devices, devices.c.id == certificates.c.device_pk).join(
        batches, batches.c.id == certificates.c.batch_id
    )
)


def _record(row: Any) -> CertificateRecord:
    m = row._mapping
    created = utc(m["created_at"])
    assert created is not None  # NOT NULL
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
        created_at=created,
        issued_at=utc(m["issued_at"]),
        revoked_at=utc(m["revoked_at"]),
        revoke_reason=m["revoke_reason"],
        failure_code=m["failure_code"],
        renews=m["renews"],
    )


def of_device(conn: Connection, device_id: str) -> list[CertificateRecord]:
    """Every certificate (and intent) of a board, oldest first."""
    stmt = _RECORD_SELECT.where(devices.c.device_id == device_id).order_by(certificates.c.id)
    return [_record(r) for r in conn.execute(stmt)]


def by_serial(conn: Connection, serial: str) -> CertificateRecord | None:
    row = conn.execute(_RECORD_SELECT.where(certificates.c.serial == serial)).first()
    return None if row is None else _record(row)


# ------------------------------------------------------------------- whitelist


def whitelist_add(raw: Raw, serial: str, device_pk: int, batch_id: int, now: datetime) -> None:
    raw.run(
        _SQL_WHITELIST_ADD,
        {"serial": serial, "did": device_pk, "bid": batch_id, "now": raw.ts(now)},
    )


def whitelist_remove_device(conn: Connection, device_pk: int) -> None:
    conn.execute(whitelist.delete().where(whitelist.c.device_pk == device_pk))


def whitelist_select(batch_id: int | None = None) -> Select[Any]:
    """Verified, unrevoked certificates, by serial (see :func:`whitelist_entry`)."""
    stmt = (
        select(
            whitelist.c.serial,
            devices.c.device_id,
            batches.c.name.label("batch"),
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
    if batch_id is not None:
        stmt = stmt.where(whitelist.c.batch_id == batch_id)
    return stmt


def whitelist_entry(row: Any) -> WhitelistEntry:
    m: Mapping[str, Any] = row._mapping
    not_after = utc(m["not_after"])
    assert not_after is not None  # whitelisted certificates are issued ones
    return WhitelistEntry(
        serial=m["serial"],
        device_id=m["device_id"],
        batch=m["batch"],
        fingerprint=m["fingerprint"],
        not_after=not_after,
    )


def delisted_select() -> Select[Any]:
    """Issued or revoked certificates not on the whitelist, by serial (see :func:`delisted`)."""
    return (
        select(certificates.c.serial, certificates.c.fingerprint, certificates.c.state)
        .select_from(certificates.outerjoin(whitelist, whitelist.c.serial == certificates.c.serial))
        .where(
            certificates.c.state.in_(
                [CertState.ISSUED.value, CertState.REVOKED.value, CertState.SUPERSEDED.value]
            ),
            certificates.c.fingerprint.is_not(None),
            whitelist.c.serial.is_(None),
        )
        .order_by(certificates.c.serial)
    )


def delisted(row: Any) -> DelistedCertificate:
    m: Mapping[str, Any] = row._mapping
    return DelistedCertificate(
        serial=m["serial"],
        fingerprint=m["fingerprint"],
        revoked=m["state"] == CertState.REVOKED.value,
    )
