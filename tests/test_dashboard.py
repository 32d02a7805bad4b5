"""The operator dashboard in real headless Chromium (Debian's), against uvicorn on 127.0.0.1."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
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
            expect(page.locator("#conn")).to_have_text("live")

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
