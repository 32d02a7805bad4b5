"""What the operator dashboard polls: batch progress, ports, failures, issue rate."""

from __future__ import annotations

import heapq
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter

from api.auth import Reader
from api.context import AppContext, ContextDep
from api.metrics import LINE_STALE_SECONDS, line_age_seconds
from station.ledger.tallies import batch_quality, verified_per_minute
from station.timefmt import rfc3339

router = APIRouter(prefix="/v1/line", tags=["line"])

MAX_BATCHES = 20
MAX_FAILURES = 10


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 1) if whole else None


def _line_state(line: dict[str, Any], now: datetime) -> dict[str, Any]:
    """running, stopped (the run ended, or no update for LINE_STALE_SECONDS) or absent."""
    age = line_age_seconds(line["updated"], now)
    if age is None:
        state = "absent"
    elif line.get("running") is False or age > LINE_STALE_SECONDS:
        state = "stopped"
    else:
        state = "running"
    return {"state": state, "updated": line["updated"], "age_s": age, "batch": line["batch"]}


def _z(item: dict[str, Any]) -> dict[str, Any]:
    """The item with its ``at`` in RFC 3339 with ``Z`` (one timestamp format in the API)."""
    at = item.get("at")
    if isinstance(at, datetime):
        return {**item, "at": rfc3339(at)}
    if isinstance(at, str):
        try:
            return {**item, "at": rfc3339(datetime.fromisoformat(at.replace("Z", "+00:00")))}
        except ValueError:
            return item
    return item


def _merged_failures(*sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each failure once: the same board and reason from the ledger, the line's status and
    this worker's refusals is one entry (its latest), newest first."""
    seen: dict[tuple[Any, Any], dict[str, Any]] = {}
    for source in sources:
        for f in map(_z, source):
            key = (f.get("device_id"), f.get("code"))
            at = str(f.get("at") or "")
            if key not in seen or at > str(seen[key].get("at") or ""):
                seen[key] = f
    return sorted(seen.values(), key=lambda f: str(f.get("at") or ""), reverse=True)[:MAX_FAILURES]


@router.get("/status")
def line_status(station: ContextDep, _: Reader) -> dict[str, Any]:
    ledger = station.ledger
    now = datetime.now(UTC)
    counts = ledger.counts()
    recent = ledger.list_batches()[-MAX_BATCHES:]
    quality = batch_quality(ledger.engine, [b.name for b in recent])
    batches = []
    for b in recent:
        states = counts.get(b.name, {})
        q = quality[b.name]
        batches.append(
            {
                "name": b.name,
                "product": b.product,
                "state": b.state,
                "planned_count": b.planned_count,
                "device_count": b.device_count,
                "verified": states.get("verified", 0),
                "failed": states.get("failed", 0),
                "states": states,
                "yield_pct": _pct(states.get("verified", 0), b.device_count),
                "first_pass_yield_pct": _pct(q.first_pass, b.device_count),
                "failures_by_reason": dict(sorted(q.failures.items(), key=lambda kv: -kv[1])),
            }
        )
    failed = heapq.nlargest(
        MAX_FAILURES,
        (d for d in ledger.list_devices(state="failed") if d.failed_at is not None),
        key=lambda d: d.failed_at or datetime.min.replace(tzinfo=UTC),
    )
    failed_devices = [
        {
            "device_id": d.device_id,
            "batch": d.batch,
            "code": d.failure_code,
            "detail": d.failure_message,
            "at": rfc3339(d.failed_at) if d.failed_at else None,
        }
        for d in failed
    ]
    line = station.line.snapshot()
    line_state = _line_state(line, now)
    ports = []
    for p in line["ports"]:
        since = line_age_seconds(p.get("since"), now)
        ports.append({**p, "on_step_s": None if since is None else round(since, 1)})
    refusals = [asdict(f) for f in station.activity.failures()[:MAX_FAILURES]]
    per_minute = verified_per_minute(ledger.engine, now)
    return {
        "now": rfc3339(now),
        "batches": batches,
        "line": line_state,
        "line_batch": line["batch"],
        "line_updated": line["updated"],
        "ports": ports,
        "failures": _merged_failures(failed_devices, line["recent_failures"], refusals),
        "line_failures": [_z(f) for f in line["recent_failures"]],
        "failed_devices": failed_devices,
        "recent_refusals": [_z(f) for f in refusals],
        "verified_per_minute": per_minute,
        "boards_last_hour": sum(per_minute),
        "health": {part: c["status"] for part, c in station.health().items()},
        "issue_rate_per_min": station.activity.rate_per_minute() + line["issued_per_min"],
        "whitelist_sync": _sync(station),
    }


def _sync(station: AppContext) -> dict[str, Any] | None:
    status = station.sync_status()
    return None if status is None else status.as_dict()
