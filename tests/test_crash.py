"""Crash consistency: stations SIGKILLed at random moments while provisioning.

`station line run` runs as a real subprocess against simulated boards (the real
agent on ptys, owned by the test so they outlive every station). It is killed
with SIGKILL at random instants (during start-up and recovery, key generation,
issuance, chain install, proof) at least 20 times and started again each time;
then runs nobody kills finish the boards. The rig (tests/crash_rig.py) then
checks: every certificate found on a board is in the ledger byte for byte; no
intent is left; no serial twice; no device with two live certificates; every
board verified and holding its live certificate; the whitelist is exactly the
verified serials; `station audit verify` passes.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.recovery import recover_at_startup
from station.settings import Settings
from tests.crash_rig import LAUNCH, TEMPLATE, Station, crash_rig, station_env
from tests.fixtures.hsm import settings_for
from tests.test_api_helpers import new_csr

KILLS = 20
# Seconds after the line is up within which a station is killed (a fifth of the
# kills land in start-up instead); four boards take about 0.3 s unthrottled.
KILL_WINDOW = 0.6
# Between the HSM signature and the ledger commit (tests/crash_rig.py LAUNCH_PAUSED),
# so that kills land there too; every fifth kill waits for an intent to show.
SIGN_PAUSE = 0.1


def _batch(url: str, boards: int) -> None:
    with Ledger(url, "setup") as led:
        led.create_batch(
            "CRASH",
            product="artik530",
            planned_count=boards,
            key_mode="board-ecc",
            subject_template=TEMPLATE,
        )


def test_sqlite_station_killed_at_random_loses_nothing(ca_home: Path, tmp_path: Path) -> None:
    s = settings_for(ca_home, tmp_path / "data")
    url = s.resolved_database_url()
    boards = 16
    _batch(url, boards)
    env = station_env(
        data_dir=s.data_dir,
        ca_key_uri=s.ca_key_uri or "",
        station_id="line-1",
        sign_pause=SIGN_PAUSE,
    )
    station = Station("line-1", env, tmp_path / "line-1.log")
    with crash_rig(
        stations=[station],
        database_url=url,
        batch="CRASH",
        total_boards=boards,
        plugged=4,
        kills=KILLS,
        kill_window=KILL_WINDOW,
        work_dir=tmp_path / "boards",
        seed=1,
    ) as rig:
        figures = rig.run()
        assert figures.kills >= KILLS, figures
        assert figures.kills_with_intent >= 1, figures
        rig.check()
        assert figures.certificates_left >= boards


def test_two_stations_on_postgresql_killed_at_random_lose_nothing(
    ca_home: Path, tmp_path: Path, pg_database: str
) -> None:
    boards = 16
    _batch(pg_database, boards)
    stations = []
    for name in ("st-a", "st-b"):
        s = settings_for(ca_home, tmp_path / name, station_id=name)
        env = station_env(
            data_dir=s.data_dir,
            ca_key_uri=s.ca_key_uri or "",
            station_id=name,
            database_url=pg_database,
            sign_pause=SIGN_PAUSE,
        )
        stations.append(Station(name, env, tmp_path / f"{name}.log"))
    with crash_rig(
        stations=stations,
        database_url=pg_database,
        batch="CRASH",
        total_boards=boards,
        plugged=6,
        kills=KILLS,
        kill_window=KILL_WINDOW,
        work_dir=tmp_path / "boards",
        seed=2,
    ) as rig:
        figures = rig.run()
        assert figures.kills >= KILLS, figures
        assert figures.kills_with_intent >= 1, figures
        rig.check()
        assert figures.certificates_left >= boards


# ------------------------------------------------ start-up recovery, one rule each


def _orphan_intent(settings: Settings, ca: CertificateAuthority, device: str = "dev-1") -> str:
    """What a station killed between the HSM signature and the commit leaves: an intent."""

    def killed(cert: x509.Certificate) -> None:
        raise SystemExit("SIGKILL")

    with Ledger.from_settings(settings) as led:
        try:
            led.get_batch("B")
        except Exception:
            led.create_batch(
                "B", product="p", planned_count=10, key_mode="board-ecc", subject_template=TEMPLATE
            )
        led.after_sign = killed
        with pytest.raises(SystemExit):
            led.issue("B", device, new_csr(device)[0].encode(), ca)
        (intent,) = led.certificates(device)
    assert intent.state == "intent"
    return intent.serial


def test_a_restart_recovers_a_killed_runs_intent_at_once(
    station_settings: Settings, ca: CertificateAuthority
) -> None:
    serial = _orphan_intent(station_settings, ca)
    with Ledger.from_settings(station_settings) as led:
        report, lock = recover_at_startup(led, ca, station_settings.data_dir)
        lock.close()
        assert report.resigned == (serial,)
        assert led.certificate(serial).state == "issued"


def test_a_start_beside_a_live_process_leaves_its_young_intents_alone(
    station_settings: Settings, ca: CertificateAuthority
) -> None:
    with Ledger.from_settings(station_settings) as led:
        _, live = recover_at_startup(led, ca, station_settings.data_dir)
        # The live process is signing this one right now, as far as anyone can tell.
        serial = _orphan_intent(station_settings, ca)
        report, beside = recover_at_startup(led, ca, station_settings.data_dir)
        assert report.resigned == () and led.certificate(serial).state == "intent"
        live.close()
        beside.close()
        # Both gone: whoever starts next is alone and resolves it.
        report, lock = recover_at_startup(led, ca, station_settings.data_dir)
        lock.close()
        assert report.resigned == (serial,)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_station_serve_recovers_at_start_up(
    station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    serial = _orphan_intent(station_settings, ca)
    env = station_env(
        data_dir=station_settings.data_dir,
        ca_key_uri=station_settings.ca_key_uri or "",
        station_id=station_settings.station_id,
    )
    port = _free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "serve", "--port", str(port), "--workers", "2"],
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        with Ledger.from_settings(station_settings) as led:
            assert led.certificate(serial).state == "issued"
            assert led.get_device("dev-1").state == "issued"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
