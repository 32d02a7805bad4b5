"""Several stations on one ledger, and a station that dies mid-issuance (real processes).

PKCS#11 sessions do not survive fork, so every child is spawned and opens its
own CA from the same settings, as a second station on the line would.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from sqlalchemy import func, select

from station.ca import CertificateAuthority
from station.errors import StationError
from station.ledger import Ledger
from station.ledger.schema import certificates
from station.settings import Settings
from tests.test_ledger import TEMPLATE, make_csr

PER_STATION = 25
SHARED = 8


def _settings(data_dir: str, key_uri: str, station: str) -> Settings:
    return Settings(data_dir=Path(data_dir), ca_key_uri=key_uri, station_id=station)


def station_run(url: str, data_dir: str, key_uri: str, station: str) -> dict[str, object]:
    """One station: its own boards, then a race with the other station for shared boards."""
    from station.ca import open_ca

    ca = open_ca(_settings(data_dir, key_uri, station))
    issued: list[int] = []
    refusals: list[str] = []
    with Ledger(url, station, migrate=False) as led:
        for i in range(PER_STATION):
            issued.append(
                led.issue("B", f"{station}-{i}", make_csr(f"{station}-{i}")[0], ca).serial
            )
        for i in range(SHARED):
            try:
                issued.append(led.issue("B", f"shared-{i}", make_csr(f"shared-{i}")[0], ca).serial)
            except StationError as exc:
                refusals.append(exc.code)
    return {"issued": issued, "refusals": refusals}


def crash_after_sign(url: str, data_dir: str, key_uri: str) -> None:
    from station.ca import open_ca

    ca = open_ca(_settings(data_dir, key_uri, "test-station"))
    with Ledger(url, "test-station", migrate=False) as led:
        led.after_sign = lambda cert: os._exit(17)
        led.issue("B", "dev-1", make_csr("dev-1")[0], ca)
    os._exit(0)  # never reached: the certificate must not come back


def test_two_stations_issue_concurrently_without_duplicates_or_losses(
    ledger_url: str, station_settings: Settings
) -> None:
    with Ledger(ledger_url, "setup") as led:
        led.create_batch(
            "B", product="p", planned_count=1000, key_mode="board-ecc", subject_template=TEMPLATE
        )
    args = (ledger_url, str(station_settings.data_dir), station_settings.ca_key_uri or "")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        futures = [pool.submit(station_run, *args, name) for name in ("st-a", "st-b")]
        results = [f.result(timeout=120) for f in futures]

    returned = [s for r in results for s in r["issued"]]  # type: ignore[attr-defined]
    refusals = [c for r in results for c in r["refusals"]]  # type: ignore[attr-defined]
    assert len(returned) == len(set(returned)) == 2 * PER_STATION + SHARED
    # Each shared board got one identity; the other station was told why not.
    assert len(refusals) == SHARED
    assert set(refusals) <= {"already-provisioned", "issuance-in-progress"}
    with Ledger(ledger_url, "check") as led:
        with led.engine.connect() as conn:
            rows = conn.execute(select(certificates.c.serial, certificates.c.state)).all()
        assert sorted(int(s, 16) for s, _ in rows) == sorted(returned)
        assert {state for _, state in rows} == {"issued"}
        assert led.counts() == {"B": {"issued": 2 * PER_STATION + SHARED}}
        assert led.audit_verify() is None


def test_a_station_killed_between_signature_and_commit_loses_nothing(
    ledger_url: str, station_settings: Settings, ca: CertificateAuthority
) -> None:
    with Ledger(ledger_url, "test-station") as led:
        led.create_batch(
            "B", product="p", planned_count=10, key_mode="board-ecc", subject_template=TEMPLATE
        )
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(
        target=crash_after_sign,
        args=(ledger_url, str(station_settings.data_dir), station_settings.ca_key_uri or ""),
    )
    child.start()
    child.join(60)
    assert child.exitcode == 17

    with Ledger(ledger_url, "test-station") as led:
        (intent,) = led.certificates("dev-1")
        assert intent.state == "intent"
        report = led.recover(ca)  # what the station does when it starts again
        assert report.resigned == (intent.serial,)
        assert led.certificate(intent.serial).state == "issued"
        with led.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(certificates)).scalar() == 1
        assert led.audit_verify() is None
