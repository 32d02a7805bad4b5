"""In pipes and logs nothing is cut: tables, help and list commands print whole ids and serials.

Each command runs as the real `station` executable with stdout a pipe (not a
terminal), as it does under systemd, in CI or piped into grep.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from station.settings import Settings
from tests.test_ledger import TEMPLATE

STATION = str(Path(sys.executable).parent / "station")
LONG = "B-" + "long-batch-name-" * 4 + "end"


def station(*args: str, code: int = 0) -> str:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([STATION, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == code, (args, done.stdout, done.stderr)
    return done.stdout + done.stderr


def create(name: str = LONG, count: str = "4") -> None:
    station("batch", "create", name, "--product", "artik530-with-a-long-product-name",
            "--count", count, "--key-mode", "board-ecc",
            "--subject-template", TEMPLATE)  # fmt: skip


def test_line_run_table_in_a_pipe_keeps_every_id_and_serial(station_env: Settings) -> None:
    create()
    out = station("line", "run", "--batch", LONG, "--simulate", "2", "--no-live", "--baud", "0")
    assert "…" not in out
    devices = json.loads(station("device", "list", "--batch", LONG, "--format", "json"))
    assert len(devices) == 2
    for d in devices:
        assert d["device_id"] in out and d["serial"] in out, (d, out)
    assert LONG in out


def test_list_commands_speak_tsv_and_json_with_whole_values(station_env: Settings) -> None:
    create()
    table = station("batch", "list")
    assert LONG in table and "…" not in table
    [row] = json.loads(station("batch", "list", "--format", "json"))
    assert row["name"] == LONG and row["planned_count"] == 4 and row["device_count"] == 0
    assert row["created_at"].endswith("Z")
    tsv = list(csv.DictReader(io.StringIO(station("batch", "list", "--format", "tsv")),
                              delimiter="\t"))  # fmt: skip
    assert tsv[0]["name"] == LONG and tsv[0]["planned_count"] == "4"
    assert json.loads(station("device", "list", "--format", "json")) == []
    assert station("device", "list", "--format", "tsv").splitlines() == [
        "device_id\tbatch\tstate\tattempts\tserial\tfailure_code"
    ]
    station("device", "list", "--format", "yaml", code=2)


def test_help_in_a_pipe_is_never_cut(station_env: Settings) -> None:
    commands = (["--help"], ["line", "run"], ["serve"], ["device", "list"], ["report"])
    for args in commands:
        out = station(*args, "--help") if args != ["--help"] else station("--help")
        plain = out.replace("[ARGS]...", "").replace("[OPTIONS]...", "")
        assert "…" not in out and "..." not in plain, out
    serve_help = station("serve", "--help")
    assert "cores + 1" in " ".join(serve_help.split())
    assert "Hot-plug" in station("line", "run", "--help") or "rescanned every second" in " ".join(
        station("line", "run", "--help").split()
    )
