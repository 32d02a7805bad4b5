"""Batch reports and the signed manifest, on a real SQLite ledger with the SoftHSM CA."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from station.ca import CertificateAuthority
from station.cli import report_cmds
from station.ledger import Ledger
from station.report import (
    VERIFY_COMMANDS,
    CaFacts,
    Format,
    build_report,
    iter_csv,
    iter_json,
    render_html,
    render_pdf,
)
from station.settings import Settings
from tests.test_ledger import TEMPLATE, make_csr

VERIFIED = ["dev-01", "dev-02", "dev-03", "dev-04"]  # dev-04 failed once, then passed
REVOKED = "dev-05"
FAILED = {"dev-06": "csr-timeout", "dev-07": "pop-failed", "dev-08": "csr-timeout"}
IN_PROGRESS = "dev-09"


def _provision(ledger: Ledger, ca: CertificateAuthority, device_id: str) -> None:
    ledger.mark_key_ready(device_id, batch="B1")
    ledger.issue("B1", device_id, make_csr(device_id)[0], ca)
    ledger.mark_installed(device_id, "ab" * 32)
    ledger.mark_verified(device_id)


@pytest.fixture
def ledger(station_settings: Settings, ca: CertificateAuthority) -> Iterator[Ledger]:
    """Batch B1 (planned 10): 4 verified (one after a retry), 1 revoked, 3 failed, 1 pending."""
    with Ledger.from_settings(station_settings) as led:
        led.create_batch(
            "B1",
            product="artik530",
            planned_count=10,
            key_mode="board-ecc",
            subject_template=TEMPLATE,
            days=365,
            operator="qa-ann",
        )
        led.mark_key_ready("dev-04", batch="B1")
        led.mark_failed("dev-04", "pop-failed", "signature did not verify")
        for device_id in [*VERIFIED, REVOKED]:
            _provision(led, ca, device_id)
        led.revoke(REVOKED, "board returned")
        for device_id, code in FAILED.items():
            led.mark_key_ready(device_id, batch="B1")
            led.mark_failed(device_id, code, f"{code} on the line")
        led.mark_key_ready(IN_PROGRESS, batch="B1")
        yield led


def _report(ledger: Ledger, settings: Settings):  # type: ignore[no-untyped-def]
    return build_report(ledger, "B1", CaFacts.from_file(settings.ca_cert_path))


def test_summary_counts_states_failures_retries_and_times(
    ledger: Ledger, station_settings: Settings, ca: CertificateAuthority
) -> None:
    facts = _report(ledger, station_settings).summary_facts()
    assert (facts["planned"], facts["enrolled"]) == (10, 9)
    assert (facts["verified"], facts["failed"], facts["revoked"]) == (4, 3, 1)
    assert facts["in_progress"] == 1
    assert facts["yield_pct"] == round(100 * 4 / 9, 2)
    assert facts["failures"][0] == {
        "code": "csr-timeout",
        "count": 2,
        "examples": ["dev-06", "dev-08"],
        "example_message": "csr-timeout on the line",
    }
    assert [(f["code"], f["count"]) for f in facts["failures"]] == [
        ("csr-timeout", 2),
        ("pop-failed", 1),
    ]
    assert facts["retries"] == {
        "failed_attempts": 4,
        "boards_retried": 4,
        "recovered": 1,
        "first_pass": 4,  # dev-01..03 and dev-05 (verified, later revoked)
    }
    assert facts["cycle_time"]["count"] == 5
    assert 0 <= facts["cycle_time"]["median_s"] <= facts["cycle_time"]["p90_s"]
    assert facts["cycle_time"]["p90_s"] <= facts["cycle_time"]["max_s"]
    assert set(facts["steps"]) == {
        "enrol_to_key_ready",
        "key_ready_to_issued",
        "issued_to_installed",
        "installed_to_verified",
    }
    assert sum(m["verified"] for m in facts["throughput"]["verified_per_minute"]) == 5


def test_json_and_csv_carry_the_same_devices_and_counts(
    ledger: Ledger, station_settings: Settings, ca: CertificateAuthority
) -> None:
    report = _report(ledger, station_settings)
    doc = json.loads("".join(iter_json(ledger, report)))
    rows = list(csv.DictReader(io.StringIO("".join(iter_csv(ledger, report)))))

    assert doc["batch"]["product"] == "artik530" and doc["batch"]["operator"] == "qa-ann"
    assert doc["ca"]["fingerprint"] == ca.fingerprint
    assert len(rows) == len(doc["devices"]) == 9
    for row, dev in zip(rows, doc["devices"], strict=True):
        assert row == {k: "" if v is None else str(v) for k, v in dev.items()}
    states = Counter(r["state"] for r in rows)
    assert states == Counter(doc["summary"]["states"])
    failures = Counter(r["failure_code"] for r in rows if r["state"] == "failed")
    assert failures == {f["code"]: f["count"] for f in doc["summary"]["failures"]}
    assert sum(int(r["attempts"]) for r in rows) == doc["summary"]["retries"]["failed_attempts"]

    by_id = {r["device_id"]: r for r in rows}
    for device_id in [*VERIFIED, REVOKED]:
        cert = ledger.certificates(device_id)[-1]
        assert by_id[device_id]["serial"] == cert.serial
        assert by_id[device_id]["fingerprint"] == cert.fingerprint  # = AWS certificateId
        assert cert.not_after is not None
        assert by_id[device_id]["not_after"].startswith(cert.not_after.strftime("%Y-%m-%dT%H"))
    assert by_id[REVOKED]["state"] == "revoked" and by_id[REVOKED]["serial"]
    assert by_id["dev-04"]["attempts"] == "1"


def test_html_has_summary_charts_failures_and_devices(
    ledger: Ledger, station_settings: Settings, ca: CertificateAuthority
) -> None:
    page = render_html(ledger, _report(ledger, station_settings))
    assert page.index('id="summary"') < page.index('id="charts"') < page.index('id="devices"')
    # Vector charts (inline SVG from the one template), no raster images.
    assert page.count("<svg") == 3 and "image/png" not in page
    assert "Boards verified over line time" in page and "Cycle time per board" in page
    assert ca.fingerprint in page and "artik530" in page and "qa-ann" in page
    assert "<td>3 / 1 / 1</td>" in page  # failed / revoked / in progress
    assert "csr-timeout" in page and "dev-06, dev-08" in page
    assert all(f'<td class="mono">dev-0{i}</td>' in page for i in range(1, 10))
    assert "full table is in the CSV" not in page


def test_html_device_table_of_a_big_batch_is_cut_with_a_pointer_to_the_csv(
    ledger: Ledger, station_settings: Settings, ca: CertificateAuthority
) -> None:
    page = render_html(ledger, _report(ledger, station_settings), max_rows=3)
    assert "first 3 of 9 boards" in page and "--format csv" in page
    # Enrolment order: dev-04 came first (its failed attempt).
    assert '<td class="mono">dev-02</td>' in page and '<td class="mono">dev-03</td>' not in page


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: `make setup` installs poppler-utils")
    return path


def test_pdf_renders_summary_charts_and_table_pages(
    ledger: Ledger, station_settings: Settings, tmp_path: Path, ca: CertificateAuthority
) -> None:
    pdf = tmp_path / "r.pdf"
    with pdf.open("wb") as fh:
        render_pdf(ledger, _report(ledger, station_settings), fh)
    text = subprocess.run(
        [_need("pdftotext"), "-layout", str(pdf), "-"], capture_output=True, text=True, check=True
    ).stdout
    pages = text.split("\f")
    # WeasyPrint lays out the HTML template: summary table, then the charts, failures and
    # steps, then the device table on landscape pages (tests/test_report_typeset.py).
    assert "Batch report: B1" in pages[0] and "Boards verified over line time" in pages[0]
    assert "Cycle time per board" in text and ca.fingerprint in pages[0]
    assert re.search(r"3\s*/\s*1\s*/\s*1", pages[0])  # failed / revoked / in progress
    assert "csr-timeout" in text and "dev-06, dev-08" in text
    devices = next(p for p in pages if "hardware id" in p)
    assert "Devices" in devices and "dev-09" in devices
    subprocess.run(
        [
            _need("pdftoppm"),
            "-png",
            "-r",
            "30",
            "-f",
            "1",
            "-l",
            "1",
            str(pdf),
            str(tmp_path / "p"),
        ],
        check=True,
    )
    assert list(tmp_path.glob("p-*1.png"))


# -- CLI -------------------------------------------------------------------------


@pytest.fixture
def run(station_env: Settings):  # type: ignore[no-untyped-def]
    app = typer.Typer(pretty_exceptions_enable=False)
    report_cmds.register(app)
    runner = CliRunner()

    def invoke(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result

    return invoke


def test_cli_writes_each_format_inferring_it_from_the_file_name(
    run, ledger: Ledger, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    for fmt in Format:
        out = tmp_path / f"r.{fmt.value}"
        result = run("report", "B1", "--out", str(out))
        assert "9 boards" in result.stderr
        assert out.stat().st_size > 0
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["verified"] == 4
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")
    stdout = run("report", "B1", "--format", "csv").stdout
    assert stdout.splitlines()[0].startswith("batch,device_id,state,serial,fingerprint")
    refused = run("report", "nope", "--format", "json", code=1)
    assert "[unknown-batch]" in refused.stderr


def test_help_documents_the_openssl_command(run) -> None:  # type: ignore[no-untyped-def]
    for args in (("report", "--help"), ("report", "batch", "--help")):
        text = " ".join(run(*args).stdout.split())
        assert "openssl dgst -sha256 -verify ca.pub.pem -signature manifest.sig" in text


def _openssl_verify(directory: Path) -> subprocess.CompletedProcess[str]:
    """Exactly the commands of the docs and --help, run by a POSIX shell."""
    return subprocess.run(
        ["sh", "-c", "set -e\n" + VERIFY_COMMANDS],
        cwd=directory,
        capture_output=True,
        text=True,
    )


def test_manifest_verifies_with_openssl_and_fails_after_a_one_byte_change(
    run, ledger: Ledger, tmp_path: Path, ca: CertificateAuthority
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m"
    run("report", "B1", "--manifest", "--out-dir", str(out))
    data = (out / "manifest.json").read_bytes()
    doc = json.loads(data)
    assert json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() == (
        data
    )
    assert sorted(d["device_id"] for d in doc["devices"]) == VERIFIED  # whitelisted boards only
    assert set(doc["devices"][0]) == {"device_id", "serial", "fingerprint", "not_after"}
    assert doc["ca"]["fingerprint"] == ca.fingerprint and doc["batch"]["name"] == "B1"

    good = _openssl_verify(out)
    assert good.returncode == 0 and "Verified OK" in good.stdout, good
    # The brief's bash form, with process substitution, is the same check.
    bash = subprocess.run(
        ["bash", "-c", "openssl dgst -sha256 -verify <(openssl x509 -in ca.pem -pubkey -noout) "
         "-signature manifest.sig manifest.json"],
        cwd=out, capture_output=True, text=True,
    )  # fmt: skip
    assert bash.returncode == 0 and "Verified OK" in bash.stdout

    run("report", "verify", str(out / "manifest.json"), str(out / "manifest.sig"))

    # One byte: a digit of the first serial.
    i = data.index(b'"serial":"') + len(b'"serial":"')
    flipped = data[:i] + (b"0" if data[i : i + 1] != b"0" else b"1") + data[i + 1 :]
    (out / "manifest.json").write_bytes(flipped)
    bad = _openssl_verify(out)
    assert bad.returncode != 0 and "Verification failure" in bad.stdout + bad.stderr
    refused = run(
        "report", "verify", str(out / "manifest.json"), str(out / "manifest.sig"),
        "--ca", str(out / "ca.pem"), code=1,
    )  # fmt: skip
    assert "[bad-signature]" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_verify_refuses_another_ca_and_a_missing_file(
    run, ledger: Ledger, tmp_path: Path, ca: CertificateAuthority
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m"
    run("report", "B1", "--manifest", "--out-dir", str(out))
    other = tmp_path / "other.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp_path / "k.pem"), "-subj", "/CN=other", "-out", str(other)],
        check=True, capture_output=True,
    )  # fmt: skip
    m, s = str(out / "manifest.json"), str(out / "manifest.sig")
    assert "[bad-signature]" in run("report", "verify", m, s, "--ca", str(other), code=1).stderr
    missing = run("report", "verify", m, str(tmp_path / "nope.sig"), code=1)
    assert "[not-found]" in missing.stderr


# -- HTTP ------------------------------------------------------------------------


def test_api_answers_the_report_for_qa_in_each_format(
    ledger: Ledger, station_settings: Settings
) -> None:
    from api.app import create_app
    from api.routers import reports

    app = create_app(station_settings)
    app.include_router(reports.router)  # the lead mounts it in create_app
    qa = ledger.create_token("qa-1", "qa")
    board = ledger.create_token("line-1", "board")
    auth = {"Authorization": f"Bearer {qa}"}
    with TestClient(app) as client:
        r = client.get("/v1/batches/B1/report", headers=auth)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.json()["summary"]["verified"] == 4 and len(r.json()["devices"]) == 9
        r = client.get("/v1/batches/B1/report", headers={**auth, "Accept": "text/csv"})
        assert r.headers["content-type"].startswith("text/csv")
        assert len(r.text.strip().splitlines()) == 10
        r = client.get("/v1/batches/B1/report?format=html", headers=auth)
        assert r.status_code == 200 and "<svg" in r.text  # vector charts
        r = client.get("/v1/batches/B1/report", headers={**auth, "Accept": "application/pdf"})
        assert r.content.startswith(b"%PDF")
        assert client.get("/v1/batches/B1/report").status_code == 401
        other = {"Authorization": f"Bearer {board}"}
        assert client.get("/v1/batches/B1/report", headers=other).status_code == 403
        assert client.get("/v1/batches/nope/report", headers=auth).status_code == 404
        assert client.get("/v1/batches/B1/report?format=xls", headers=auth).status_code == 400


def test_an_rsa_ca_signs_a_manifest_that_openssl_verifies(tmp_path: Path) -> None:
    """PKCS#1 v1.5 through the token (the RSA CA signs the whole message, not a digest)."""
    from hsm.keystore import KeyType
    from station.ca import init_ca
    from station.report import verify_manifest, write_signed_manifest
    from station.report.manifest import ManifestError

    settings = Settings(
        data_dir=tmp_path / "rsa", station_id="rsa-station", dev_token_label="rsa-ca-test"
    )
    ca = init_ca(settings, key_type=KeyType.RSA_2048).ca
    assert ca is not None and ca.is_rsa
    with Ledger.from_settings(settings) as led:
        led.create_batch(
            "B1", product="p", planned_count=5, key_mode="see-rsa", subject_template=TEMPLATE
        )
        for device_id in VERIFIED[:2]:
            _provision(led, ca, device_id)
        files = write_signed_manifest(led, "B1", ca, tmp_path / "m")
    assert files.devices == 2
    good = _openssl_verify(tmp_path / "m")
    assert good.returncode == 0 and "Verified OK" in good.stdout, good
    verify_manifest(files.manifest, files.signature, files.ca_pem)
    data = files.manifest.read_bytes()
    files.manifest.write_bytes(data.replace(b'"B1"', b'"B2"', 1))
    with pytest.raises(ManifestError) as info:
        verify_manifest(files.manifest, files.signature, files.ca_pem)
    assert info.value.code == "bad-signature"


def test_report_file_names_in_any_script_keep_their_name() -> None:
    """A header is Latin-1: the name goes in filename* (RFC 6266/8187), ASCII in filename.

    Batch names are ASCII identifiers since issue 15 (station.ledger.textrules), so
    the header is checked on the function alone, for names a future caller may pass."""
    from urllib.parse import unquote

    from api.routers.reports import content_disposition

    names = {"批次": "__", 'emoji😀 "x"\\y': "emoji_ _x__y"}
    for name, ascii_name in names.items():
        for fmt in Format:
            disposition = content_disposition(f"{name}-report.{fmt}")
            fallback, encoded = disposition.removeprefix("inline; ").split("; ")
            assert fallback == f'filename="{ascii_name}-report.{fmt}"'
            assert encoded.startswith("filename*=UTF-8''")
            assert unquote(encoded.removeprefix("filename*=UTF-8''")) == f"{name}-report.{fmt}"


def test_a_batch_gets_its_report_in_each_format(ledger: Ledger, station_settings: Settings) -> None:
    from api.app import create_app

    ledger.create_batch(
        "B-7.x_y", product="p", planned_count=1, key_mode="board-ecc", subject_template=TEMPLATE
    )
    auth = {"Authorization": f"Bearer {ledger.create_token('qa-1', 'qa')}"}
    with TestClient(create_app(station_settings)) as client:
        for fmt in Format:
            r = client.get("/v1/batches/B-7.x_y/report", params={"format": fmt}, headers=auth)
            assert r.status_code == 200, (fmt, r.text)
            assert f'filename="B-7.x_y-report.{fmt}"' in r.headers["content-disposition"]
            if fmt is Format.JSON:
                assert r.json()["batch"]["name"] == "B-7.x_y"
            if fmt is Format.PDF:
                assert r.content.startswith(b"%PDF") and r.content.rstrip().endswith(b"%%EOF")


def test_dollar_signs_in_batch_fields_and_failures_are_text_not_mathtext(
    ledger: Ledger, station_settings: Settings, tmp_path: Path
) -> None:
    """matplotlib parsed $...$ as mathtext (ValueError after the 200 had started); the
    typeset report must keep them as text too."""
    from api.app import create_app

    ledger.create_batch(
        "m-foo",
        product="$\\frac{$",
        planned_count=2,
        key_mode="board-ecc",
        subject_template="/O=$\\frac{$/OU=$x/CN={device_id}",
        operator="$^$",
    )
    ledger.mark_key_ready("dev-m1", batch="m-foo")
    ledger.mark_failed("dev-m1", "pop-failed", "board said $\\foo$ and $5 $^")
    report = build_report(ledger, "m-foo", CaFacts.from_file(station_settings.ca_cert_path))
    pdf = tmp_path / "m.pdf"
    with pdf.open("wb") as fh:
        render_pdf(ledger, report, fh)
    text = subprocess.run(
        [_need("pdftotext"), "-layout", str(pdf), "-"], capture_output=True, text=True, check=True
    ).stdout
    assert "Batch report: m-foo" in text and "$\\frac{$" in text
    assert "board said $\\foo$ and $5 $^" in text
    assert "m-foo" in render_html(ledger, report)

    auth = {"Authorization": f"Bearer {ledger.create_token('qa-1', 'qa')}"}
    with TestClient(create_app(station_settings)) as client:
        r = client.get("/v1/batches/m-foo/report", params={"format": "pdf"}, headers=auth)
        assert r.status_code == 200 and r.headers["content-type"] == "application/pdf"
        assert r.content.startswith(b"%PDF") and r.content.rstrip().endswith(b"%%EOF")
        assert int(r.headers["content-length"]) == len(r.content)  # whole, not streamed
        r = client.get("/v1/batches/m-foo/report", params={"format": "html"}, headers=auth)
        assert r.status_code == 200 and "board said $\\foo$ and $5 $^" in r.text
        assert "$\\frac{$" in r.text
