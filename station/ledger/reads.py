"""The ledger's reads: batches, boards, certificates, the whitelist, the audit chain.

:class:`LedgerReads` only reads (one connection per call, results as frozen
records); :class:`station.ledger.service.Ledger` adds the writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Select

from station.errors import NotFoundError, PolicyError
from station.ledger import audit, batches, certificates, devices, tokens
from station.ledger.records import AuditReport, Batch, CertificateRecord, Device
from station.ledger.schema import DeviceState
from station.ledger.schema import devices as devices_t
from station.whitelist import DelistedCertificate, WhitelistEntry, serial_hex

T = TypeVar("T")


def unknown_batch(name: str) -> NotFoundError:
    return NotFoundError(f"no batch named {name!r}", code="unknown-batch")


def unknown_device(device_id: str) -> NotFoundError:
    return NotFoundError(f"no device {device_id!r} in the ledger", code="unknown-device")


class LedgerReads:
    """Every query of the ledger; each opens its own connection."""

    engine: Engine

    def get_batch(self, name: str) -> Batch:
        """Codes: unknown-batch."""
        with self.engine.connect() as conn:
            batch = batches.load(conn, name)
        if batch is None:
            raise unknown_batch(name)
        return batch

    def list_batches(self, *, state: str | None = None) -> list[Batch]:
        with self.engine.connect() as conn:
            return batches.load_all(conn, state=state)

    def counts(self, batch: str | None = None) -> dict[str, dict[str, int]]:
        """Devices per batch and state: ``{batch: {state: n}}`` (dashboard, metrics, reports)."""
        with self.engine.connect() as conn:
            if batch is not None:
                self._batch_id(conn, batch)
            out = batches.device_counts(conn, batch)
        if batch is not None:
            out.setdefault(batch, {})
        return out

    # ------------------------------------------------------------------ queries

    def get_device(self, device_id: str) -> Device:
        """Codes: unknown-device."""
        with self.engine.connect() as conn:
            device = devices.record(conn, device_id)
        if device is None:
            raise unknown_device(device_id)
        return device

    def list_devices(
        self,
        batch: str | None = None,
        state: str | None = None,
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> Iterator[Device]:
        """Devices in enrolment order, streamed; ``limit``/``offset`` page them.

        Codes: unknown-batch, bad-state (an unknown state name).
        """
        stmt = devices.RECORD_SELECT.order_by(devices_t.c.id)
        if state is not None:
            if state not in {s.value for s in DeviceState}:
                raise PolicyError(
                    f"state {state!r} is not one of {', '.join(DeviceState)}", code="bad-state"
                )
            stmt = stmt.where(devices_t.c.state == state)
        if limit is not None:
            stmt = stmt.limit(limit)
        if offset:
            stmt = stmt.offset(offset)
        if batch is not None:
            with self.engine.connect() as conn:
                stmt = stmt.where(devices_t.c.batch_id == self._batch_id(conn, batch))
        return self._stream(stmt, lambda row: devices.device_of(row._mapping))

    def certificates(self, device_id: str) -> list[CertificateRecord]:
        """Every certificate (and intent) the ledger holds for a board, oldest first."""
        with self.engine.connect() as conn:
            return certificates.of_device(conn, device_id)

    def certificate(self, serial: int | str) -> CertificateRecord:
        """One certificate by serial (int or lowercase hex). Codes: unknown-certificate."""
        key = serial_hex(serial) if isinstance(serial, int) else serial.lower()
        with self.engine.connect() as conn:
            record = certificates.by_serial(conn, key)
        if record is None:
            raise NotFoundError(f"no certificate with serial {key}", code="unknown-certificate")
        return record

    def whitelist(self, batch: str | None = None) -> Iterator[WhitelistEntry]:
        """Verified, unrevoked certificates, streamed from the server (constant memory).

        Codes: unknown-batch (checked at once, before the first entry is read).
        """
        batch_id = None
        if batch is not None:
            with self.engine.connect() as conn:
                batch_id = self._batch_id(conn, batch)
        return self._stream(certificates.whitelist_select(batch_id), certificates.whitelist_entry)

    def delisted_serials(self) -> Iterator[DelistedCertificate]:
        """Issued or revoked certificates not on the whitelist, by serial, streamed.

        What a whitelist sync must take out of AWS: revoked certificates and those of
        boards that failed (or were never verified). Each carries its fingerprint (the
        AWS certificateId) and whether it was revoked.
        """
        return self._stream(certificates.delisted_select(), certificates.delisted)

    def _stream(self, stmt: Select[Any], convert: Callable[[Any], T]) -> Iterator[T]:
        def rows() -> Iterator[T]:
            with self.engine.connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=1000).execute(stmt)
                try:
                    for row in result:
                        yield convert(row)
                finally:
                    result.close()

        return rows()

    def _batch_id(self, conn: Connection, name: str) -> int:
        b = batches.head(conn, name)
        if b is None:
            raise unknown_batch(name)
        return b.id

    # ------------------------------------------------------------------- audit

    def audit_verify(self) -> audit.BrokenLink | None:
        """The first broken link of the audit chain, or None when it holds."""
        return self.audit_report().broken

    def audit_report(self) -> AuditReport:
        with self.engine.connect() as conn:
            checked, broken, head = audit.verify(conn)
        return AuditReport(entries=checked, broken=broken, head=head)

    def audit_entry_hash(self, seq: int) -> str | None:
        """The stored hash of audit entry ``seq`` (None if there is none): a recorded
        head still in the chain proves no entry up to it was removed."""
        with self.engine.connect() as conn:
            return audit.entry_hash_at(conn, seq)

    def list_tokens(self) -> list[tokens.TokenRecord]:
        """Every token, revoked and expired ones too, oldest first (never a hash)."""
        with self.engine.connect() as conn:
            return tokens.all_records(conn)
