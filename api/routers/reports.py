"""GET /v1/batches/{name}/report: the QA report of a batch (qa, operator, admin).

The format comes from ``?format=html|pdf|csv|json``, else from Accept
(text/html, application/pdf, text/csv, application/json), else JSON. CSV and
JSON stream the device table from the ledger; HTML and PDF are rendered whole.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from api.auth import Reader
from api.context import StationDep
from station.errors import StationError
from station.report import MEDIA_TYPES, CaFacts, Format, build_report, stream_report

router = APIRouter(prefix="/v1/batches", tags=["reports"])

_BY_ACCEPT = (
    ("application/pdf", Format.PDF),
    ("text/html", Format.HTML),
    ("text/csv", Format.CSV),
    ("application/json", Format.JSON),
)


def pick_format(query: str | None, accept: str) -> Format:
    if query:
        try:
            return Format(query.lower())
        except ValueError:
            raise StationError(
                f"format {query!r} is not one of {', '.join(Format)}", code="bad-format"
            ) from None
    accept = accept.lower()
    for media, fmt in _BY_ACCEPT:
        if media in accept:
            return fmt
    return Format.JSON


@router.get(
    "/{name}/report",
    responses={
        200: {
            "content": {m.split(";")[0]: {} for m in MEDIA_TYPES.values()},
            "description": "the batch report",
        }
    },
)
def get_report(
    name: str,
    request: Request,
    station: StationDep,
    _: Reader,
    format: Annotated[str | None, Query(json_schema_extra={"enum": list(Format)})] = None,
) -> StreamingResponse:
    fmt = pick_format(format, request.headers.get("accept", ""))
    ledger = station.ledger
    # unknown-batch is raised here, before the response starts.
    report = build_report(ledger, name, CaFacts.from_file(station.settings.ca_cert_path))
    filename = f"{name}-report.{fmt.value}".replace('"', "_")
    return StreamingResponse(
        stream_report(ledger, report, fmt),
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'inline; filename="{filename}"'},
    )
