"""The operator dashboard in real headless Chromium (Debian's), against uvicorn on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn

from api.app import create_app
from firmware_hooks.protocol import proof_message
from station.ledger import Ledger
from station.settings import Settings
from tests.test_api_helpers import TEMPLATE, new_csr, sign

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(station_settings: Settings) -> Iterator[str]:
    port = _free_port()
    config = uvicorn.Config(
        create_app(station_settings), host="127.0.0.1", port=port, log_level="warning"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_dashboard_updates_live(server: str, station_settings: Settings) -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium package")
    from playwright.sync_api import expect, sync_playwright

    with Ledger.from_settings(station_settings) as ledger:
        operator = ledger.create_token("line-op", "operator")
        board = ledger.create_token("board", "board")
    http = httpx.Client(base_url=server, timeout=10)
    op = {"Authorization": f"Bearer {operator}"}
    r = http.post(
        "/v1/batches",
        headers=op,
        json={
            "name": "LINE-1",
            "product": "artik-530",
            "planned_count": 5,
            "subject_template": TEMPLATE,
        },
    )
    assert r.status_code == 201, r.text

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.fill("#token", operator)
            page.click("#connect")
            row = page.locator('#batches tr[data-batch="LINE-1"]')
            expect(row).to_be_visible(timeout=10_000)
            expect(row.locator("td.verified")).to_have_text("0")
            expect(page.locator("#conn")).to_have_text("connected")

            # Provision one board through the HTTP API; the page follows by polling.
            bh = {"Authorization": f"Bearer {board}"}
            pem, key = new_csr("dash-1")
            r = http.post(
                "/v1/certificates",
                headers=bh,
                json={"batch": "LINE-1", "device_id": "dash-1", "csr": pem},
            )
            assert r.status_code == 201, r.text
            expect(row.locator("td.devices")).to_have_text("1", timeout=10_000)
            nonce = http.post("/v1/devices/dash-1/challenge", headers=bh).json()["nonce"]
            message = proof_message("dash-1", base64.b64decode(nonce))
            sig = base64.b64encode(sign(key, message)).decode()
            r = http.post(
                "/v1/devices/dash-1/proof", headers=bh, json={"nonce": nonce, "signature": sig}
            )
            assert r.json()["state"] == "verified"
            expect(row.locator("td.verified")).to_have_text("1", timeout=10_000)

            # A refused request shows up under the last failures.
            http.post(
                "/v1/certificates",
                headers=bh,
                json={"batch": "LINE-1", "device_id": "dash-2", "csr": "garbage"},
            )
            expect(page.locator("#failures")).to_contain_text("malformed-csr", timeout=10_000)

            # The token is kept for the session: a reload does not ask again.
            page.reload()
            expect(row).to_be_visible(timeout=10_000)
            expect(page.locator("#login")).to_be_hidden()
        finally:
            browser.close()
            http.close()


def _status(updated: datetime, *, running: bool = True) -> dict[str, object]:
    since = (updated - timedelta(seconds=75)).isoformat()
    return {
        "updated": updated.isoformat(),
        "running": running,
        "batch": "B-2",
        "ports": [
            {"port": "/dev/ttyUSB0", "device_id": "ARTIK-0001", "step": "prove", "since": since},
            {"port": "/dev/ttyUSB1", "device_id": None, "step": "waiting", "since": since},
            {"port": "/dev/ttyUSB2", "device_id": "bad-1", "step": "failed", "since": since,
             "last_error": "link-timeout: no answer to hello"},
            {"port": "/dev/ttyUSB3", "device_id": "ARTIK-0004", "step": "issue", "since": since},
        ],
        "recent_failures": [
            {"device_id": "bad-1", "code": "link-timeout", "message": "no answer to hello",
             "at": updated.isoformat()},
        ],
        "issued_per_min": 0.0,
    }  # fmt: skip


def test_dashboard_shows_a_stopped_line_each_failure_once_at_800_px(
    server: str, station_settings: Settings, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium package")
    from playwright.sync_api import expect, sync_playwright

    with Ledger.from_settings(station_settings) as ledger:
        operator = ledger.create_token("line-op", "operator")
        ledger.create_batch("B-2", product="artik-530", planned_count=20, key_mode="board-ecc",
                            subject_template=TEMPLATE)  # fmt: skip
        for d in ("bad-1", "bad-2"):
            ledger.register_device("B-2", d)
            ledger.mark_failed(d, "link-timeout", "no answer to hello")
    status = station_settings.data_dir / "line-status.json"
    status.write_text(json.dumps(_status(datetime.now(UTC))))
    shots = Path(os.environ.get("DASHBOARD_SHOTS", tmp_path))

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 800, "height": 1100})
            page.goto(server + "/")
            page.fill("#token", operator)
            page.click("#connect")
            expect(page.locator("#line-state")).to_have_text("line running", timeout=10_000)
            tiles = page.locator("#ports .tile")
            expect(tiles).to_have_count(4)
            tile = page.locator('.tile[data-port="/dev/ttyUSB2"]')
            expect(tile).to_contain_text("no answer to hello (link-timeout)")
            expect(page.locator('.tile[data-port="/dev/ttyUSB0"]')).to_contain_text(
                "proving it holds the key"
            )
            expect(page.locator('.tile[data-port="/dev/ttyUSB0"] .time')).to_contain_text("1 min")
            row = page.locator('#batches tr[data-batch="B-2"]')
            expect(row.locator("td.reasons")).to_have_text("link-timeout 2")
            expect(row.locator("td.yield")).to_have_text("0.0 %")
            # bad-1 is failed in the ledger and in the line's recent failures: listed once.
            expect(page.locator("#failures tbody tr")).to_have_count(2)
            expect(page.locator("#failures tbody tr", has_text="bad-1")).to_have_count(1)
            expect(page.locator('#health li[data-part="database"]')).to_have_text("database: ok")
            assert page.evaluate("document.documentElement.scrollWidth") <= 800
            page.screenshot(path=str(shots / "dashboard-running.png"), full_page=True)

            # The line process is killed: its file stays, four minutes old.
            status.write_text(json.dumps(_status(datetime.now(UTC) - timedelta(minutes=4))))
            expect(page.locator("#line-state")).to_have_text("line stopped", timeout=10_000)
            expect(page.locator("#line-note")).to_contain_text("stopped updating 4 min")
            expect(page.locator("#ports .tile.stale")).to_have_count(4)
            expect(page.locator("#conn")).to_have_text("connected")  # the API still answers
            assert page.evaluate("document.documentElement.scrollWidth") <= 800
            page.screenshot(path=str(shots / "dashboard-stopped.png"), full_page=True)

            # A run that ended says so in its last write, at once (seconds, not minutes).
            status.write_text(json.dumps(_status(datetime.now(UTC), running=False)))
            expect(page.locator("#line-note")).to_have_text(
                re.compile(r"stopped updating \d+ s ago"), timeout=10_000
            )
            expect(page.locator("#line-state")).to_have_text("line stopped")
        finally:
            browser.close()


def test_an_idle_line_keeps_its_status_fresh_and_its_end_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from station.line import status as line_status

    monkeypatch.setattr(line_status, "HEARTBEAT", 0.05)
    path = tmp_path / "line-status.json"
    st = line_status.LineStatus("B", path, min_interval=0.0)
    assert st.flush()
    first = json.loads(path.read_text())
    assert first["running"] is True
    assert not st.flush()  # nothing changed, heartbeat not due
    time.sleep(0.06)  # the heartbeat's own period, not a wait for a race
    assert st.flush()  # idle, but written again: a fresh `updated` means alive
    assert json.loads(path.read_text())["updated"] > first["updated"]
    st.running = False
    st.flush(force=True)
    assert json.loads(path.read_text())["running"] is False
