"""The ledger's revocations as relying parties see them: serial, time, reason.

A read-only query over the ledger's tables, kept apart from the ledger's writers.
The ledger stores a revocation's reason as text (``station revoke --reason``); a
reason that names an RFC 5280 reason code (``key-compromise``, ``keyCompromise``,
``superseded``...) is published as that code, the station's own re-provisioning
(``reprovisioned``) as ``superseded``, and any other text as no reason code
(RFC 5280 5.3.1: "unspecified" SHOULD be left out).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from station.ledger.rawsql import Raw
from station.ledger.schema import CertState, certificates
from station.whitelist import serial_hex

_REASONS: dict[str, x509.ReasonFlags] = {
    re.sub(r"[^a-z]", "", flag.value.lower()): flag
    for flag in x509.ReasonFlags
    if flag not in (x509.ReasonFlags.unspecified, x509.ReasonFlags.remove_from_crl)
}
_REASONS["reprovisioned"] = x509.ReasonFlags.superseded


def reason_flag(text: str | None) -> x509.ReasonFlags | None:
    """The RFC 5280 reason code a ledger reason names, or None (no reason code)."""
    if not text:
        return None
    return _REASONS.get(re.sub(r"[^a-z]", "", text.lower()))


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Revocation:
    serial: int
    revoked_at: datetime  # timezone-aware UTC
    reason: x509.ReasonFlags | None


@dataclass(frozen=True, slots=True)
class SerialStatus:
    """What the ledger says of one serial: ``good``, ``revoked`` or ``unknown``."""

    status: str
    revoked_at: datetime | None = None
    reason: x509.ReasonFlags | None = None


_SQL_STATUS = "SELECT state, revoked_at, revoke_reason FROM certificates WHERE serial = :serial"


def revoked_count(engine: Engine) -> int:
    with engine.connect() as conn:
        count = conn.execute(
            select(func.count())
            .select_from(certificates)
            .where(certificates.c.state == CertState.REVOKED.value)
        ).scalar_one()
    return int(count)


def revocations(engine: Engine) -> Iterator[Revocation]:
    """Every revoked certificate, in serial order, streamed (constant memory)."""
    stmt = (
        select(certificates.c.serial, certificates.c.revoked_at, certificates.c.revoke_reason)
        .where(certificates.c.state == CertState.REVOKED.value)
        .order_by(certificates.c.serial)
    )
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=5000).execute(stmt)
        try:
            for serial, revoked_at, reason in result:
                yield Revocation(int(serial, 16), _utc(revoked_at), reason_flag(reason))
        finally:
            result.close()


_GOOD = frozenset({CertState.ISSUED.value, CertState.RENEWING.value, CertState.SUPERSEDED.value})


def serial_status(engine: Engine, serial: int) -> SerialStatus:
    """OCSP's view of one serial: issued (live), renewing or superseded is good,
    revoked is revoked; a serial never issued, an abandoned intent or one not yet
    committed is unknown."""
    if serial <= 0:
        return SerialStatus("unknown")
    # The hot statement of every OCSP answer: on the driver's cursor (station.ledger.rawsql),
    # a third of the cost of the same SELECT through SQLAlchemy Core.
    with engine.connect() as conn:
        row = Raw(conn).first(_SQL_STATUS, {"serial": serial_hex(serial)})
    if row is None:
        return SerialStatus("unknown")
    if row["state"] == CertState.REVOKED.value:
        revoked_at = row["revoked_at"]
        if isinstance(revoked_at, str):  # SQLite's DATETIME text, as SQLAlchemy wrote it
            revoked_at = datetime.fromisoformat(revoked_at)
        return SerialStatus("revoked", _utc(revoked_at), reason_flag(row["revoke_reason"]))
    # Live, or stepping aside for / replaced by a renewal (station/ledger/succession.py):
    # never revoked, so good as RFC 6960 means it.
    if row["state"] in _GOOD:
        return SerialStatus("good")
    return SerialStatus("unknown")
