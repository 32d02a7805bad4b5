"""Batch reports for QA (HTML, PDF, CSV, JSON) and the signed batch manifest.

``build_report`` reads the batch (one streamed pass); ``write_report`` renders
it to a binary stream; ``stream_report`` yields byte chunks (HTTP). The device
table of CSV and JSON is streamed from the ledger, never held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from station.ledger import Ledger
from station.report.manifest import (
    VERIFY_COMMANDS,
    ManifestCheck,
    ManifestError,
    ManifestFiles,
    verify_manifest,
    write_signed_manifest,
)
from station.report.model import BatchReport, CaFacts, DeviceRow, build_report, iter_devices
from station.report.render import (
    CSV_COLUMNS,
    HTML_MAX_ROWS,
    MEDIA_TYPES,
    PDF_MAX_ROWS,
    Format,
    iter_csv,
    iter_json,
    render_html,
    render_pdf,
)


def stream_report(ledger: Ledger, report: BatchReport, fmt: Format) -> Iterator[bytes]:
    """The report as UTF-8 (or PDF) byte chunks."""
    if fmt is Format.CSV:
        yield from (c.encode("utf-8") for c in iter_csv(ledger, report) if c)
    elif fmt is Format.JSON:
        yield from (c.encode("utf-8") for c in iter_json(ledger, report) if c)
    elif fmt is Format.HTML:
        yield render_html(ledger, report).encode("utf-8")
    else:
        import io

        buf = io.BytesIO()
        render_pdf(ledger, report, buf)
        yield buf.getvalue()


def write_report(ledger: Ledger, report: BatchReport, fmt: Format, out: IO[bytes]) -> None:
    if fmt is Format.PDF:
        render_pdf(ledger, report, out)
        return
    for chunk in stream_report(ledger, report, fmt):
        out.write(chunk)


__all__ = [
    "CSV_COLUMNS",
    "HTML_MAX_ROWS",
    "MEDIA_TYPES",
    "PDF_MAX_ROWS",
    "VERIFY_COMMANDS",
    "BatchReport",
    "CaFacts",
    "DeviceRow",
    "Format",
    "ManifestCheck",
    "ManifestError",
    "ManifestFiles",
    "build_report",
    "iter_csv",
    "iter_devices",
    "iter_json",
    "render_html",
    "render_pdf",
    "stream_report",
    "verify_manifest",
    "write_report",
    "write_signed_manifest",
]
