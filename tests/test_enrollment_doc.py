"""The command lines of docs/enrollment.md (curl, pki --est, openssl cmp) run as written.

Only the host and port (``https://localhost:8443``), the data directory (``var/``)
and the board token are put in for the test's own; the batch is the doc's.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from station.ledger import Ledger
from station.settings import Settings
from station.whitelist import serial_hex
from tests.serving import serve

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "enrollment.md").read_text()
TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


def blocks_after(heading: str, n: int = 0) -> str:
    """The n-th ```sh block after a heading."""
    at = DOC.index(heading)
    blocks = re.findall(r"```sh\n(.*?)```", DOC[at:], re.S)
    assert len(blocks) > n, heading
    return str(blocks[n])


def run_block(block: str, served_url: str, settings: Settings, work: Path, token: str) -> None:
    script = block.replace("https://localhost:8443", served_url).replace(
        "var/", f"{settings.data_dir}/"
    )
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        env={"PATH": "/usr/bin:/bin", "TOKEN": token, "HOME": str(work)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("heading", ["### curl and openssl", "### strongSwan `pki --est`"])
def test_enrollment_doc_commands_work(
    station_settings: Settings, tmp_path: Path, heading: str
) -> None:
    with Ledger.from_settings(station_settings) as ledger:
        ledger.create_batch(
            "B-2026-12", product="p", planned_count=10, key_mode="board-ecc",
            subject_template=TEMPLATE,
        )  # fmt: skip
        token = ledger.create_token("est-line-1", "board")
    work = tmp_path / "board"
    work.mkdir()
    with serve(station_settings, STATION_EST_DEFAULT_BATCH="B-2026-12") as served:
        run_block(blocks_after(heading), served.url, station_settings, work, token)
    first = x509.load_pem_x509_certificate((work / "board.pem").read_bytes())
    second = x509.load_pem_x509_certificate((work / "board2.pem").read_bytes())
    with Ledger.from_settings(station_settings) as ledger:
        assert ledger.certificate(serial_hex(first.serial_number)).state == "superseded"
        device = ledger.get_device("0123abcd")
        assert device.serial == serial_hex(second.serial_number)
        assert device.state == "verified"


def test_cmp_doc_commands_work(station_settings: Settings, tmp_path: Path) -> None:
    import os

    with Ledger.from_settings(station_settings) as ledger:
        ledger.create_batch(
            "B-2026-12", product="p", planned_count=10, key_mode="board-ecc",
            subject_template=TEMPLATE,
        )  # fmt: skip
        token = ledger.create_token("est-line-1", "board")
    secrets = tmp_path / "cmp-secrets"
    secrets.write_text(f"est-line-1 {token}\n")
    os.chmod(secrets, 0o600)
    work = tmp_path / "board"
    work.mkdir()
    with serve(station_settings, tls=False, STATION_CMP_SECRETS=str(secrets)) as served:
        for n in (0, 1):  # p10cr, then ir and kur
            block = blocks_after("### openssl cmp", n).replace(
                "127.0.0.1:8000", f"127.0.0.1:{served.port}"
            )
            run_block(block, served.url, station_settings, work, token)
    first = x509.load_pem_x509_certificate((work / "board.pem").read_bytes())
    second = x509.load_pem_x509_certificate((work / "board2.pem").read_bytes())
    with Ledger.from_settings(station_settings) as ledger:
        assert ledger.certificate(serial_hex(first.serial_number)).state == "superseded"
        device = ledger.get_device("0123abcd")
        assert device.serial == serial_hex(second.serial_number)
        assert device.state == "verified"
    gw = x509.load_pem_x509_certificate((work / "gw.pem").read_bytes())
    gw2 = x509.load_pem_x509_certificate((work / "gw2.pem").read_bytes())
    with Ledger.from_settings(station_settings) as ledger:
        assert ledger.certificate(serial_hex(gw.serial_number)).state == "superseded"
        assert ledger.get_device("gw-0042").serial == serial_hex(gw2.serial_number)


def test_serverkeygen_doc_commands_work(station_settings: Settings, tmp_path: Path) -> None:
    with Ledger.from_settings(station_settings) as ledger:
        ledger.create_batch(
            "SEE-2026-12", product="p", planned_count=10, key_mode="see-rsa",
            subject_template=TEMPLATE,
        )  # fmt: skip
        token = ledger.create_token("est-line-1", "board")
    work = tmp_path / "board"
    work.mkdir()
    with serve(station_settings, STATION_EST_SERVERKEYGEN_BATCHES="SEE-2026-12") as served:
        run_block(blocks_after("### serverkeygen"), served.url, station_settings, work, token)
    cert = x509.load_pem_x509_certificate((work / "board.pem").read_bytes())
    with Ledger.from_settings(station_settings) as ledger:
        device = ledger.get_device("0123beef")
        assert device.serial == serial_hex(cert.serial_number)
        assert device.state == "verified"
