"""A batch report in four formats: CSV and JSON for machines, HTML and PDF for people.

CSV and JSON are generators of text chunks: the device table is streamed from
the ledger row by row, so their memory stays flat whatever the batch size.
HTML and PDF come from one Jinja2 template, the PDF laid out by WeasyPrint
(:mod:`station.report.typeset`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from enum import StrEnum
from itertools import islice
from typing import Any

from station.ledger import Ledger
from station.report.model import BatchReport, DeviceRow, iso, iter_devices
from station.report.typeset import (
    HTML_MAX_ROWS,
    PDF_MAX_ROWS,
    render_html,
    render_pdf,
    summary_lines,
)

CSV_COLUMNS = (
    "batch",
    "device_id",
    "state",
    "serial",
    "fingerprint",
    "not_after",
    "attempts",
    "failure_code",
    "failure_message",
    "cycle_s",
    "enrolled_at",
    "key_ready_at",
    "issued_at",
    "installed_at",
    "verified_at",
    "failed_at",
    "revoked_at",
)


class Format(StrEnum):
    HTML = "html"
    PDF = "pdf"
    CSV = "csv"
    JSON = "json"


MEDIA_TYPES = {
    Format.HTML: "text/html; charset=utf-8",
    Format.PDF: "application/pdf",
    Format.CSV: "text/csv; charset=utf-8",
    Format.JSON: "application/json",
}


def device_record(batch: str, row: DeviceRow) -> dict[str, Any]:
    """One board as CSV and JSON carry it (the same keys, in CSV_COLUMNS order)."""
    cycle = row.cycle_seconds
    return {
        "batch": batch,
        "device_id": row.device_id,
        "state": row.state,
        "serial": row.serial,
        "fingerprint": row.fingerprint,
        "not_after": iso(row.not_after),
        "attempts": row.attempts,
        "failure_code": row.failure_code,
        "failure_message": row.failure_message,
        "cycle_s": None if cycle is None else round(cycle, 3),
        "enrolled_at": iso(row.created_at),
        "key_ready_at": iso(row.key_ready_at),
        "issued_at": iso(row.issued_at),
        "installed_at": iso(row.installed_at),
        "verified_at": iso(row.verified_at),
        "failed_at": iso(row.failed_at),
        "revoked_at": iso(row.revoked_at),
    }


# -- machines --------------------------------------------------------------------


def iter_csv(ledger: Ledger, report: BatchReport) -> Iterator[str]:
    """The device table as CSV (RFC 4180, header first), one chunk per 500 boards."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    name = report.batch.name
    rows = iter_devices(ledger, name)
    while True:
        chunk = list(islice(rows, 500))
        for row in chunk:
            rec = device_record(name, row)
            writer.writerow(["" if rec[c] is None else rec[c] for c in CSV_COLUMNS])
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
        if not chunk:
            return


def report_head(report: BatchReport) -> dict[str, Any]:
    return {
        "report_version": 1,
        "generated_at": iso(report.generated_at),
        "batch": report.batch_facts(),
        "ca": report.ca_facts(),
        "summary": report.summary_facts(),
    }


def iter_json(ledger: Ledger, report: BatchReport) -> Iterator[str]:
    """The whole report as one JSON object whose ``devices`` array is streamed."""
    head = json.dumps(report_head(report), ensure_ascii=False, indent=1)
    yield head[:-2] + ',\n "devices": ['
    name = report.batch.name
    sep = "\n  "
    for n, row in enumerate(iter_devices(ledger, name)):
        if n and n % 500 == 0:
            yield ""  # let a consumer flush
        yield sep + json.dumps(device_record(name, row), ensure_ascii=False)
        sep = ",\n  "
    yield "\n ]\n}\n"


__all__ = [
    "CSV_COLUMNS",
    "HTML_MAX_ROWS",
    "MEDIA_TYPES",
    "PDF_MAX_ROWS",
    "Format",
    "device_record",
    "iter_csv",
    "iter_json",
    "render_html",
    "render_pdf",
    "summary_lines",
]
