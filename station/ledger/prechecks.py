"""Early answers: would the issuer refuse a request, read before the work it costs?

Server-side key generation (EST serverkeygen) makes an RSA-2048 key (tens of
milliseconds in the shared issue executor) before it can ask the issuer; a board
that already has its certificate, a closed or full batch, or a subject that does not
fit would each cost one for a 409/422. This reads the issuer's own statement and
raises the issuer's own errors, without the write lock. It is only an early answer:
the issuer judges again in its transaction (the state may change in between).
"""

from __future__ import annotations

from sqlalchemy import Engine

from station.ledger import batches
from station.ledger.batches import BatchHead
from station.ledger.devices import LiveDevice
from station.ledger.issuer import (
    SQL_INTENT_CHECKS,
    already_provisioned,
    batch_closed,
    issuance_in_progress,
    subject_for,
)
from station.ledger.rawsql import Raw
from station.ledger.reads import unknown_batch
from station.ledger.revocation import device_revoked
from station.ledger.schema import CertState, DeviceState
from station.request import CertRequest


class Prechecks:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def new_key(self, batch: str, device_id: str, template: CertRequest) -> None:
        """Refuse as the issuer would a first certificate for a key not yet made (so no
        reuse, no duplicate key; no renewal, no re-provisioning) for ``device_id`` in
        ``batch`` with ``template``'s subject.

        Codes: unknown-batch, batch-closed, subject-mismatch (and the subject's other
        policy codes), device-revoked, issuance-in-progress, already-provisioned,
        batch-full.
        """
        with self._engine.connect() as conn:
            raw = Raw(conn)
            # A key not made yet holds no certificate: the key-holder columns stay empty.
            row = raw.first(SQL_INTENT_CHECKS, {"name": batch, "device_id": device_id, "pk": ""})
            if row is None:
                raise unknown_batch(batch)
            b = BatchHead.of(row)
            d = None if row["d_id"] is None else LiveDevice.of(row)
            if not b.is_open:
                raise batch_closed(batch)
            subject_for(b.subject_template, device_id, template)
            if d is not None and d.state is DeviceState.REVOKED:
                raise device_revoked(device_id)
            if d is not None and d.cert_id is not None:
                if d.cert_state is CertState.INTENT:
                    raise issuance_in_progress(device_id, d.serial)
                raise already_provisioned(device_id, d.serial)
            takes_a_place = d is None or d.batch_id != b.id or d.state is DeviceState.FAILED
            if takes_a_place and batches.plan_full(raw, b):
                raise batches.plan_full_error(b)
