"""A batch report in four formats: CSV and JSON for machines, HTML and PDF for people.

CSV and JSON are generators of text chunks: the device table is streamed from
the ledger row by row, so their memory stays flat whatever the batch size.
HTML and PDF draw their charts with matplotlib's object API (``Figure``, no
pyplot state, so it is safe in API worker threads) and cap their device tables
(:data:`HTML_MAX_ROWS`, :data:`PDF_MAX_ROWS`) with a note pointing to the CSV.
matplotlib parses no text as mathtext here (``text.parse_math`` off, set once with
the backend): a batch name, product, template or a board's failure message with
``$`` signs is text (``$\\foo$`` made matplotlib raise ValueError).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Callable, Iterator
from enum import StrEnum
from itertools import islice
from typing import IO, Any

import matplotlib

matplotlib.use("Agg")

from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from station.ledger import Ledger
from station.report.model import STEP_LABELS, BatchReport, DeviceRow, iso, iter_devices

matplotlib.rcParams["text.parse_math"] = False  # no mathtext: see the module docstring

HTML_MAX_ROWS = 5000
PDF_MAX_ROWS = 2000
PDF_ROWS_PER_PAGE = 40

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


# -- charts ----------------------------------------------------------------------


def _throughput_axes(report: BatchReport, ax: Any) -> None:
    per_minute = report.summary.per_minute
    if per_minute:
        lo, hi = min(per_minute), max(per_minute)
        xs = list(range(lo, hi + 1))
        ax.bar(xs, [per_minute.get(x, 0) for x in xs], width=1.0, color="#2b6cb0")
    else:
        ax.text(0.5, 0.5, "no board verified yet", ha="center", va="center")
    ax.set_title("Boards verified per minute")
    ax.set_xlabel("minutes since the batch opened")
    ax.set_ylabel("boards")


def _histogram_axes(report: BatchReport, ax: Any) -> None:
    values = report.summary.cycle_seconds
    if len(values):
        ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="#2f855a")
        st = report.summary.cycle
        for value, label, style in ((st.median, "median", "--"), (st.p90, "p90", ":")):
            if value is not None:
                ax.axvline(value, color="black", linestyle=style, label=f"{label} {value:.2f} s")
        ax.legend(loc="upper right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no cycle time yet", ha="center", va="center")
    ax.set_title("Cycle time per board (enrol → verified)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("boards")


def _png(draw: Callable[[BatchReport, Any], None], report: BatchReport) -> str:
    fig = Figure(figsize=(7, 3), dpi=96, layout="constrained")
    draw(report, fig.add_subplot())
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return base64.b64encode(out.getvalue()).decode("ascii")


def _labelled(steps: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(STEP_LABELS.get(k, k), v) for k, v in steps.items()]


# -- people ----------------------------------------------------------------------


def _fmt(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def summary_lines(report: BatchReport) -> list[tuple[str, str]]:
    """The headline facts, in the order a person reads them (HTML and PDF)."""
    b, s, ca = report.batch, report.summary, report.ca
    return [
        ("Batch", b.name),
        ("Product", b.product),
        ("Key mode", b.key_mode),
        ("Profile", f"{b.subject_template}, {b.days} days"),
        ("Station", b.station_id),
        ("Operator", b.operator or "—"),
        ("Opened", iso(b.created_at) or "—"),
        ("Closed", iso(b.closed_at) or "still open"),
        ("CA subject", ca.subject if ca else "unknown (no ca.pem)"),
        ("CA fingerprint (SHA-256)", ca.fingerprint if ca else "—"),
        (
            "Planned / enrolled / verified",
            f"{s.planned} / {s.enrolled} / {s.verified}",
        ),
        ("Failed / revoked / in progress", f"{s.failed} / {s.revoked} / {s.in_progress}"),
        ("Yield (verified / enrolled)", f"{_fmt(s.yield_pct)} %"),
        ("First-pass yield", f"{_fmt(s.first_pass_yield_pct)} %"),
        (
            "Retries",
            f"{s.failed_attempts} failed attempts on {s.boards_retried} boards, "
            f"{s.recovered} recovered",
        ),
        (
            "Cycle time median / p90 / max",
            f"{_fmt(s.cycle.median)} / {_fmt(s.cycle.p90)} / {_fmt(s.cycle.max)} s",
        ),
        ("Throughput", f"{_fmt(s.boards_per_minute)} boards/min"),
    ]


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#1a202c}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #cbd5e0;padding:2px 6px;
font-size:13px;text-align:left}th{background:#edf2f7}.mono{font-family:monospace}
.note{background:#fefcbf;padding:.5em;border:1px solid #d69e2e}
"""


def render_html(ledger: Ledger, report: BatchReport, *, max_rows: int = HTML_MAX_ROWS) -> str:
    e = html.escape
    s = report.summary
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>Batch report {e(report.batch.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Batch report: {e(report.batch.name)}</h1>",
        f"<p>Generated {e(iso(report.generated_at) or '')}</p>",
        '<h2 id="summary">Summary</h2><table class="summary">',
    ]
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary_lines(report)]
    parts.append("</table>")
    parts.append('<h2 id="charts">Charts</h2>')
    for alt, draw in (
        ("boards verified per minute", _throughput_axes),
        ("histogram of cycle times", _histogram_axes),
    ):
        parts.append(f'<p><img alt="{alt}" src="data:image/png;base64,{_png(draw, report)}"></p>')
    parts.append('<h2 id="failures">Failures by reason</h2>')
    if s.failures:
        parts.append(
            "<table><tr><th>code</th><th>boards</th><th>examples</th><th>message</th></tr>"
        )
        parts += [
            f"<tr><td class=mono>{e(g.code)}</td><td>{g.count}</td>"
            f"<td class=mono>{e(', '.join(g.examples))}</td>"
            f"<td>{e(g.example_message or '')}</td></tr>"
            for g in s.failures
        ]
        parts.append("</table>")
    else:
        parts.append("<p>No board is in the failed state.</p>")
    parts.append('<h2 id="steps">Time per step</h2><table><tr><th>step</th><th>boards</th>')
    parts.append("<th>median s</th><th>p90 s</th><th>max s</th></tr>")
    for name, st in [*_labelled(s.steps), ("cycle (enrol → verified)", s.cycle)]:
        parts.append(
            f"<tr><td>{e(name)}</td><td>{st.count}</td><td>{_fmt(st.median)}</td>"
            f"<td>{_fmt(st.p90)}</td><td>{_fmt(st.max)}</td></tr>"
        )
    parts.append("</table>")
    parts.append('<h2 id="devices">Devices</h2>')
    if s.enrolled > max_rows:
        parts.append(
            f'<p class="note">This table shows the first {max_rows} of {s.enrolled} boards. '
            f"The full table is in the CSV: <code>station report {e(report.batch.name)} "
            "--format csv</code>.</p>"
        )
    parts.append(
        "<table><tr><th>hardware id</th><th>state</th><th>serial</th>"
        "<th>fingerprint (AWS certificateId)</th><th>not after</th><th>attempts</th>"
        "<th>failure</th></tr>"
    )
    for row in islice(iter_devices(ledger, report.batch.name), max_rows):
        parts.append(
            f"<tr><td class=mono>{e(row.device_id)}</td><td>{e(row.state)}</td>"
            f"<td class=mono>{e(row.serial or '')}</td>"
            f"<td class=mono>{e(row.fingerprint or '')}</td>"
            f"<td>{e(iso(row.not_after) or '')}</td><td>{row.attempts}</td>"
            f"<td class=mono>{e(row.failure_code or '')}</td></tr>"
        )
    parts.append("</table></body></html>\n")
    return "".join(parts)


_A4 = (8.27, 11.69)


def _text_page(pdf: PdfPages, title: str, lines: list[str]) -> None:
    fig = Figure(figsize=_A4)
    fig.text(0.05, 0.96, title, fontsize=13, weight="bold", va="top")
    fig.text(0.05, 0.93, "\n".join(lines), fontsize=6.5, family="monospace", va="top")
    pdf.savefig(fig)


def render_pdf(
    ledger: Ledger, report: BatchReport, out: IO[bytes], *, max_rows: int = PDF_MAX_ROWS
) -> None:
    """Summary page with both charts, a page of failures and step times, then the table."""
    s = report.summary
    with PdfPages(out, metadata={"Title": f"Batch report {report.batch.name}"}) as pdf:
        fig = Figure(figsize=_A4)
        title = f"Batch report: {report.batch.name}"
        fig.text(0.06, 0.97, title, fontsize=15, weight="bold")
        lines = [f"{k}: {v}" for k, v in summary_lines(report)]
        fig.text(0.06, 0.95, "\n".join(lines), fontsize=8, va="top", linespacing=1.5)
        _throughput_axes(report, fig.add_axes((0.1, 0.36, 0.85, 0.2)))
        _histogram_axes(report, fig.add_axes((0.1, 0.06, 0.85, 0.2)))
        pdf.savefig(fig)

        lines = ["Failures by reason (boards now failed)", ""]
        if not s.failures:
            lines.append("  none")
        for g in s.failures:
            lines.append(f"  {g.code:<28} {g.count:>7}  e.g. {', '.join(g.examples)}")
            if g.example_message:
                lines.append(f"  {'':<28} {'':>7}  {g.example_message[:90]}")
        lines += ["", "Time per step (seconds)", ""]
        lines.append(f"  {'step':<44} {'boards':>7} {'median':>10} {'p90':>10} {'max':>10}")
        for name, st in [*_labelled(s.steps), ("cycle (enrol → verified)", s.cycle)]:
            lines.append(
                f"  {name[:44]:<44} {st.count:>7} {_fmt(st.median):>10} {_fmt(st.p90):>10} "
                f"{_fmt(st.max):>10}"
            )
        _text_page(pdf, "Failures and steps", lines)

        header = f"{'hardware id':<24} {'state':<9} {'serial':<40} {'not after':<20} att"
        rows = islice(iter_devices(ledger, report.batch.name), max_rows)
        page = 0
        while True:
            chunk = list(islice(rows, PDF_ROWS_PER_PAGE))
            last = len(chunk) < PDF_ROWS_PER_PAGE
            if not chunk and page and s.enrolled <= max_rows:
                break
            page += 1
            body = [header, "-" * len(header)]
            for r in chunk:
                body.append(
                    f"{r.device_id[:24]:<24} {r.state:<9} {(r.serial or '')[:40]:<40} "
                    f"{(iso(r.not_after) or '')[:19]:<20} {r.attempts:>3}"
                )
                body.append(f"{'':<24} fingerprint {r.fingerprint or '—'}")
            if last and s.enrolled > max_rows:
                body += ["", f"Showing {max_rows} of {s.enrolled} boards: the full table is in"]
                body.append(f"the CSV (station report {report.batch.name} --format csv).")
            _text_page(pdf, f"Devices (page {page})", body)
            if last:
                break
