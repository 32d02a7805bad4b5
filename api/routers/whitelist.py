"""The whitelist of verified serials, streamed as CSV or JSON (by Accept)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from api.auth import Reader
from api.context import ContextDep
from station.whitelist import WhitelistEntry

router = APIRouter(prefix="/v1/whitelist", tags=["whitelist"])

FIELDS = ("serial", "device_id", "batch", "fingerprint", "not_after")


def _row(e: WhitelistEntry) -> list[str]:
    return [e.serial, e.device_id, e.batch, e.fingerprint, e.not_after.isoformat()]


def _csv(entries: Iterator[WhitelistEntry]) -> Iterator[str]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELDS)
    for n, entry in enumerate(entries, 1):
        writer.writerow(_row(entry))
        if n % 500 == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def _json(entries: Iterator[WhitelistEntry]) -> Iterator[str]:
    yield "["
    sep = ""
    for entry in entries:
        yield sep + json.dumps(dict(zip(FIELDS, _row(entry), strict=True)))
        sep = ","
    yield "]"


@router.get(
    "",
    responses={
        200: {
            "content": {"application/json": {}, "text/csv": {}},
            "description": "verified, unrevoked certificates",
        }
    },
)
def get_whitelist(
    request: Request, station: ContextDep, _: Reader, batch: str | None = None
) -> StreamingResponse:
    entries = station.ledger.whitelist(batch)  # unknown-batch is raised here, before streaming
    if "text/csv" in request.headers.get("accept", ""):
        return StreamingResponse(_csv(entries), media_type="text/csv; charset=utf-8")
    return StreamingResponse(_json(entries), media_type="application/json")
