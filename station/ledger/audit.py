"""The append-only, hash-chained audit log.

Each entry stores the hash of the one before it and its own hash, SHA-256 over
a canonical JSON encoding of its fields and that previous hash. Entries are
appended inside the write transaction that makes the change they describe, so
the log and the state can never disagree, and writers are serialised (SQLite
``BEGIN IMMEDIATE``, PostgreSQL advisory lock) so the chain stays linear.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select

from station.ledger.rawsql import Raw
from station.ledger.schema import audit_log

GENESIS = "0" * 64


# Built once: json.dumps() with these arguments builds a new encoder on every call,
# which was a tenth of the audit log's cost per entry.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
).encode


def canonical(value: Any) -> str:
    return _CANONICAL(value)


def entry_hash(
    seq: int, at: str, station_id: str, action: str, entity: str, detail: str, prev_hash: str
) -> str:
    body = canonical([seq, at, station_id, action, entity, detail, prev_hash])
    return hashlib.sha256(body.encode()).hexdigest()


_LAST_SQL = "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
_INSERT_SQL = (
    "INSERT INTO audit_log (seq, at, station_id, action, entity, detail, prev_hash, hash) "
    "VALUES (:seq, :at, :station_id, :action, :entity, :detail, :prev_hash, :hash)"
)


def append(
    conn: Connection | Raw,
    station_id: str,
    action: str,
    entity: str,
    detail: dict[str, Any] | None = None,
    *,
    now: datetime | None = None,
) -> int:
    """Append one entry; must run inside a ledger write transaction. Returns its seq."""
    raw = conn if isinstance(conn, Raw) else Raw(conn)
    last = raw.first(_LAST_SQL)
    seq, prev = (last["seq"] + 1, last["hash"]) if last else (1, GENESIS)
    at = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds")
    body = canonical(detail or {})
    digest = entry_hash(seq, at, station_id, action, entity, body, prev)
    raw.run(
        _INSERT_SQL,
        {
            "seq": seq,
            "at": at,
            "station_id": station_id,
            "action": action,
            "entity": entity,
            "detail": body,
            "prev_hash": prev,
            "hash": digest,
        },
    )
    return seq


@dataclass(frozen=True, slots=True)
class BrokenLink:
    """The first entry at which the chain does not hold, and why."""

    seq: int
    reason: str  # "hash-mismatch" | "prev-mismatch" | "gap"
    expected: str
    found: str

    def __str__(self) -> str:
        return f"entry {self.seq}: {self.reason} (expected {self.expected}, found {self.found})"


def verify(
    conn: Connection, *, batch_size: int = 5000
) -> tuple[int, BrokenLink | None, tuple[int, str] | None]:
    """Walk the chain from the start.

    Returns the entries checked, the first broken link (or None), and the last good
    entry's (seq, hash): the chain's head when nothing is broken, None when empty.
    """
    prev_hash, expected_seq, checked = GENESIS, 1, 0
    stmt = select(
        audit_log.c.seq,
        audit_log.c.at,
        audit_log.c.station_id,
        audit_log.c.action,
        audit_log.c.entity,
        audit_log.c.detail,
        audit_log.c.prev_hash,
        audit_log.c.hash,
    ).order_by(audit_log.c.seq)
    result = conn.execution_options(yield_per=batch_size).execute(stmt)

    def head() -> tuple[int, str] | None:
        return (expected_seq - 1, prev_hash) if checked else None

    for seq, at, station_id, action, entity, detail, stored_prev, stored_hash in result:
        if seq != expected_seq:
            return checked, BrokenLink(expected_seq, "gap", str(expected_seq), str(seq)), head()
        if stored_prev != prev_hash:
            return checked, BrokenLink(seq, "prev-mismatch", prev_hash, stored_prev), head()
        digest = entry_hash(seq, at, station_id, action, entity, detail, stored_prev)
        if digest != stored_hash:
            return checked, BrokenLink(seq, "hash-mismatch", digest, stored_hash), head()
        prev_hash, expected_seq, checked = stored_hash, seq + 1, checked + 1
    result.close()
    return checked, None, head()


def entry_hash_at(conn: Connection, seq: int) -> str | None:
    """The stored hash of entry ``seq``, or None when there is no such entry."""
    value = conn.execute(select(audit_log.c.hash).where(audit_log.c.seq == seq)).scalar()
    return None if value is None else str(value)
