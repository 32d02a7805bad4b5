"""The QA report as a typeset document: one template, HTML in the browser, PDF by WeasyPrint.

Checked with poppler (pdftotext, pdffonts, pdfinfo, pdftoppm) on a real ledger
with the SoftHSM CA: a header with the batch and page numbers on every page,
the device table's header repeated on each of its pages, whole ids, serials
and fingerprints, CJK text in a CJK font, nothing past the page edge, vector
charts, and throughput per hour of line time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.ledger.db import write_transaction
from station.ledger.schema import devices
from station.report import CaFacts, build_report, render_html, render_pdf
from station.settings import Settings
from tests.test_ledger import TEMPLATE, make_csr

PRODUCT = "ARTIK 530 产线 工場 생산"
LONG_ID = "artik530-0123456789abcdef0123456789abcd"  # 40 characters
N = 120  # enough for several device pages


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: `make setup` installs poppler-utils")
    return path


def provision(led: Ledger, ca: CertificateAuthority, batch: str, device_id: str) -> None:
    led.mark_key_ready(device_id, batch=batch)
    led.issue(batch, device_id, make_csr(device_id)[0], ca)
    led.mark_installed(device_id, "ab" * 32)
    led.mark_verified(device_id)


@pytest.fixture
def ledger(station_settings: Settings, ca: CertificateAuthority) -> Iterator[Ledger]:
    with Ledger.from_settings(station_settings) as led:
        led.create_batch("B1", product=PRODUCT, planned_count=N + 5, key_mode="board-ecc",
                         subject_template=TEMPLATE, operator="品質 QA")  # fmt: skip
        provision(led, ca, "B1", LONG_ID)
        for i in range(N - 3):
            provision(led, ca, "B1", f"dev-{i:04d}")
        for i, code in enumerate(("link-timeout", "bad-proof")):
            led.mark_key_ready(f"bad-{i}", batch="B1")
            led.mark_failed(f"bad-{i}", code, "電源が落ちた: ケーブル不良 (cable fault)")
        yield led


def pdf_of(ledger: Ledger, settings: Settings, path: Path) -> Path:
    report = build_report(ledger, "B1", CaFacts.from_file(settings.ca_cert_path))
    with path.open("wb") as fh:
        render_pdf(ledger, report, fh)
    return path


def run(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def test_pdf_pages_have_header_page_numbers_and_repeated_table_header(
    ledger: Ledger, station_settings: Settings, tmp_path: Path
) -> None:
    pdf = pdf_of(ledger, station_settings, tmp_path / "r.pdf")
    pages = run(tool("pdftotext"), "-layout", str(pdf), "-").split("\f")[:-1]
    total = len(pages)
    assert total >= 4
    for n, page in enumerate(pages, 1):
        assert "Batch report · B1" in page, n
        assert f"page {n} of {total}" in page, n
    device_pages = [p for p in pages if "dev-0" in p]
    assert len(device_pages) >= 2
    for page in device_pages:  # the header row repeats, whole ("attempts", not "att")
        assert re.search(r"hardware id\s+state\s+serial\s+fingerprint", page), page[:400]
        assert "attempts" in page and "failure" in page


def test_pdf_never_cuts_an_id_serial_or_fingerprint_nor_runs_off_the_page(
    ledger: Ledger, station_settings: Settings, tmp_path: Path
) -> None:
    pdf = pdf_of(ledger, station_settings, tmp_path / "r.pdf")
    text = run(tool("pdftotext"), "-raw", str(pdf), "-")
    for d in ledger.list_devices("B1"):
        assert d.device_id in text, d.device_id
        if d.serial:
            cert = ledger.certificates(d.device_id)[-1]
            assert cert.serial in text and cert.fingerprint in text, d.device_id
    assert "link-timeout" in text and "bad-proof" in text  # the failure column is there
    # Every word inside its page (pdftotext -bbox gives each page's size and word boxes).
    bbox = run(tool("pdftotext"), "-bbox", str(pdf), "-")
    for page in re.finditer(r'<page width="([\d.]+)" height="([\d.]+)">(.*?)</page>', bbox, re.S):
        width, height = float(page[1]), float(page[2])
        for m in re.finditer(r'xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="([\d.]+)"',
                             page[3]):  # fmt: skip
            assert float(m[3]) <= width - 20 and float(m[4]) <= height - 10, (m[0], width)


def test_cjk_text_is_set_in_a_cjk_font(
    ledger: Ledger, station_settings: Settings, tmp_path: Path
) -> None:
    pdf = pdf_of(ledger, station_settings, tmp_path / "r.pdf")
    text = run(tool("pdftotext"), str(pdf), "-")
    assert PRODUCT in text and "品質 QA" in text and "ケーブル不良" in text
    fonts = run(tool("pdffonts"), str(pdf))
    names = fonts.replace("-", "").replace(" ", "")
    assert "NotoSansCJK" in names and "DejaVuSansMono" in names, fonts


def test_charts_are_vector_and_the_first_page_renders(
    ledger: Ledger, station_settings: Settings, tmp_path: Path
) -> None:
    report = build_report(ledger, "B1", None)
    page = render_html(ledger, report)
    assert page.count("<svg") == 3 and "image/png" not in page
    assert "Boards verified over line time" in page and "Failed boards by reason" in page
    pdf = pdf_of(ledger, station_settings, tmp_path / "r.pdf")
    # Vector: the charts' text is text in the PDF, not pixels.
    first = run(tool("pdftotext"), "-f", "1", "-l", "2", str(pdf), "-")
    assert "Boards verified over line time" in first and "Cycle time per board" in first
    run(tool("pdftoppm"), "-png", "-r", "60", "-f", "1", "-l", "4", str(pdf), str(tmp_path / "p"))
    if keep := __import__("os").environ.get("KEEP_REPORT_PDF"):
        shutil.copy(pdf, keep)
    assert len(list(tmp_path.glob("p-*.png"))) == 4


def test_throughput_is_per_hour_of_line_time(
    station_settings: Settings, ca: CertificateAuthority
) -> None:
    """8 boards on 8 ports, 48 s each, verified within 70 ms of each other: 600 an hour."""
    with Ledger.from_settings(station_settings) as led:
        led.create_batch("T", product="p", planned_count=8, key_mode="board-ecc",
                         subject_template=TEMPLATE)  # fmt: skip
        for i in range(8):
            provision(led, ca, "T", f"t-{i}")
        base = led.get_device("t-0").verified_at
        assert base is not None
        with write_transaction(led.engine) as conn:
            for i in range(8):
                done = base + timedelta(milliseconds=10 * i)
                conn.execute(
                    update(devices)
                    .where(devices.c.device_id == f"t-{i}")
                    .values(created_at=done - timedelta(seconds=48), verified_at=done)
                )
        report = build_report(led, "T", None)
        facts = report.summary_facts()["throughput"]
        assert facts["boards_per_hour"] == pytest.approx(8 * 3600 / 48.07, rel=0.01)
        assert facts["cycle_time_per_port_s"] == pytest.approx(48, abs=0.01)
        assert facts["ports_busy_mean"] == pytest.approx(8, rel=0.01)
        assert "boards_per_minute" not in facts
        page = render_html(led, report)
    assert f"{facts['boards_per_hour']} boards per hour of line time" in page
    assert "48.0 s per board (median)" in page
