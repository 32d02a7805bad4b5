"""`station line run` never fails silently: a port that cannot be opened is an error on
the console and the status board, and --no-live / --json-lines print each verdict."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from station.cli import line_cmds
from station.ledger import Ledger
from station.line.status import PORT_ERROR, LineStatus
from station.settings import Settings

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    line_cmds.register(app)
    return app


@pytest.fixture
def batch(station_env: Settings) -> str:
    with Ledger.from_settings(station_env) as ledger:
        ledger.create_batch(
            "L1", product="p", planned_count=4, key_mode="board-ecc", subject_template=TEMPLATE
        )
    return "L1"


def test_a_port_that_cannot_be_opened_is_an_error_not_an_empty_port(
    app: typer.Typer, batch: str, station_env: Settings
) -> None:
    result = CliRunner().invoke(
        app,
        ["line", "run", "--batch", batch, "--port", "/dev/ttyUSB-none", "--no-live",
         "--timeout", "2"],
    )  # fmt: skip
    assert "error [port-error] /dev/ttyUSB-none: cannot open the port" in result.stdout
    status = json.loads((station_env.data_dir / "line-status.json").read_text())
    (port,) = [p for p in status["ports"] if p["port"] == "/dev/ttyUSB-none"]
    assert port["step"] == PORT_ERROR and "cannot open" in port["last_error"]


def test_json_lines_prints_one_object_per_verdict(
    app: typer.Typer, batch: str, station_env: Settings
) -> None:
    result = CliRunner().invoke(
        app, ["line", "run", "--batch", batch, "--simulate", "1", "--json-lines", "--baud", "0"]
    )
    assert result.exit_code == 0, result.stdout
    verdicts = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(v["event"], v["result"]) for v in verdicts] == [("verdict", "verified")]
    assert verdicts[0]["serial"] and verdicts[0]["device_id"].startswith("SIM-")


def test_the_status_board_keeps_a_port_error() -> None:
    status = LineStatus("b")
    status.port_error("/dev/ttyUSB9", "cannot open the port: no such device")
    port = status.snapshot()["ports"][0]
    assert port["step"] == PORT_ERROR


def test_noise_on_a_port_is_counted_and_shown(station_settings: Settings, ca: object) -> None:
    """A port where something answers garbage is not shown as a quiet empty port."""
    import os
    import threading
    import tty

    from station.line import LineDriver, ProvisionContext
    from station.line.view import render

    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    stop = threading.Event()

    def babble() -> None:
        while not stop.is_set():
            os.write(master, b"\x00garbage\xff\x10\x00")
            stop.wait(0.05)

    ledger = Ledger.from_settings(station_settings)
    batch = ledger.create_batch(
        "N1", product="p", planned_count=1, key_mode="board-ecc", subject_template=TEMPLATE
    )
    status = LineStatus("N1")
    driver = LineDriver(ProvisionContext(ledger, ca, batch), lambda: [path], status=status)  # type: ignore[arg-type]
    thread = threading.Thread(target=babble, daemon=True)
    thread.start()
    try:
        driver.run(until=lambda d: status.ports.get(path) is not None
                   and status.ports[path].bad_frames > 0, timeout=15)  # fmt: skip
    finally:
        stop.set()
        thread.join()
        os.close(master)
        os.close(slave)
    (row,) = status.snapshot()["ports"]
    assert row["bad_frames"] > 0
    out = io.StringIO()
    Console(file=out, width=200).print(render(status))
    assert "bad," in out.getvalue()


STATION = [str(Path(sys.executable).parent / "station")]


def _station(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed `station` command, in its own process (stdout a pipe, not a terminal)."""
    return subprocess.run(
        [*STATION, *args],
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.parametrize("processes", ["1", "2"])
def test_no_live_prints_one_line_per_verdict_whatever_the_processes(
    batch: str, station_env: Settings, processes: str
) -> None:
    done = _station(
        "line", "run", "--batch", batch, "--simulate", "2", "--baud", "0", "--no-live",
        "--processes", processes,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    verdicts = [line for line in done.stdout.splitlines() if " verified serial " in line]
    assert len(verdicts) == 2, done.stdout
    assert all(line.startswith("/dev/pts/") and " SIM-" in line for line in verdicts)


@pytest.mark.parametrize("processes", ["1", "2"])
def test_json_lines_emits_json_whatever_the_processes(
    batch: str, station_env: Settings, processes: str
) -> None:
    done = _station(
        "line", "run", "--batch", batch, "--simulate", "2", "--baud", "0", "--json-lines",
        "--processes", processes,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    verdicts = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted((v["event"], v["result"]) for v in verdicts) == [("verdict", "verified")] * 2
    assert len({v["device_id"] for v in verdicts}) == 2 and all(v["serial"] for v in verdicts)


def test_a_port_error_is_printed_with_several_processes(batch: str, station_env: Settings) -> None:
    done = _station(
        "line", "run", "--batch", batch, "--port", "/dev/ttyUSB-none", "--json-lines",
        "--processes", "2", "--timeout", "10",  # the workers' start-up counts (a loaded machine)
    )  # fmt: skip
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(e["event"], e["port"]) for e in events] == [("port-error", "/dev/ttyUSB-none")]
    assert "cannot open the port" in events[0]["message"]
    status = json.loads((station_env.data_dir / "line-status.json").read_text())
    (port,) = [p for p in status["ports"] if p["port"] == "/dev/ttyUSB-none"]
    assert port["step"] == PORT_ERROR
