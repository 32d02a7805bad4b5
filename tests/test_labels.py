"""Shipping labels: a QR code with the device id and certificate fingerprint, PNG and PDF.

The line writes them for the boards it verified (`station line run --labels DIR`),
`station label` for a whole batch; zbarimg (Debian's zbar-tools, a real QR
reader) decodes both the PNG and the PDF rendered by poppler.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from station.ledger import Ledger
from station.settings import Settings
from tests.test_ledger import TEMPLATE

STATION = str(Path(sys.executable).parent / "station")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: `make setup` installs it (zbar-tools, poppler-utils)")
    return path


def station(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([STATION, *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == code, (args, done.stdout, done.stderr)
    return done


def qr_of(image: Path) -> str:
    out = subprocess.run(
        [tool("zbarimg"), "--quiet", "--raw", str(image)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def assert_whole_id_in_png(path: Path) -> None:
    """Nothing drawn in the last columns: the id ends before the label's right edge."""
    from PIL import Image

    image = Image.open(path).convert("L")
    w, h = image.size
    right = image.crop((w - 12, 0, w, h))
    assert right.getextrema()[0] > 128, "text runs into the right edge"


def test_the_line_writes_a_label_per_verified_board(station_env: Settings, tmp_path: Path) -> None:
    station("batch", "create", "L", "--product", "p", "--count", "5", "--key-mode", "board-ecc",
            "--subject-template", TEMPLATE)  # fmt: skip
    out = tmp_path / "labels"
    station("line", "run", "--batch", "L", "--simulate", "2", "--no-live", "--baud", "0",
            "--labels", str(out))  # fmt: skip
    devices = json.loads(station("device", "list", "--batch", "L", "--format", "json").stdout)
    assert len(devices) == 2
    with Ledger.from_settings(station_env) as ledger:
        fingerprints = {d["device_id"]: ledger.certificates(d["device_id"])[-1].fingerprint
                        for d in devices}  # fmt: skip
    listed = list(csv.DictReader((out / "labels.csv").open()))
    assert {r["device_id"] for r in listed} == set(fingerprints)
    for device_id, fp in fingerprints.items():
        payload = f"STATION-LABEL/1;device={device_id};sha256={fp}"
        assert qr_of(out / f"{device_id}.png") == payload
        assert_whole_id_in_png(out / f"{device_id}.png")
        pdf = out / f"{device_id}.pdf"
        size = subprocess.run([tool("pdfinfo"), str(pdf)], capture_output=True, text=True).stdout
        w, h = map(float, re.search(r"Page size:\s+([\d.]+) x ([\d.]+) pts", size).groups())  # type: ignore[union-attr]
        assert (round(w / 72 * 25.4), round(h / 72 * 25.4)) == (62, 29)
        text = subprocess.run([tool("pdftotext"), str(pdf), "-"], capture_output=True, text=True)
        flat = "".join(text.stdout.split())  # may wrap on the narrow label, never cut
        assert device_id in flat and fp in flat
        subprocess.run([tool("pdftoppm"), "-png", "-r", "300", str(pdf), str(tmp_path / device_id)],
                       check=True)  # fmt: skip
        [page] = list(tmp_path.glob(f"{device_id}*.png"))
        assert qr_of(page) == payload  # the PDF's QR is vector, and scans too


def test_station_label_writes_a_batch_and_refuses_an_unknown_one(
    station_env: Settings, tmp_path: Path
) -> None:
    station("batch", "create", "L", "--product", "p", "--count", "5", "--key-mode", "board-ecc",
            "--subject-template", TEMPLATE)  # fmt: skip
    station("line", "run", "--batch", "L", "--simulate", "1", "--no-live", "--baud", "0")
    done = station("label", "L", "--out-dir", str(tmp_path / "d"))
    assert "wrote 1 labels" in done.stdout
    assert len(list((tmp_path / "d").glob("*.png"))) == 1
    refused = station("label", "nope", "--out-dir", str(tmp_path / "e"), code=1)
    assert refused.stderr.startswith("error [unknown-batch]") and "Traceback" not in refused.stderr


def test_the_batch_report_lists_each_board_s_label(station_env: Settings, tmp_path: Path) -> None:
    station("batch", "create", "L", "--product", "p", "--count", "5", "--key-mode", "board-ecc",
            "--subject-template", TEMPLATE)  # fmt: skip
    out = tmp_path / "labels"
    station("line", "run", "--batch", "L", "--simulate", "2", "--no-live", "--baud", "0",
            "--labels", str(out))  # fmt: skip
    html = tmp_path / "L.html"
    station("report", "L", "--out", str(html), "--labels", str(out))
    page = html.read_text()
    assert "<th>label</th>" in page
    for png in out.glob("*.png"):
        assert f'<td class="mono">{png.name}</td>' in page
    pdf = tmp_path / "L.pdf"
    station("report", "L", "--out", str(pdf), "--labels", str(out))
    text = "".join(subprocess.run([tool("pdftotext"), str(pdf), "-"], capture_output=True,
                                  text=True).stdout.split())  # fmt: skip
    assert all(png.name in text for png in out.glob("*.png"))
    plain = tmp_path / "plain.html"
    station("report", "L", "--out", str(plain))
    assert "<th>label</th>" not in plain.read_text()
    refused = station("report", "L", "--out", str(plain), "--labels", str(tmp_path), code=1)
    assert refused.stderr.startswith("error [bad-labels]")
