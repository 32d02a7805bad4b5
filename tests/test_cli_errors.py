"""Every mistake an operator can make in the environment is one line and a documented exit code.

A bad value for each ``STATION_*`` setting, an unreachable ledger, a port in
use: each is ``error [code] message`` on stderr, no traceback, and the exit
code the README's table gives (3 not configured, 4 unavailable, 5 in use).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from station.settings import Settings

# One bad value per setting; the test below fails when a setting is added without one.
BAD_VALUES: dict[str, str] = {
    "data_dir": "/dev/null/station",
    "ca_key_uri": "https://example.com/key",
    "database_url": "not a url",
    "station_id": "line\x01one",
    "pkcs11_module": "relative/libsofthsm2.so",
    "dev_token_label": "x" * 33,
    "device_days": "abc",
    "backdate_seconds": "-1",
    "whitelist_table": "no spaces allowed",
    "max_body_bytes": "0",
    "auth_failures_per_minute": "0",
    "aws_sync_interval": "0",
    "aws_policy_name": "no spaces allowed",
    "aws_topic_prefix": "things/#",
    "tls_cert": "/nonexistent/server.pem",
    "tls_key": "/nonexistent/server.key",
    "tls_client_certs": "sometimes",
    "cmp_secrets": "/nonexistent/cmp-secrets",
    "est_default_batch": "../etc",
    "est_serverkeygen_batches": "S,../etc",
}

STATION = [str(Path(sys.executable).parent / "station")]


def run_station(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STATION_")}
    base |= {"STATION_DATA_DIR": str(tmp_path / "var"), "COLUMNS": "80"}
    return subprocess.run(
        [*STATION, *args], env=base | env, capture_output=True, text=True, timeout=60
    )


def test_every_setting_has_a_bad_value_in_this_test() -> None:
    assert set(BAD_VALUES) == set(Settings.model_fields)


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_a_bad_setting_is_one_line_and_exit_3(tmp_path: Path, field: str) -> None:
    var = f"STATION_{field.upper()}"
    done = run_station(tmp_path, "batch", "list", **{var: BAD_VALUES[field]})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 3, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error [bad-setting] {var}"), lines
    assert "Traceback" not in done.stderr and "\x01" not in done.stderr


def test_two_bad_settings_are_both_named(tmp_path: Path) -> None:
    done = run_station(
        tmp_path, "batch", "list", STATION_DEVICE_DAYS="abc", STATION_BACKDATE_SECONDS="-5"
    )
    assert done.returncode == 3
    line = done.stderr.strip()
    assert "\n" not in line and "STATION_DEVICE_DAYS" in line and "STATION_BACKDATE_SECONDS" in line


def test_an_unreachable_database_is_one_line_and_exit_4(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://station:secret@127.0.0.1:{port}/ledger"
    done = run_station(tmp_path, "batch", "list", STATION_DATABASE_URL=url)
    assert done.returncode == 4, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [ledger-unreachable]"), done.stderr
    assert "secret" not in done.stderr  # the URL's password is never printed


def test_an_unopenable_sqlite_ledger_is_one_line_and_exit_4(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "ledger.sqlite").mkdir()  # a directory where the file should be
    url = f"sqlite:///{tmp_path / 'ro' / 'ledger.sqlite'}"
    done = run_station(tmp_path, "batch", "list", STATION_DATABASE_URL=url)
    assert done.returncode == 4, done.stderr
    assert done.stderr.startswith("error [ledger-unreachable]") and "Traceback" not in done.stderr


def test_serve_on_a_port_in_use_is_one_line_and_exit_5(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for workers in ("1", "2"):
            done = run_station(tmp_path, "serve", "--port", str(port), "--workers", workers)
            assert done.returncode == 5, (workers, done.stderr)
            lines = done.stderr.strip().splitlines()
            assert lines == [lines[0]] and lines[0].startswith("error [address-in-use]"), lines
            assert str(port) in lines[0]
