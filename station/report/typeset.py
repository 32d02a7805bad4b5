"""HTML and PDF reports from one Jinja2 template; the PDF is laid out by WeasyPrint.

The template (``templates/report.html.j2``) is the whole document: summary,
vector charts (inline SVG from :mod:`station.report.charts`), failures, step
times and the device table. The browser shows it as HTML; WeasyPrint lays the
same markup out on A4 pages with a running header (batch, page N of M), the
device table's header repeated on each page (landscape pages, so no id,
serial or fingerprint is cut), and fonts found through fontconfig: DejaVu for
Latin text, Noto CJK (Debian's fonts-noto-cjk) for Chinese, Japanese and Korean.

Memory: WeasyPrint keeps the laid-out document in memory until it writes, so
the device table is capped (:data:`HTML_MAX_ROWS`, :data:`PDF_MAX_ROWS`) with a
note pointing to the CSV, which streams every board; the summary is one
streamed pass. ``bench/report.py`` measures time and peak memory for 100,000
boards (docs/benchmarks.md).
"""

from __future__ import annotations

from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import IO, Any

import jinja2

from station.ledger import Ledger
from station.report import charts
from station.report.model import STEP_LABELS, BatchReport, iso, iter_devices

HTML_MAX_ROWS = 5000
PDF_MAX_ROWS = 1000

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    trim_blocks=False,
    undefined=jinja2.StrictUndefined,
)


def fmt(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def _duration(seconds: float | None) -> str:
    return "—" if seconds is None else charts.seconds_text(seconds)


def _when(value: datetime | None) -> str | None:
    return None if value is None else iso(value.replace(microsecond=0))


def summary_lines(report: BatchReport) -> list[tuple[str, str]]:
    """The headline facts, in the order a person reads them."""
    b, s, ca = report.batch, report.summary, report.ca
    return [
        ("Batch", b.name),
        ("Product", b.product),
        ("Key mode", b.key_mode),
        ("Profile", f"{b.subject_template}, {b.days} days"),
        ("Station", b.station_id),
        ("Operator", b.operator or "—"),
        ("Opened", _when(b.created_at) or "—"),
        ("Closed", _when(b.closed_at) or "still open"),
        ("CA subject", ca.subject if ca else "unknown (no ca.pem)"),
        ("CA fingerprint (SHA-256)", ca.fingerprint if ca else "—"),
        ("Planned / enrolled / verified", f"{s.planned} / {s.enrolled} / {s.verified}"),
        ("Failed / revoked / in progress", f"{s.failed} / {s.revoked} / {s.in_progress}"),
        ("Yield (verified / enrolled)", f"{fmt(s.yield_pct)} %"),
        ("First-pass yield", f"{fmt(s.first_pass_yield_pct)} %"),
        (
            "Retries",
            f"{s.failed_attempts} failed attempts on {s.boards_retried} boards, "
            f"{s.recovered} recovered",
        ),
        (
            "Cycle time median / p90 / max",
            f"{fmt(s.cycle.median)} / {fmt(s.cycle.p90)} / {fmt(s.cycle.max)} s",
        ),
        (
            "Line time",
            f"{_duration(s.line_seconds)} (first enrolment to last verification)",
        ),
        (
            "Throughput",
            f"{fmt(s.boards_per_hour)} boards per hour of line time; "
            f"{fmt(s.ports_busy_mean)} boards on the line at once on average",
        ),
        ("Cycle time per port", f"{_duration(s.cycle.median)} per board (median)"),
    ]


def _context(ledger: Ledger, report: BatchReport, max_rows: int) -> dict[str, Any]:
    s = report.summary
    return {
        "batch": report.batch,
        "s": s,
        "generated": _when(report.generated_at),
        "summary_lines": summary_lines(report),
        "charts": {
            "throughput": jinja2.utils.markupsafe.Markup(
                charts.throughput_svg(s.verified_offsets())
            ),
            "cycle": jinja2.utils.markupsafe.Markup(
                charts.histogram_svg(s.cycle_seconds, s.cycle.median, s.cycle.p90)
            ),
            "failures": jinja2.utils.markupsafe.Markup(
                charts.failures_svg([(g.code, g.count) for g in s.failures])
            ),
        },
        "steps": [
            *((STEP_LABELS.get(k, k), v) for k, v in s.steps.items()),
            ("cycle (enrol → verified)", s.cycle),
        ],
        "devices": islice(iter_devices(ledger, report.batch.name), max_rows),
        "max_rows": max_rows,
        "labels": report.labels,
        "fmt": fmt,
        "iso": iso,
    }


def render_html(ledger: Ledger, report: BatchReport, *, max_rows: int = HTML_MAX_ROWS) -> str:
    return _ENV.get_template("report.html.j2").render(_context(ledger, report, max_rows))


def render_pdf(
    ledger: Ledger, report: BatchReport, out: IO[bytes], *, max_rows: int = PDF_MAX_ROWS
) -> None:
    """The template laid out by WeasyPrint on A4 (landscape for the device table)."""
    import weasyprint

    page = _ENV.get_template("report.html.j2").render(_context(ledger, report, max_rows))
    document = weasyprint.HTML(string=page, base_url=None).render()
    document.metadata.title = f"Batch report {report.batch.name}"
    document.write_pdf(out)
