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

from pathlib import Path

from station.ledger import Ledger
from tests.crash_rig import TEMPLATE, Station, crash_rig, station_env
from tests.fixtures.hsm import settings_for

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
