"""`station serve` in a subprocess, HTTPS or HTTP, for tests with real clients (no tests here)."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from station.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
MAIN = "from station.cli import main\nmain()\n"


def station_cli(*args: str) -> list[str]:
    return [sys.executable, "-c", MAIN, *args]


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "STATION_DATA_DIR": str(settings.data_dir),
        "STATION_CA_KEY_URI": settings.ca_key_uri or "",
        "STATION_STATION_ID": settings.station_id,
    }
    env.update(extra)
    return env


def run_cli(settings: Settings, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        station_cli(*args),
        env=env_for(settings, **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str  # https://localhost:PORT (or http://127.0.0.1:PORT)
    port: int
    ca_file: Path | None  # what clients trust for the server (tls/ca.pem)
    log: list[str]


@contextmanager
def serve(
    settings: Settings,
    *,
    tls: bool = True,
    workers: int = 1,
    client_cert: tuple[Path, Path] | None = None,
    **extra: str,
) -> Iterator[Served]:
    """`station serve` on 127.0.0.1; with ``tls`` a development pair from `station tls init`.

    ``client_cert`` (certificate, key) is what the readiness probe presents, for a
    server that requires one.
    """
    ca_file = None
    if tls:
        made = run_cli(settings, "tls", "init", "--host", "localhost", "--host", "127.0.0.1")
        assert made.returncode == 0, made.stderr
        extra = {
            "STATION_TLS_CERT": str(settings.tls_dir / "server.pem"),
            "STATION_TLS_KEY": str(settings.tls_dir / "server.key"),
            **extra,
        }
        ca_file = settings.tls_dir / "ca.pem"
    port = free_port()
    proc = subprocess.Popen(
        station_cli("serve", "--port", str(port), "--workers", str(workers)),
        env=env_for(settings, **extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"https://localhost:{port}" if tls else f"http://127.0.0.1:{port}"
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else False
    )
    if client_cert is not None and isinstance(verify, ssl.SSLContext):
        verify.load_cert_chain(*client_cert)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(url + "/healthz", timeout=2, verify=verify).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "station serve did not come up"
            time.sleep(0.2)
        served = Served(url, port, ca_file, [])
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            served_log = proc.stderr.read()
            proc.stderr.close()
            if "served" in locals():
                served.log.append(served_log)
