"""The ledger's tables, as SQLAlchemy Core metadata.

The Alembic migrations in ``station/migrations/versions`` create exactly this
schema (a test compares the two), so this module is what code reads and the
migrations are what databases get.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
    text,
)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)


class KeyMode(StrEnum):
    BOARD_ECC = "board-ecc"
    SEE_RSA = "see-rsa"


class BatchState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class DeviceState(StrEnum):
    NEW = "new"
    KEY_READY = "key-ready"
    ISSUED = "issued"
    INSTALLED = "installed"
    VERIFIED = "verified"
    FAILED = "failed"
    REVOKED = "revoked"


class CertState(StrEnum):
    INTENT = "intent"  # serial reserved, CSR recorded, not signed (or signed but not committed)
    ISSUED = "issued"  # signed and recorded: a live certificate
    REVOKED = "revoked"
    FAILED = "failed"  # the intent was abandoned; no certificate was ever released
    RENEWING = "renewing"  # still whitelisted while its successor is signed (succession.py)
    SUPERSEDED = "superseded"  # replaced by a confirmed successor; not revoked


def _in(column: str, enum: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(m.value) for m in enum)})"


TS = DateTime(timezone=True)

batches = Table(
    "batches",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("product", String(128), nullable=False),
    Column("planned_count", Integer, nullable=False),
    Column("key_mode", String(16), nullable=False),
    Column("subject_template", String(512), nullable=False),
    Column("days", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("operator", String(128), nullable=True),
    Column("station_id", String(128), nullable=False),
    # Devices enrolled in the batch, kept here so `batch-full` costs no COUNT(*).
    Column("device_count", Integer, nullable=False, server_default="0"),
    Column("created_at", TS, nullable=False),
    Column("closed_at", TS, nullable=True),
    # Written into the batch's device certificates: CRL distribution point and the
    # AIA OCSP responder URL (station.publish serves both). NULL: none.
    Column("crl_url", String(512), nullable=True),
    Column("ocsp_url", String(512), nullable=True),
    CheckConstraint(_in("key_mode", KeyMode), name="key_mode"),
    CheckConstraint(_in("state", BatchState), name="state"),
    CheckConstraint("planned_count > 0", name="planned_count"),
    CheckConstraint("days > 0", name="days"),
)

devices = Table(
    "devices",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("device_id", String(128), nullable=False, unique=True),  # the board's hardware id
    Column("batch_id", Integer, ForeignKey("batches.id"), nullable=False),
    Column("state", String(16), nullable=False),
    Column("failure_code", String(64), nullable=True),
    Column("failure_message", Text, nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("station_id", String(128), nullable=False),  # the station that last touched it
    Column("chain_sha256", String(64), nullable=True),  # digest the board reported
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Column("key_ready_at", TS, nullable=True),
    Column("issued_at", TS, nullable=True),
    Column("installed_at", TS, nullable=True),
    Column("verified_at", TS, nullable=True),
    Column("failed_at", TS, nullable=True),
    Column("revoked_at", TS, nullable=True),
    CheckConstraint(_in("state", DeviceState), name="state"),
    Index(None, "batch_id", "state"),
)

certificates = Table(
    "certificates",
    metadata,
    Column("id", Integer, primary_key=True),
    # Lowercase hex (159-bit serials do not fit BIGINT); UNIQUE is what makes
    # serials unique, not the odds of the random generator.
    Column("serial", String(40), nullable=False, unique=True),
    Column("device_pk", Integer, ForeignKey("devices.id"), nullable=False),
    Column("batch_id", Integer, ForeignKey("batches.id"), nullable=False),
    Column("station_id", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("csr_der", LargeBinary, nullable=False),
    Column("public_key_sha256", String(64), nullable=False),
    Column("subject", String(1024), nullable=False),  # RFC 4514 of the issued subject
    # The instant handed to the CA, so a recovered intent signs the same TBS.
    Column("sign_time", TS, nullable=False),
    Column("days", Integer, nullable=False),
    Column("backdate_seconds", Integer, nullable=False),
    Column("fingerprint", String(64), nullable=True, unique=True),  # SHA-256 of the DER
    Column("not_before", TS, nullable=True),
    Column("not_after", TS, nullable=True),
    Column("pem", Text, nullable=True),
    Column("created_at", TS, nullable=False),
    Column("issued_at", TS, nullable=True),
    Column("revoked_at", TS, nullable=True),
    Column("revoke_reason", String(256), nullable=True),
    Column("failure_code", String(64), nullable=True),
    # The serial this certificate succeeded (field renewal), if any.
    Column("renews", String(40), nullable=True),
    # The station made the key (EST serverkeygen) and kept it only in memory: an
    # intent a crash left cannot be signed again for a key nobody holds any more.
    Column("station_made_key", Boolean, nullable=False, server_default=false()),
    CheckConstraint(_in("state", CertState), name="state"),
    # One public key, one certificate, across the whole ledger (abandoned intents aside).
    Index(
        "uq_certificates_public_key_sha256",
        "public_key_sha256",
        unique=True,
        sqlite_where=text("state <> 'failed'"),
        postgresql_where=text("state <> 'failed'"),
    ),
    # At most one live identity (or pending intent) per board, enforced by the database.
    Index(
        "uq_certificates_live_device",
        "device_pk",
        unique=True,
        sqlite_where=text("state IN ('intent', 'issued')"),
        postgresql_where=text("state IN ('intent', 'issued')"),
    ),
    Index(None, "state", "station_id"),
    # A device's certificates, whatever their state: the partial index above does
    # not serve joins on device_pk with state = 'issued' (SQLite's planner then
    # scans every issued certificate per device).
    Index(None, "device_pk"),
)

whitelist = Table(
    "whitelist",
    metadata,
    Column("serial", String(40), ForeignKey("certificates.serial"), primary_key=True),
    Column("device_pk", Integer, ForeignKey("devices.id"), nullable=False, unique=True),
    Column("batch_id", Integer, ForeignKey("batches.id"), nullable=False),
    Column("added_at", TS, nullable=False),
    Index(None, "batch_id"),
)

challenges = Table(
    "challenges",
    metadata,
    Column("nonce", String(128), primary_key=True),  # hex
    Column("device_pk", Integer, ForeignKey("devices.id"), nullable=False),
    Column("created_at", TS, nullable=False),
    Column("expires_at", TS, nullable=False),
    Column("used_at", TS, nullable=True),
    # One open challenge per board (replaced by device), expired ones purged by time.
    Index(None, "device_pk"),
    Index(None, "expires_at"),
)

# CMP transactions (RFC 4210): a transactionID is used once; the certConf of a
# certificate must come back with our nonce (station/ledger/cmp_transactions.py).
cmp_transactions = Table(
    "cmp_transactions",
    metadata,
    Column("transaction_id", String(64), primary_key=True),  # hex, at most 32 bytes
    Column("sender_kid", String(256), nullable=False),
    Column("state", String(16), nullable=False),  # waiting, confirmed, rejected, refused
    Column("serial", String(40), nullable=True),
    Column("device_id", String(128), nullable=True),
    Column("our_nonce", String(64), nullable=True),  # hex, the senderNonce of our answer
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    # seq is assigned by the writer (previous + 1) under the chain lock, so a
    # deleted row shows as a gap as well as a broken hash.
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at", String(40), nullable=False),  # ISO 8601 UTC, hashed as stored
    Column("station_id", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("entity", String(256), nullable=False),
    Column("detail", Text, nullable=False),  # canonical JSON
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("role", String(32), nullable=False),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("created_at", TS, nullable=False),
    Column("revoked_at", TS, nullable=True),
    Column("expires_at", TS, nullable=True),  # None: until revoked
    Column("last_used_at", TS, nullable=True),  # at most a minute stale (see Ledger)
)

crls = Table(
    "crls",
    metadata,
    # CRL numbers only grow (RFC 5280 5.2.3): the next is the largest + 1, and the
    # primary key refuses a second CRL with the same number from another worker.
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("ca_fingerprint", String(64), nullable=False),  # SHA-256 of the signing CA cert
    Column("this_update", TS, nullable=False),
    Column("next_update", TS, nullable=False),
    # Revocations are never undone, so a CRL listing as many as the ledger holds is current.
    Column("revoked_count", Integer, nullable=False),
    Column("station_id", String(128), nullable=False),
    Column("der", LargeBinary, nullable=False),
)

aws_certificate_status = Table(
    "aws_certificate_status",
    metadata,
    # Only revoked certificates have a row: the AWS IoT status a whitelist sync last
    # saw or set (NULL: AWS IoT did not know the certificate, it never connected).
    # REVOKED is final in AWS, so a certificate recorded REVOKED costs no call again.
    Column("serial", String(40), ForeignKey("certificates.serial"), primary_key=True),
    Column("status", String(32), nullable=True),
    Column("checked_at", TS, nullable=False),
)
