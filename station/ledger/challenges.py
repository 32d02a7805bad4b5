"""Proof-of-possession challenges: how they are stored and taken (the ``challenges`` table).

Storage only; what a challenge is and how its answer is checked is
:mod:`station.ledger.proof`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select

from station.ledger.rawsql import Raw
from station.ledger.records import utc
from station.ledger.schema import challenges

_SQL_INSERT = (
    "INSERT INTO challenges (nonce, device_pk, created_at, expires_at) "
    "VALUES (:nonce, :did, :now, :expires)"
)


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes
    expires_at: datetime
    used: bool


def insert(raw: Raw, nonce: bytes, device_pk: int, now: datetime, expires: datetime) -> None:
    raw.run(
        _SQL_INSERT,
        {"nonce": nonce.hex(), "did": device_pk, "now": raw.ts(now), "expires": raw.ts(expires)},
    )


def take(conn: Connection, nonce: bytes, device_pk: int, now: datetime) -> Challenge | None:
    """The device's challenge with this nonce, marked used (single use whatever the
    answer, so a nonce cannot be tried twice); None when there is no such challenge."""
    row = conn.execute(
        select(challenges.c.expires_at, challenges.c.used_at).where(
            challenges.c.nonce == nonce.hex(), challenges.c.device_pk == device_pk
        )
    ).first()
    if row is None:
        return None
    conn.execute(challenges.update().where(challenges.c.nonce == nonce.hex()).values(used_at=now))
    expires = utc(row.expires_at)
    assert expires is not None  # NOT NULL
    return Challenge(nonce=nonce, expires_at=expires, used=row.used_at is not None)
