"""A 100,000-board batch: CSV and JSON stream in flat memory, the HTML and PDF summaries
stay in bounded memory with a cut table.

The ledger is filled with bulk inserts (no HSM: the report only reads what the
ledger recorded), on a real SQLite file. How long each format takes is measured
by bench/report.py (docs/benchmarks.md), not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from station.ledger import Ledger
from station.ledger.db import write_transaction
from station.ledger.schema import batches
from station.report import build_report, render_html
from tests.test_ledger import TEMPLATE

N = 100_000


def _ts(value: datetime | None) -> str | None:
    # The text SQLAlchemy's DateTime stores in SQLite (UTC, naive).
    return None if value is None else value.strftime("%Y-%m-%d %H:%M:%S.%f")


def populate(ledger: Ledger, n: int = N) -> None:
    """Batch BIG: n boards, ~100 a minute, 2 % failed, the rest verified.

    Rows go straight in through the driver's executemany: the SQLAlchemy Core
    path costs ~10 s for 200,000 rows, and the report reads rows, not objects.
    """
    ledger.create_batch(
        "BIG", product="artik710", planned_count=n, key_mode="board-ecc", subject_template=TEMPLATE
    )
    start = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
    devs: list[tuple[object, ...]] = []
    certs: list[tuple[object, ...]] = []
    with write_transaction(ledger.engine) as conn:
        bid = conn.execute(select(batches.c.id).where(batches.c.name == "BIG")).scalar_one()
        conn.execute(
            batches.update().where(batches.c.id == bid).values(created_at=start, device_count=n)
        )
        for i in range(n):
            t0 = start + timedelta(seconds=0.6 * i)
            failed = i % 50 == 7
            step = timedelta(seconds=1 + (i % 13) * 0.5)
            code = ("csr-timeout" if i % 100 == 7 else "pop-failed") if failed else None
            devs.append(
                (
                    i + 1, f"artik-{i:06d}", bid, "failed" if failed else "verified", code,
                    "bulk" if failed else None, 1 if failed else 0, "bulk",
                    _ts(t0), _ts(t0 + 4 * step), _ts(t0 + step),
                    None if failed else _ts(t0 + 2 * step),
                    None if failed else _ts(t0 + 3 * step),
                    None if failed else _ts(t0 + 4 * step),
                    _ts(t0 + step) if failed else None,
                )
            )  # fmt: skip
            if not failed:
                certs.append(
                    (
                        f"{i + 1:040x}", i + 1, bid, "bulk", "issued", b"-", f"{i:064x}",
                        f"CN=artik-{i:06d}", _ts(t0), 3650, 300, f"{i:064x}", _ts(t0),
                        _ts(t0 + timedelta(days=3650)), _ts(t0), _ts(t0 + 2 * step),
                    )
                )  # fmt: skip
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.executemany(
            "INSERT INTO devices (id, device_id, batch_id, state, failure_code, failure_message,"
            " attempts, station_id, created_at, updated_at, key_ready_at, issued_at,"
            " installed_at, verified_at, failed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            devs,
        )
        raw.executemany(
            "INSERT INTO certificates (serial, device_pk, batch_id, station_id, state, csr_der,"
            " public_key_sha256, subject, sign_time, days, backdate_seconds, fingerprint,"
            " not_before, not_after, created_at, issued_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            certs,
        )


# Run in a fresh process, so its peak RSS is the report's and not the bulk insert's.
_CHILD = """
import json, resource, sys
from station.ledger import Ledger
from station.report import build_report, iter_csv, iter_json

def peak_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

led = Ledger(sys.argv[1], "test-station", migrate=False)
report = build_report(led, "BIG", None)
out = {"after_summary_kb": peak_kb()}
for name, stream in (("csv", iter_csv), ("json", iter_json)):
    size = lines = 0
    for chunk in stream(led, report):
        size += len(chunk)
        lines += chunk.count("\\n")
    out[name] = {"bytes": size, "lines": lines, "peak_kb": peak_kb()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    path: Path = tmp_path_factory.mktemp("big") / "ledger.sqlite"
    with Ledger(f"sqlite:///{path}", "test-station") as led:
        populate(led)
        yield led


def test_csv_and_json_of_100k_boards_stream_in_flat_memory(big: Ledger) -> None:
    root = Path(__file__).resolve().parent.parent
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(big.engine.url)],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout)
    base = got["after_summary_kb"]
    assert got["csv"]["lines"] == N + 1 and got["csv"]["bytes"] > 25_000_000
    assert got["json"]["bytes"] > 50_000_000
    # 30 MB of CSV and 60 MB of JSON went through; the peak barely moved.
    for name in ("csv", "json"):
        grown_mb = (got[name]["peak_kb"] - base) / 1024
        assert grown_mb < 16, f"{name}: peak grew {grown_mb:.1f} MB while streaming"


_HTML_CHILD = """
import json, sys
from station.ledger import Ledger
from station.report import build_report, render_html

def peak_kb():
    # VmHWM: ru_maxrss survives execve and would report the parent's bulk insert.
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))

led = Ledger(sys.argv[1], "test-station", migrate=False)
report = build_report(led, "BIG", None)
base = peak_kb()
page = render_html(led, report)
print(json.dumps({"after_summary_kb": base, "peak_kb": peak_kb(), "bytes": len(page)}))
"""


def test_html_of_100k_boards_renders_in_bounded_memory_with_a_cut_table(big: Ledger) -> None:
    """The device table is capped (HTML_MAX_ROWS), so the page and the memory it takes
    do not follow the batch size."""
    root = Path(__file__).resolve().parent.parent
    child = subprocess.run(
        [sys.executable, "-c", _HTML_CHILD, str(big.engine.url)],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=240,
    )
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout)
    # About 1.5 MB of HTML for 5,000 rows; the whole batch would be 30 times that.
    assert got["bytes"] < 4_000_000
    grown_mb = (got["peak_kb"] - got["after_summary_kb"]) / 1024
    assert grown_mb < 32, f"peak grew {grown_mb:.1f} MB while rendering"

    report = build_report(big, "BIG", None)
    page = render_html(big, report)
    assert f"first 5000 of {N} boards" in page and "--format csv" in page
    assert page.count("<svg") == 3
    facts = report.summary_facts()
    assert facts["verified"] == N - N // 50 and facts["failed"] == N // 50
    # ~100 boards a minute of line time (first enrolment to last verification).
    assert facts["throughput"]["boards_per_hour"] == pytest.approx(6000, rel=0.05)


_PDF_CHILD = """
import sys
from station.ledger import Ledger
from station.report import build_report, render_pdf

led = Ledger(sys.argv[1], "test-station", migrate=False)
with open(sys.argv[2], "wb") as out:
    render_pdf(led, build_report(led, "BIG", None), out)
# VmHWM: ru_maxrss survives execve and would report the parent's bulk insert.
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def test_pdf_of_100k_boards_renders_in_bounded_memory(big: Ledger, tmp_path: Path) -> None:
    """WeasyPrint holds the laid-out document, so the device table is capped (PDF_MAX_ROWS)
    and the summary streamed: the peak stays near the interpreter's own size
    (about 240 MB measured, bench/report.py), whatever the batch size."""
    from station.report import PDF_MAX_ROWS

    root = Path(__file__).resolve().parent.parent
    pdf = tmp_path / "big.pdf"
    child = subprocess.run(
        [sys.executable, "-c", _PDF_CHILD, str(big.engine.url), str(pdf)],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=240,
    )
    assert child.returncode == 0, child.stderr
    peak_mb = int(child.stdout.strip()) / 1024
    assert peak_mb < 400, f"peak {peak_mb:.0f} MB"
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True).stdout
    assert f"first {PDF_MAX_ROWS} of {N} boards" in " ".join(text.split())
    assert "artik-000999" in text and "artik-001000" not in text
