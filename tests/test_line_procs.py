"""The line on several processes (``ProcessLine``, ``station line run --processes``).

Real worker processes (each its own SoftHSM session and SQLite engine on one
ledger file), real ptys with the real Agent.handle behind them (SimulatedLine,
in-process board keys), unthrottled: what is checked is that ports are shared
out, hot-plugged, handed over when a worker dies, and that every board and every
status report reaches the parent once.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from firmware_hooks.simboard import SimulatedLine
from station.cli import line_cmds
from station.ledger import Ledger
from station.line import LineStatus
from station.line.driver import open_port_client
from station.line.procs import ForwardingStatus, LineError, ProcessLine
from station.line.simkeys import CryptographyKeys
from station.line.status import PORT_ERROR
from station.settings import Settings

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
FAST_CLIENT = functools.partial(open_port_client, baudrate=1_000_000)


def _batch(settings: Settings, name: str, planned: int) -> Ledger:
    ledger = Ledger.from_settings(settings)
    ledger.create_batch(
        name, product="p", planned_count=planned, key_mode="board-ecc", subject_template=TEMPLATE
    )
    return ledger


def test_two_processes_share_the_ports_hot_plugged_ones_too_every_board_verified_once(
    station_settings: Settings, tmp_path: Path
) -> None:
    ports, per_port = 6, 3
    total = ports * per_port
    ledger = _batch(station_settings, "procs", total)
    status = LineStatus("procs", tmp_path / "line-status.json")
    with SimulatedLine(
        ports, per_port, id_prefix="MP", baudrate=None, keys=CryptographyKeys()
    ) as line:
        plugged_in = line.ports[:4]  # two adapters are plugged in once the line runs
        driver = ProcessLine(
            station_settings,
            "procs",
            lambda: plugged_in,
            processes=2,
            status=status,
            client_factory=FAST_CLIENT,
            rescan_interval=0.2,
        )
        shares: dict[int, list[str]] = {}

        def until(d: ProcessLine) -> bool:
            if len(plugged_in) < ports and len(d.records) >= 4:
                plugged_in.extend(line.ports[4:])
            shares.update(d.shares())
            return len(d.records) >= total

        records = driver.run(until=until, timeout=120)
        waiting = line.waiting()

    assert not driver.shares()  # the workers are gone
    assert len(driver.worker_stats) == 2
    # Each worker served ports, no port was served by both, and every port was served.
    assert len(shares) == 2 and all(shares.values())
    served = [p for share in shares.values() for p in share]
    assert sorted(served) == sorted(line.ports)

    outcomes = driver.finished_devices()
    assert len(records) == len(outcomes) == total  # each board handled once
    assert {o.result for o in outcomes.values()} == {"verified"}, outcomes
    assert set(waiting.values()) == {0}
    serials = {ledger.get_device(d).serial for d in outcomes}
    assert {e.serial for e in ledger.whitelist("procs")} == serials
    assert {o.serial for o in outcomes.values()} == serials and len(serials) == total

    # Every step and verdict of the workers reached the parent's status and its file.
    snapshot = json.loads((tmp_path / "line-status.json").read_text())
    assert snapshot["counts"]["verified"] == total
    assert snapshot["counts"]["in_progress"] == 0
    assert sorted(p["port"] for p in snapshot["ports"]) == sorted(line.ports)
    kinds = [e.kind for e in status.events]
    assert kinds.count("verified") == total and kinds.count("issue") == total
    assert kinds.count("port-added") == ports


def test_a_worker_that_dies_hands_its_ports_to_the_others(
    station_settings: Settings,
) -> None:
    ports, per_port = 4, 6
    ledger = _batch(station_settings, "orphans", ports * per_port)
    with SimulatedLine(
        ports, per_port, id_prefix="KILL", baudrate=None, keys=CryptographyKeys()
    ) as line:
        driver = ProcessLine(
            station_settings,
            "orphans",
            lambda: line.ports,
            processes=2,
            client_factory=FAST_CLIENT,
            rescan_interval=0.2,
        )
        killed: list[tuple[int, list[str]]] = []

        def until(d: ProcessLine) -> bool:
            if not killed and len(d.records) >= 4:
                pid, share = next(iter(d.shares().items()))
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, share))
            # Done once every port went through its queue and the last board has a verdict.
            return bool(killed) and set(line.waiting().values()) == {0} and _settled(d, line)

        driver.run(until=until, timeout=120)

    (pid, orphaned), survivors = killed[0], driver.worker_stats
    assert [s.pid for s in survivors] != [pid] and len(survivors) == 1
    # The dead worker's ports were served afterwards: their later boards are verified.
    for port in orphaned:
        last = line.plugged()[port][-1]
        assert driver.finished_devices()[last].result == "verified"
        assert ledger.get_device(last).state == "verified"
    # At most the board each of its ports had in flight is left without a verdict.
    assert len(driver.finished_devices()) >= ports * per_port - len(orphaned)


def _settled(driver: ProcessLine, line: SimulatedLine) -> bool:
    finished = driver.finished_devices()
    return all(ids[-1] in finished for ids in line.plugged().values())


def test_a_worker_that_cannot_start_is_one_clear_error(station_settings: Settings) -> None:
    driver = ProcessLine(
        station_settings, "no-such-batch", lambda: [], processes=2, client_factory=FAST_CLIENT
    )
    started = time.monotonic()
    with pytest.raises(LineError, match=r"could not start.*no-such-batch") as raised:
        driver.run(timeout=60)
    assert raised.value.code == "line-worker"
    assert time.monotonic() - started < 60
    assert not driver.shares()


def test_cli_line_run_processes_provisions_simulated_boards(station_env: Settings) -> None:
    _batch(station_env, "cli-procs", 3)
    app = typer.Typer(pretty_exceptions_enable=False)
    line_cmds.register(app)
    result = CliRunner().invoke(
        app,
        ["line", "run", "--batch", "cli-procs", "--simulate", "3", "--processes", "2",
         "--baud", "0", "--no-live"],
    )  # fmt: skip
    assert result.exit_code == 0, (result.stdout, result.exception)
    assert "verified 3" in result.stdout
    status = json.loads((station_env.data_dir / "line-status.json").read_text())
    assert status["counts"]["verified"] == 3


def test_a_worker_forwards_port_errors_and_noise_changes_to_the_status_board() -> None:
    sent: list[tuple[str, object]] = []
    worker = ForwardingStatus("b", sent.append)
    worker.noise("/dev/ttyUSB0", 0, 0)
    worker.noise("/dev/ttyUSB0", 0, 0)  # every idle poll reports it: sent once
    worker.noise("/dev/ttyUSB0", 3, 2, 5)
    worker.port_error("/dev/ttyUSB9", "cannot open the port: no such device")  # sent at once
    parent = LineStatus("b")
    reports = [value for kind, batch in sent if kind == "batch" for _, value in batch]  # type: ignore[attr-defined]
    for method, args in reports:
        getattr(parent, method)(*args)
    assert [method for method, _ in reports] == ["noise", "noise", "port_error"]
    ports = {p["port"]: p for p in parent.snapshot()["ports"]}
    noise = ports["/dev/ttyUSB0"]
    assert (noise["bad_frames"], noise["resends"], noise["corrected"]) == (3, 2, 5)
    assert ports["/dev/ttyUSB9"]["step"] == PORT_ERROR
