"""What the operator dashboard polls: batch progress, ports, failures, issue rate."""

from __future__ import annotations

import heapq
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter

from api.auth import Reader
from api.context import AppContext, ContextDep

router = APIRouter(prefix="/v1/line", tags=["line"])

MAX_BATCHES = 20
MAX_FAILURES = 10


@router.get("/status")
def line_status(station: ContextDep, _: Reader) -> dict[str, Any]:
    ledger = station.ledger
    counts = ledger.counts()
    batches = []
    for b in ledger.list_batches()[-MAX_BATCHES:]:
        states = counts.get(b.name, {})
        batches.append(
            {
                "name": b.name,
                "product": b.product,
                "state": b.state,
                "planned": b.planned_count,
                "devices": b.device_count,
                "verified": states.get("verified", 0),
                "failed": states.get("failed", 0),
                "states": states,
            }
        )
    failed = heapq.nlargest(
        MAX_FAILURES,
        (d for d in ledger.list_devices(state="failed") if d.failed_at is not None),
        key=lambda d: d.failed_at or datetime.min.replace(tzinfo=UTC),
    )
    line = station.line.snapshot()
    return {
        "now": datetime.now(UTC).isoformat(),
        "batches": batches,
        "line_batch": line["batch"],
        "line_updated": line["updated"],
        "ports": line["ports"],
        "line_failures": line["recent_failures"],
        "failed_devices": [
            {
                "device_id": d.device_id,
                "batch": d.batch,
                "code": d.failure_code,
                "detail": d.failure_message,
                "at": d.failed_at,
            }
            for d in failed
        ],
        "recent_refusals": [asdict(f) for f in station.activity.failures()[:MAX_FAILURES]],
        "issue_rate_per_min": station.activity.rate_per_minute() + line["issued_per_min"],
        "whitelist_sync": _sync(station),
    }


def _sync(station: AppContext) -> dict[str, Any] | None:
    status = station.sync_status()
    return None if status is None else status.as_dict()
