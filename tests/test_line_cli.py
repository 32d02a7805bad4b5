"""`station line run` never fails silently: a port that cannot be opened is an error on
the console and the status board, and --no-live / --json-lines print each verdict."""

from __future__ import annotations

import json

import pytest
import typer
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
