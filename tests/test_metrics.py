"""/metrics tells the truth for every worker and for the line, in one scrape.

The line runs as its own process (`station line run`), certificates are asked
for over HTTP from two `station serve` workers; every scrape, whichever worker
answers it, counts all of it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from api.app import create_app
from station.ledger import Ledger
from station.settings import Settings
from tests.test_api_helpers import TEMPLATE, new_csr

STATION = str(Path(sys.executable).parent / "station")


def station(*args: str) -> str:
    done = subprocess.run([STATION, *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def value(text: str, sample: str) -> float:
    m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert m, f"{sample} not in\n{text}"
    return float(m.group(1))


def test_a_scrape_counts_what_the_line_did(station_env: Settings) -> None:
    station("batch", "create", "L", "--product", "p", "--count", "10", "--key-mode", "board-ecc",
            "--subject-template", TEMPLATE)  # fmt: skip
    station("line", "run", "--batch", "L", "--simulate", "3", "--no-live", "--baud", "0")
    with Ledger.from_settings(station_env) as ledger:
        ledger.register_device("L", "cable-1")
        ledger.mark_failed("cable-1", "link-timeout", "no answer to hello")
        qa = ledger.create_token("prometheus", "qa")  # per-batch metrics are for readers
    with TestClient(create_app(station_env)) as client:
        text = client.get("/metrics", headers={"Authorization": f"Bearer {qa}"}).text
        public = client.get("/metrics").text
    assert "station_certificates_issued_total" not in public and '"L"' not in public
    assert value(public, 'station_board_step_seconds_count{step="cycle"}') == 3
    assert value(text, 'station_certificates_issued_total{batch="L"}') == 3
    assert value(text, 'station_boards{batch="L",state="verified"}') == 3
    assert value(text, 'station_boards_failed{batch="L",reason="link-timeout"}') == 1
    assert value(text, 'station_board_step_seconds_count{step="cycle"}') == 3
    assert value(text, 'station_board_step_seconds_bucket{le="+Inf",step="prove"}') == 3
    assert value(text, 'station_board_step_seconds_sum{step="cycle"}') > 0
    assert value(text, "station_http_certificate_requests_total" + '{outcome="issued"}') == 0


def test_the_line_collector_says_whether_the_line_runs(station_env: Settings) -> None:
    path = station_env.data_dir / "line-status.json"
    ports = [
        {"port": "/dev/ttyUSB0", "device_id": "a", "step": "prove", "since": None},
        {"port": "/dev/ttyUSB1", "device_id": "b", "step": "issue", "since": None},
        {"port": "/dev/ttyUSB2", "device_id": None, "step": "waiting", "since": None},
    ]
    app = create_app(station_env)
    with TestClient(app) as client:
        path.write_text(json.dumps({"updated": datetime.now(UTC).isoformat(), "ports": ports}))
        running = client.get("/metrics").text
        old = (datetime.now(UTC) - timedelta(minutes=4)).isoformat()
        path.write_text(json.dumps({"updated": old, "ports": ports}))
        stopped = client.get("/metrics").text
    assert value(running, "station_line_up") == 1
    assert value(running, "station_line_ports_active") == 2
    assert value(running, 'station_line_ports{step="waiting"}') == 1
    assert value(stopped, "station_line_up") == 0
    assert value(stopped, "station_line_ports_active") == 0
    assert 230 < value(stopped, "station_line_status_age_seconds") < 300


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_scrape_of_two_workers_counts_both(station_env: Settings) -> None:
    op = station("token", "create", "--role", "operator", "--name", "op").strip()
    board = station("token", "create", "--role", "board", "--name", "b").strip()
    port = _port()
    proc = subprocess.Popen(
        [STATION, "serve", "--port", str(port), "--workers", "2"],
        env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "station serve did not come up"
            time.sleep(0.2)
        httpx.post(url + "/v1/batches", headers={"Authorization": f"Bearer {op}"},
                   json={"name": "W", "product": "p", "planned_count": 30,
                         "subject_template": TEMPLATE}).raise_for_status()  # fmt: skip
        for i in range(16):  # a new connection each: the kernel spreads them over the workers
            pem, _ = new_csr(f"w-{i}")
            r = httpx.post(url + "/v1/certificates", headers={"Authorization": f"Bearer {board}"},
                           json={"batch": "W", "device_id": f"w-{i}", "csr": pem})  # fmt: skip
            assert r.status_code == 201, r.text
        for _ in range(12):
            text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {op}"}).text
            assert value(text, 'station_http_certificate_requests_total{outcome="issued"}') == 16
            assert value(text, "station_issue_duration_seconds_count") == 16
            assert value(text, 'station_certificates_issued_total{batch="W"}') == 16
    finally:
        proc.terminate()
        proc.wait(20)
