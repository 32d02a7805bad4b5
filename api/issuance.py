"""Issuance as the API does it: the ledger's issue() plus metrics and dashboard activity."""

from __future__ import annotations

import time

from api.context import AppContext
from hsm.errors import HsmError
from station.errors import StationError, innermost
from station.ledger import IssueResult
from station.request import CertRequest


def issue(
    station: AppContext,
    batch: str,
    device_id: str,
    csr: bytes | CertRequest,
    *,
    reprovision: bool = False,
    reason: str | None = None,
    renews: str | None = None,
    confirm_later: bool = False,
    station_made_key: bool = False,
) -> IssueResult:
    m = station.metrics
    start = time.perf_counter()
    try:
        ca = station.issuing_ca()
        result = station.ledger.issue(
            batch,
            device_id,
            csr,
            ca,
            reprovision=reprovision,
            reason=reason,
            renews=renews,
            confirm_later=confirm_later,
            station_made_key=station_made_key,
        )
    except (StationError, HsmError) as raised:
        # The ledger abandoned the intent as sign-failed; the token's own reason
        # (hsm-token-not-found, hsm-key-not-found, ...) tells the operator what to fix.
        cause = innermost(raised)
        exc = cause if isinstance(cause, StationError | HsmError) else raised
        if isinstance(exc, HsmError):
            station.forget_ca()
        code = exc.code
        detail = exc.message if isinstance(exc, StationError) else str(exc)
        m.failures.labels(code=code).inc()
        station.activity.failed(device_id, batch, code, detail)
        raise exc from None
    finally:
        m.issue_seconds.observe(time.perf_counter() - start)
    if result.reused:
        m.issued_reused.inc()
    else:
        m.issued_new.inc()
        station.activity.issued()
    return result
