"""API tokens you can manage (issue 15, item 3): list, revoke, expire, last use;
from the CLI (real `station token ...` subprocesses) and under /v1/tokens (real server)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from station.ledger import Ledger
from station.settings import Settings
from tests.live import live_api
from tests.test_api_helpers import Api, assert_problem

__all__ = ["live_api"]

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = (
    "import typer\n"
    "from station.cli.serve_cmds import register\n"
    "app = typer.Typer()\n"
    "register(app)\n"
    "app()\n"
)


def station(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", LAUNCH, *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_lists_revokes_and_expires_tokens(station_env: Settings) -> None:
    made = station("token", "create", "--role", "board", "--name", "line-1", "--expires-in", "30d")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert station("token", "create", "--role", "qa", "--name", "qa-1").returncode == 0
    bad = station("token", "create", "--role", "qa", "--name", "x", "--expires-in", "soon")
    assert bad.returncode == 1 and "error [bad-duration]" in bad.stderr, bad.stderr

    with Ledger.from_settings(station_env) as ledger:
        assert ledger.lookup_token(token) == ("line-1", "board")
    listed = station("token", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["name", "role", "created", "last-used", "expires", "revoked"]
    row = next(line.split() for line in lines if line.startswith("line-1"))
    assert row[1] == "board" and row[3] != "-" and row[4] != "-" and row[5] == "-", row
    qa = next(line.split() for line in lines if line.startswith("qa-1"))
    assert qa[3] == "-" and qa[4] == "-", qa  # never used, never expires
    assert token not in listed.stdout

    revoked = station("token", "revoke", "line-1")
    assert revoked.returncode == 0, revoked.stderr
    with Ledger.from_settings(station_env) as ledger:
        assert ledger.lookup_token(token) is None
    again = station("token", "revoke", "line-1")
    assert again.returncode == 1 and "error [unknown-token]" in again.stderr
    for cmd in (("token", "list", "--help"), ("token", "revoke", "--help")):
        assert station(*cmd).returncode == 0


def test_an_expired_token_is_refused(station_settings: Settings) -> None:
    with Ledger.from_settings(station_settings) as ledger:
        token = ledger.create_token("brief", "qa", expires_in=timedelta(seconds=1))
        assert ledger.lookup_token(token) == ("brief", "qa")
        time.sleep(1.2)  # the expiry itself is what is tested
        assert ledger.lookup_token(token) is None
        with pytest.raises(Exception) as info:
            ledger.create_token("never", "qa", expires_in=timedelta(seconds=0))
        assert getattr(info.value, "code", None) == "bad-duration"


def test_admins_manage_tokens_over_http(live_api: Api) -> None:
    api = live_api
    r = api.post("/v1/tokens", json={"name": "line-2", "role": "board", "expires_in": "12h"})
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["expires_at"] is not None
    assert_problem(
        api.post("/v1/tokens", json={"name": "x", "role": "qa", "expires_in": "forever"}),
        422,
        "bad-duration",
    )
    assert api.get("/v1/ca", "board").status_code == 200  # the board token is used

    listed = api.get("/v1/tokens").json()
    by_name = {t["name"]: t for t in listed}
    assert set(by_name) >= {"test-board", "test-admin", "line-2"}
    assert by_name["test-board"]["last_used_at"] is not None
    assert by_name["line-2"]["last_used_at"] is None and by_name["line-2"]["expires_at"]
    assert all("token" not in t and "token_sha256" not in t for t in listed)
    assert made["token"] not in api.get("/v1/tokens").text

    # Revoked: refused at once in this worker (not only after the cache's 5 s).
    assert api.get("/v1/ca", "board").status_code == 200
    r = api.call("DELETE", "/v1/tokens/test-board")
    assert r.status_code == 200 and r.json()["revoked_at"] is not None, r.text
    assert_problem(api.get("/v1/ca", "board"), 401, "unauthorized")
    assert_problem(api.call("DELETE", "/v1/tokens/test-board"), 404, "unknown-token")
    for role in ("operator", "qa"):
        assert api.get("/v1/tokens", role).status_code == 403
