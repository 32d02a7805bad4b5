"""The whitelist follows the line within seconds: `station serve`'s sync loop.

A real uvicorn serving the app with STATION_AWS_SYNC_INTERVAL set, the moto server
as AWS; a board verified through the ledger shows up in the DynamoDB table within
seconds, and the loop's lag and last error show in /metrics, the health details
(/healthz with an operator token) and on the dashboard (real headless Chromium).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import uvicorn

from api.app import create_app
from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.line.broker import free_port
from station.publish.aws_sync import create_whitelist_table
from station.publish.whitelist_sync import LoopLock
from station.settings import Settings
from tests.fixtures.hsm import settings_for
from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS
from tests.test_ledger import TEMPLATE, make_csr

TABLE = "loop-whitelist"


def wait_for(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def synced(aws_env: str, ca_home: Path, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    settings = settings_for(
        ca_home, tmp_path / "data", aws_sync_interval=0.5, whitelist_table=TABLE
    )
    create_whitelist_table(boto3.client("dynamodb"), TABLE)
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "B1", product="p", planned_count=10, key_mode="board-ecc", subject_template=TEMPLATE
        )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive())
    assert thread.is_alive()
    try:
        yield f"http://127.0.0.1:{port}", settings
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def items() -> set[str]:
    scanned = boto3.client("dynamodb").scan(TableName=TABLE)["Items"]
    return {i["serial"]["S"] for i in scanned}


def metric(text: str, name: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(name):
            return line
    return None


def test_serve_syncs_within_seconds_and_shows_lag_and_errors(
    synced: tuple[str, Settings], ca: CertificateAuthority
) -> None:
    url, settings = synced
    with Ledger.from_settings(settings) as ledger:
        reader = ledger.create_token("qa", "qa")
        operator = ledger.create_token("op", "operator")
        ledger.issue("B1", "dev-1", make_csr("dev-1")[0], ca)
        verified_at = time.monotonic()
        ledger.mark_verified("dev-1")
        serial = ledger.get_device("dev-1").serial
    wait_for(lambda: serial in items())
    assert time.monotonic() - verified_at < 10  # seconds, not "when someone runs it"

    http = httpx.Client(base_url=url, timeout=10)
    scrape = http.get("/metrics").text
    lag = metric(scrape, "station_whitelist_sync_lag_seconds")
    assert lag is not None and float(lag.split()[-1]) < 10
    assert metric(scrape, "station_whitelist_sync_last_error_info") is None

    auth = {"Authorization": f"Bearer {reader}"}
    details = {"Authorization": f"Bearer {operator}"}
    health = http.get("/healthz", headers=details).json()
    assert health["whitelist_sync"]["status"] == "ok"
    assert health["whitelist_sync"]["last_error"] is None
    assert health["whitelist_sync"]["lag_seconds"] < 10
    assert "whitelist_sync" not in http.get("/healthz").json()  # public: nothing of AWS
    line = http.get("/v1/line/status", headers=auth).json()
    assert line["whitelist_sync"]["lag_seconds"] < 10

    # AWS refuses (the table is gone): the loop keeps going, the error shows everywhere
    boto3.client("dynamodb").delete_table(TableName=TABLE)

    def failing() -> dict[str, Any] | None:
        body: dict[str, Any] = http.get("/healthz", headers=details).json()
        return body if body["whitelist_sync"]["status"] == "failing" else None

    body = wait_for(failing)
    assert body["status"] == "ok"  # the station itself is fine
    assert body["whitelist_sync"]["code"] == "aws-error"
    assert "ResourceNotFoundException" in body["whitelist_sync"]["detail"]
    assert body["whitelist_sync"]["failures"] >= 1
    scrape = http.get("/metrics").text
    error = metric(scrape, "station_whitelist_sync_last_error_info")
    assert error is not None and 'code="aws-error"' in error
    failures = metric(scrape, "station_whitelist_sync_failures_total")
    assert failures is not None and float(failures.split()[-1]) >= 1
    assert http.get("/healthz").status_code == 200  # AWS down is no reason to restart

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium package")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.fill("#token", reader)
            page.click("#connect")
            pill = page.locator("#sync")
            expect(pill).to_be_visible(timeout=10_000)
            expect(pill).to_contain_text("[aws-error]")
            create_whitelist_table(boto3.client("dynamodb"), TABLE)  # AWS is back
            expect(pill).to_contain_text("AWS: synced", timeout=15_000)
            expect(pill).not_to_contain_text("[")
        finally:
            browser.close()
            http.close()


def test_one_loop_per_data_directory(station_settings: Settings) -> None:
    first, second = LoopLock(station_settings), LoopLock(station_settings)
    try:
        assert first.acquire()
        assert not second.acquire()  # a second worker (or a --watch beside serve) stands by
        first.close()
        assert second.acquire()
    finally:
        second.close()
