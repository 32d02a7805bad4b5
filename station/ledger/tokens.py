"""API bearer tokens: how they are stored and looked up (the ``api_tokens`` table).

Only a token's SHA-256 is stored. The roles are defined here, once: the HTTP
API's authorisation (api/auth.py) uses this enum.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from enum import StrEnum

from sqlalchemy import Connection, select

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


def insert(conn: Connection, name: str, role: Role, token: str, now: datetime) -> None:
    conn.execute(
        api_tokens.insert().values(
            name=name, role=role.value, token_sha256=token_hash(token), created_at=now
        )
    )


def live(conn: Connection, token: str) -> tuple[str, str] | None:
    """(name, role) of the live token with this plaintext, or None."""
    row = conn.execute(
        select(api_tokens.c.name, api_tokens.c.role).where(
            api_tokens.c.token_sha256 == token_hash(token), api_tokens.c.revoked_at.is_(None)
        )
    ).first()
    return None if row is None else (row.name, row.role)


def revoke(conn: Connection, name: str, now: datetime) -> bool:
    """False when there is no live token of that name."""
    done = conn.execute(
        api_tokens.update()
        .where(api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return bool(done.rowcount == 1)
