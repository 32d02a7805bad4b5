"""The data directory and the ledger's files are the station's alone (issue 15, item 9):
CSRs, certificates, the audit chain and token hashes are in them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from station.ledger import Ledger
from tests.fixtures.hsm import settings_for


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ledger_files(data: Path) -> list[Path]:
    return [p for p in data.iterdir() if p.name.startswith("ledger.sqlite")]


def test_a_new_data_directory_is_0700_and_the_ledger_files_0600(
    ca_home: Path, tmp_path: Path
) -> None:
    data = tmp_path / "fresh" / "data"
    settings = settings_for(ca_home, data)
    data.chmod(0o755)  # as settings_for (mkdir under the usual umask) leaves it
    old = os.umask(0o022)
    try:
        with Ledger.from_settings(settings) as ledger:
            ledger.create_token("t", "qa")  # a write: the log (-wal) and -shm exist now
            files = ledger_files(data)
            names = {p.name for p in files}
            assert {"ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"} <= names, names
            assert mode(data) == 0o700
            for path in files:
                assert mode(path) == 0o600, (path.name, oct(mode(path)))
    finally:
        os.umask(old)


def test_an_existing_world_readable_ledger_is_tightened_when_opened(
    ca_home: Path, tmp_path: Path
) -> None:
    data = tmp_path / "old"
    settings = settings_for(ca_home, data)
    with Ledger.from_settings(settings) as ledger:
        ledger.create_token("t", "qa")
    data.chmod(0o755)
    for path in ledger_files(data):
        path.chmod(0o644)
    with Ledger.from_settings(settings) as ledger:
        ledger.create_token("u", "qa")
        assert mode(data) == 0o700
        for path in ledger_files(data):
            assert mode(path) == 0o600, (path.name, oct(mode(path)))
