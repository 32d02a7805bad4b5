"""`station serve --workers 2` in a subprocess, and `station token create`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from station.settings import Settings
from tests.test_api_helpers import TEMPLATE, new_csr

ROOT = Path(__file__).resolve().parent.parent
# The `station` commands of this module, whether or not register.py lists it yet.
LAUNCH = (
    "import typer\n"
    "from station.cli.serve_cmds import register\n"
    "app = typer.Typer()\n"
    "register(app)\n"
    "app()\n"
)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", LAUNCH, *args]


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_token_create_and_serve_with_two_workers(station_env: Settings) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    made = subprocess.run(
        cli("token", "create", "--role", "board", "--name", "line-1"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert len(token) >= 40
    bad = subprocess.run(
        cli("token", "create", "--role", "root", "--name", "x"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "bad-role" in bad.stderr
    op = subprocess.run(
        cli("token", "create", "--role", "operator", "--name", "op"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()

    port = _port()
    proc = subprocess.Popen(
        cli("serve", "--port", str(port), "--workers", "2"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "station serve did not come up"
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=10) as http:
            r = http.post(
                "/v1/batches",
                headers={"Authorization": f"Bearer {op}"},
                json={
                    "name": "W",
                    "product": "p",
                    "planned_count": 30,
                    "subject_template": TEMPLATE,
                },
            )
            assert r.status_code == 201, r.text
            board = {"Authorization": f"Bearer {token}"}
            for i in range(20):
                pem, _ = new_csr(f"w-{i}")
                r = http.post(
                    "/v1/certificates",
                    headers=board,
                    json={"batch": "W", "device_id": f"w-{i}", "csr": pem},
                )
                assert r.status_code == 201, r.text
        # TCP_NODELAY on keep-alive connections (uvicorn#3149) is checked without a
        # clock in test_api_hotpath.py.
    finally:
        proc.terminate()
        proc.wait(20)
    # No access log by default: a line per certificate costs the worker CPU.
    log = proc.stderr.read().decode() if proc.stderr else ""
    assert "Application startup complete" in log
    assert "POST /v1/certificates" not in log
