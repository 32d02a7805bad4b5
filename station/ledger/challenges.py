"""Proof-of-possession challenges: how they are stored and spent (the ``challenges`` table).

Storage only; who may get a challenge and how its answer is checked is
:mod:`station.ledger.proof`'s business. The table stays small by construction:

- a board has at most one open challenge: a new one replaces the old;
- a challenge is spent by any answer, good or bad (its row is deleted, so a
  nonce cannot be tried twice and used challenges are not kept);
- expired challenges of every board are purged whenever one is made.
"""

from __future__ import annotations

from datetime import datetime

from station.ledger.rawsql import Raw
from station.ledger.records import utc

_SQL_PURGE = "DELETE FROM challenges WHERE device_pk = :did OR expires_at < :now"
_SQL_INSERT = (
    "INSERT INTO challenges (nonce, device_pk, created_at, expires_at) "
    "VALUES (:nonce, :did, :now, :expires)"
)
_SQL_FIND = "SELECT expires_at FROM challenges WHERE nonce = :nonce AND device_pk = :did"
_SQL_SPEND = "DELETE FROM challenges WHERE nonce = :nonce AND device_pk = :did"


def replace(raw: Raw, nonce: bytes, device_pk: int, now: datetime, expires: datetime) -> None:
    """Make ``nonce`` the board's one open challenge; drop every expired one."""
    ts = raw.ts(now)
    raw.run(_SQL_PURGE, {"did": device_pk, "now": ts})
    raw.run(
        _SQL_INSERT,
        {"nonce": nonce.hex(), "did": device_pk, "now": ts, "expires": raw.ts(expires)},
    )


def spend(raw: Raw, nonce: bytes, device_pk: int) -> datetime | None:
    """The expiry of the board's challenge with this nonce, which is deleted; None when
    there is no such challenge."""
    params = {"nonce": nonce.hex(), "did": device_pk}
    row = raw.first(_SQL_FIND, params)
    if row is None:
        return None
    raw.run(_SQL_SPEND, params)
    value = row["expires_at"]
    expires = utc(datetime.fromisoformat(value) if isinstance(value, str) else value)
    assert expires is not None  # NOT NULL
    return expires
