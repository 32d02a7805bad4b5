"""CMP transactions: a transactionID used once, and the nonce a certConf must echo.

Stored in the ledger, not in a worker's memory: `station serve --workers N` spreads
connections over processes, and a client's certConf may reach another worker than
its request did. A replayed request (same transactionID) is refused
(transactionIdInUse); a certConf must name a waiting transaction of the same
sender and carry, as its recipNonce, the senderNonce of the station's answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import IntegrityError

from station.errors import ConflictError, NotFoundError
from station.ledger.groupcommit import GroupCommitter
from station.ledger.schema import cmp_transactions as table


@dataclass(frozen=True, slots=True)
class Transaction:
    transaction_id: str
    sender_kid: str
    state: str
    serial: str | None
    device_id: str | None
    our_nonce: str | None


def _now() -> datetime:
    return datetime.now(UTC)


class CmpTransactions:
    def __init__(self, engine: Engine, writes: GroupCommitter) -> None:
        self._engine = engine
        self._writes = writes

    def begin(self, transaction_id: bytes, sender_kid: str) -> None:
        """Claim a transactionID. Codes: cmp-transaction-in-use."""
        now = _now()

        def write(conn: Connection) -> None:
            conn.execute(
                table.insert().values(
                    transaction_id=transaction_id.hex(),
                    sender_kid=sender_kid[:256],
                    state="refused",  # until a certificate is issued in it
                    created_at=now,
                    updated_at=now,
                )
            )

        try:
            self._writes.submit(write, durable=False)
        except IntegrityError:
            raise ConflictError(
                "this transactionID was used before", code="cmp-transaction-in-use"
            ) from None

    def issued(
        self, transaction_id: bytes, serial: str, device_id: str, our_nonce: bytes, state: str
    ) -> None:
        """The certificate of the transaction; ``state`` waiting (for certConf) or confirmed."""
        now = _now()

        def write(conn: Connection) -> None:
            conn.execute(
                table.update()
                .where(table.c.transaction_id == transaction_id.hex())
                .values(
                    state=state,
                    serial=serial,
                    device_id=device_id,
                    our_nonce=our_nonce.hex(),
                    updated_at=now,
                )
            )

        self._writes.submit(write, durable=True)

    def get(self, transaction_id: bytes) -> Transaction:
        """Codes: cmp-unknown-transaction."""
        with self._engine.connect() as conn:
            row = conn.execute(
                select(table).where(table.c.transaction_id == transaction_id.hex())
            ).first()
        if row is None:
            raise NotFoundError("no such CMP transaction", code="cmp-unknown-transaction")
        m = row._mapping
        return Transaction(
            m["transaction_id"], m["sender_kid"], m["state"], m["serial"], m["device_id"],
            m["our_nonce"],
        )  # fmt: skip

    def close(self, transaction_id: bytes, state: str) -> bool:
        """Move a waiting transaction to ``state``; False when it was not waiting (a replay)."""
        now = _now()

        def write(conn: Connection) -> bool:
            done = conn.execute(
                table.update()
                .where(table.c.transaction_id == transaction_id.hex(), table.c.state == "waiting")
                .values(state=state, updated_at=now)
            )
            return bool(done.rowcount == 1)

        return bool(self._writes.submit(write, durable=True))
