"""GET /v1/batches/{name}/report: the QA report of a batch (qa, operator, admin).

The format comes from ``?format=html|pdf|csv|json``, else from Accept
(text/html, application/pdf, text/csv, application/json), else JSON. CSV and
JSON stream the device table from the ledger; HTML and PDF are rendered whole
before the response starts, so a rendering failure is an error response, not a
200 whose connection drops.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from api.auth import Reader
from api.context import ContextDep
from api.middleware import REPORT_CSP
from station.errors import StationError
from station.report import MEDIA_TYPES, CaFacts, Format, build_report, stream_report

_STREAMED = (Format.CSV, Format.JSON)

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


def content_disposition(filename: str, disposition: str = "inline") -> str:
    """The header for any file name (RFC 6266): an ASCII ``filename`` for old clients,
    the exact name UTF-8 percent-encoded in ``filename*`` (RFC 8187). A header is
    Latin-1 on the wire, so a batch named in another script cannot go in as it is."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


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
    station: ContextDep,
    _: Reader,
    format: Annotated[str | None, Query(json_schema_extra={"enum": list(Format)})] = None,
) -> Response:
    fmt = pick_format(format, request.headers.get("accept", ""))
    ledger = station.ledger
    # unknown-batch is raised here, before the response starts.
    report = build_report(ledger, name, CaFacts.from_file(station.settings.ca_cert_path))
    headers = {"Content-Disposition": content_disposition(f"{name}-report.{fmt.value}")}
    if fmt == Format.HTML:
        headers["Content-Security-Policy"] = REPORT_CSP
    if fmt in _STREAMED:
        return StreamingResponse(
            stream_report(ledger, report, fmt), media_type=MEDIA_TYPES[fmt], headers=headers
        )
    # Rendered whole here, before the status line is sent.
    body = b"".join(stream_report(ledger, report, fmt))
    return Response(body, media_type=MEDIA_TYPES[fmt], headers=headers)
