"""Which revoked certificates a whitelist sync must still set REVOKED in AWS IoT.

A certificate revoked in the ledger must end REVOKED in AWS IoT whatever happened
before: whitelisted and ACTIVE, a failed board's certificate the sync made
INACTIVE (its item already gone), or one the JITR Lambda left INACTIVE because it
connected before its batch was synced. The table ``aws_certificate_status`` keeps,
for each revoked certificate, the AWS IoT status the sync last saw or set: one
recorded REVOKED (final in AWS) costs no call again; one AWS IoT did not know
(never connected) is looked at again after ``recheck``, so a sync stays bounded
however many revoked boards the ledger holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.engine import Engine

from station.ledger.db import write_transaction
from station.ledger.schema import CertState, aws_certificate_status, certificates
from station.whitelist import DelistedCertificate

DEFAULT_RECHECK = timedelta(hours=1)


class RevokedInAws:
    """The ledger's record of revoked certificates' AWS IoT status."""

    def __init__(self, engine: Engine, *, recheck: timedelta = DEFAULT_RECHECK) -> None:
        self.engine = engine
        self.recheck = recheck

    def due(self, now: datetime | None = None, *, limit: int = 1000) -> list[DelistedCertificate]:
        """Revoked certificates not known REVOKED in AWS IoT whose check is due, at most
        ``limit`` of them (a backlog is worked through over the next syncs)."""
        now = now or datetime.now(UTC)
        s = aws_certificate_status
        stmt = (
            select(certificates.c.serial, certificates.c.fingerprint)
            .select_from(certificates.outerjoin(s, s.c.serial == certificates.c.serial))
            .where(
                certificates.c.state == CertState.REVOKED.value,
                certificates.c.fingerprint.is_not(None),
                or_(
                    s.c.serial.is_(None),
                    and_(s.c.status.is_not(None), s.c.status != "REVOKED"),
                    and_(
                        s.c.status.is_(None),
                        or_(
                            s.c.checked_at < now - self.recheck,
                            s.c.checked_at < certificates.c.revoked_at,
                        ),
                    ),
                ),
            )
            .order_by(certificates.c.serial)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [
                DelistedCertificate(serial=row.serial, fingerprint=row.fingerprint, revoked=True)
                for row in conn.execute(stmt)
            ]

    def record(self, seen: Mapping[str, str | None], now: datetime | None = None) -> None:
        """Store the AWS IoT status seen (None: unknown to AWS IoT) of each serial."""
        if not seen:
            return
        now = now or datetime.now(UTC)
        s = aws_certificate_status
        with write_transaction(self.engine) as conn:
            serials = list(seen)
            known: set[str] = set()
            for start in range(0, len(serials), 500):
                chunk = serials[start : start + 500]
                known.update(
                    conn.execute(select(s.c.serial).where(s.c.serial.in_(chunk))).scalars()
                )
            for serial, status in seen.items():
                if serial in known:
                    conn.execute(
                        update(s).where(s.c.serial == serial).values(status=status, checked_at=now)
                    )
                else:
                    conn.execute(s.insert().values(serial=serial, status=status, checked_at=now))
