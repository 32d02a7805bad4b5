"""What the ledger hands out: frozen records, never live database rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509

from station.ledger.audit import BrokenLink


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; the ledger only ever stores UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Batch:
    name: str
    product: str
    planned_count: int
    key_mode: str
    subject_template: str
    days: int
    state: str
    operator: str | None
    station_id: str
    device_count: int
    created_at: datetime
    closed_at: datetime | None
    crl_url: str | None = None
    ocsp_url: str | None = None


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    batch: str
    state: str
    failure_code: str | None
    failure_message: str | None
    attempts: int
    station_id: str
    chain_sha256: str | None
    serial: str | None  # the live certificate's serial (lowercase hex), if any
    created_at: datetime
    updated_at: datetime
    key_ready_at: datetime | None
    issued_at: datetime | None
    installed_at: datetime | None
    verified_at: datetime | None
    failed_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: str
    device_id: str
    batch: str
    station_id: str
    state: str
    subject: str
    public_key_sha256: str
    fingerprint: str | None
    not_before: datetime | None
    not_after: datetime | None
    pem: str | None
    created_at: datetime
    issued_at: datetime | None
    revoked_at: datetime | None
    revoke_reason: str | None
    failure_code: str | None
    renews: str | None = None  # the serial this certificate succeeds (a renewal)


@dataclass(frozen=True, slots=True)
class IssueResult:
    certificate: x509.Certificate
    chain_pem: bytes  # the device certificate followed by the CA chain, PEM
    serial: int
    fingerprint: str  # SHA-256 of the certificate DER, lowercase hex (AWS certificateId)
    reused: bool  # True when an idempotent re-request got the certificate it already had
    device_id: str = ""
    batch: str = ""


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What recover() did with the intents it found without a certificate."""

    resigned: tuple[str, ...]  # serials now issued
    failed: tuple[tuple[str, str], ...]  # (serial, reason code) marked failed


@dataclass(frozen=True, slots=True)
class AuditReport:
    entries: int  # entries checked before the first broken link (all of them if none)
    broken: BrokenLink | None  # None when the chain holds
    # (seq, hash) of the last good entry: the chain's head when it holds; None if empty
    head: tuple[int, str] | None = None
