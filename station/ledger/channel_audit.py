"""Audit entries a channel writes about itself (EST, CMP): a refused request (bad DER,
a wrong MAC or token, a replay) or a key it made, outside the ledger's own changes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from station.ledger import audit
from station.ledger.groupcommit import GroupCommitter


class ChannelAudit:
    def __init__(self, writes: GroupCommitter, station_id: str) -> None:
        self._writes = writes
        self._station_id = station_id

    def record(self, action: str, entity: str, detail: dict[str, Any]) -> None:
        """One audit entry, in the unit of work with the other writes (not synced alone)."""

        def write(conn: Connection) -> None:
            audit.append(conn, self._station_id, action, entity[:256], detail)

        self._writes.submit(write, durable=False)
