"""API bearer tokens: how they are stored and looked up (the ``api_tokens`` table).

Only a token's SHA-256 is stored; a :class:`TokenRecord` never carries it. The
roles are defined here, once: the HTTP API's authorisation (api/auth.py) uses this
enum. A token is live while it is neither revoked nor past ``expires_at``.
``last_used_at`` is written when a lookup finds it more than LAST_USED_GRANULARITY
old, so a busy token costs one small write a minute, not one per request (and the
API's workers look a token up at most every 5 s anyway, api/token_cache.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, or_, select

from station.errors import PolicyError
from station.ledger.records import utc
from station.ledger.schema import api_tokens


class Role(StrEnum):
    """What a token may do (the README's role table says which route each may call)."""

    BOARD = "board"
    OPERATOR = "operator"
    QA = "qa"
    ADMIN = "admin"


TOKEN_ROLES = tuple(r.value for r in Role)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def exists(conn: Connection, name: str) -> bool:
    return (
        conn.execute(select(api_tokens.c.id).where(api_tokens.c.name == name)).first() is not None
    )


def insert(
    conn: Connection,
    name: str,
    role: Role,
    token: str,
    now: datetime,
    expires_at: datetime | None = None,
) -> None:
    conn.execute(
        api_tokens.insert().values(
            name=name,
            role=role.value,
            token_sha256=token_hash(token),
            created_at=now,
            expires_at=expires_at,
        )
    )


def revoke(conn: Connection, name: str, now: datetime) -> bool:
    """False when there is no live token of that name."""
    done = conn.execute(
        api_tokens.update()
        .where(api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return bool(done.rowcount == 1)


LAST_USED_GRANULARITY = timedelta(seconds=60)
_COLUMNS = (
    api_tokens.c.id,
    api_tokens.c.name,
    api_tokens.c.role,
    api_tokens.c.created_at,
    api_tokens.c.last_used_at,
    api_tokens.c.expires_at,
    api_tokens.c.revoked_at,
)


@dataclass(frozen=True)
class TokenRecord:
    name: str
    role: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


def record(row: Any) -> TokenRecord:
    return TokenRecord(
        name=row.name,
        role=row.role,
        created_at=utc(row.created_at) or datetime.min,
        last_used_at=utc(row.last_used_at),
        expires_at=utc(row.expires_at),
        revoked_at=utc(row.revoked_at),
    )


def check_lifetime(expires_in: timedelta | None) -> None:
    """Code: bad-duration."""
    if expires_in is not None and expires_in <= timedelta(0):
        raise PolicyError("a token's lifetime must be positive", code="bad-duration")


def live_row(conn: Connection, token: str, now: datetime) -> Any:
    """The live token with this plaintext (id, name, role, ... last_used_at), or None."""
    return conn.execute(
        select(*_COLUMNS).where(
            api_tokens.c.token_sha256 == token_hash(token),
            api_tokens.c.revoked_at.is_(None),
            or_(api_tokens.c.expires_at.is_(None), api_tokens.c.expires_at > now),
        )
    ).first()


def needs_touch(row: Any, now: datetime) -> bool:
    last = utc(row.last_used_at)
    return last is None or now - last >= LAST_USED_GRANULARITY


def touch(conn: Connection, token_id: int, now: datetime) -> None:
    conn.execute(api_tokens.update().where(api_tokens.c.id == token_id).values(last_used_at=now))


def all_records(conn: Connection) -> list[TokenRecord]:
    rows = conn.execute(select(*_COLUMNS).order_by(api_tokens.c.created_at, api_tokens.c.id))
    return [record(r) for r in rows]


def by_name(conn: Connection, name: str) -> TokenRecord | None:
    row = conn.execute(select(*_COLUMNS).where(api_tokens.c.name == name)).first()
    return None if row is None else record(row)
