"""`station serve` SIGKILLed at random under HTTP load, restarted, and checked.

Six clients post certificate requests (one board, one key each) to a real
`station serve --workers 2`; the whole server (its process group: the
supervisor and both workers) is killed with SIGKILL at a random instant of the
load, several times, and started again each time. A request whose connection
died has an unknown outcome: its board asks again with the same CSR after the
last start, as a board would. Then: every certificate a client received is in
the ledger byte for byte and live; no intent is left; no board has two live
certificates; the boards that asked again got a certificate; the audit chain
verifies.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import func, select

from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.ledger.schema import certificates
from station.settings import Settings
from tests.crash_rig import LAUNCH, station_env
from tests.test_api_helpers import TEMPLATE, new_csr
from tests.test_crash import _free_port

KILLS = 5
CLIENTS = 6


class Server:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port = _free_port()  # a killed worker's socket may linger a moment
        self.url = f"http://127.0.0.1:{self.port}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCH, "serve", "--port", str(self.port), "--workers", "2"],
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own process group: the kill takes the workers too
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()[-4000:]
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)  # the supervisor and both workers
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def test_serve_killed_under_load_loses_nothing(
    station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    with Ledger.from_settings(station_settings) as led:
        led.create_batch(
            "B", product="p", planned_count=100_000, key_mode="board-ecc", subject_template=TEMPLATE
        )
        token = led.create_token("line", "board")
    env = station_env(
        data_dir=station_settings.data_dir,
        ca_key_uri=station_settings.ca_key_uri or "",
        station_id=station_settings.station_id,
    )
    server = Server(env, tmp_path / "serve.log")
    headers = {"Authorization": f"Bearer {token}"}
    numbers = itertools.count()
    lock = threading.Lock()
    received: dict[str, str] = {}  # device -> chain PEM the client got
    unknown: dict[str, str] = {}  # device -> CSR whose answer was lost with the server
    refused: list[str] = []

    def client(stop: threading.Event) -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            while not stop.is_set():
                device = f"h-{next(numbers):05d}"
                csr, _key = new_csr(device)
                body = {"batch": "B", "device_id": device, "csr": csr}
                try:
                    r = http.post("/v1/certificates", json=body)
                except httpx.HTTPError:  # the server died under this request
                    with lock:
                        unknown[device] = csr
                    return
                with lock:
                    if r.status_code in (200, 201):
                        received[device] = r.json()["chain"]
                    else:  # 503 while a worker starts or dies: nothing was issued
                        refused.append(f"{r.status_code} {r.text[:200]}")
                        unknown[device] = csr

    rng = random.Random(7)
    try:
        for _ in range(KILLS):
            server.start()
            stop = threading.Event()
            threads = [threading.Thread(target=client, args=(stop,)) for _ in range(CLIENTS)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.3, 1.5))
            server.kill()
            stop.set()
            for t in threads:
                t.join(timeout=30)
        server.start()  # recovery resolves the dead servers' intents before /healthz answers
        # Boards whose answer was lost ask again with the same CSR.
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            for device, csr in unknown.items():
                r = http.post(
                    "/v1/certificates", json={"batch": "B", "device_id": device, "csr": csr}
                )
                assert r.status_code in (200, 201), (device, r.status_code, r.text)
                received[device] = r.json()["chain"]
    finally:
        server.stop()

    assert len(received) > 50, "the load never got going"
    assert unknown, "no kill landed on a request in flight"
    assert all(r.startswith("503") for r in refused), refused[:5]
    with Ledger.from_settings(station_settings) as led:
        for device, chain in received.items():
            leaf = x509.load_pem_x509_certificate(chain.encode())
            record = led.certificate(leaf.serial_number)
            assert record.device_id == device and record.state == "issued"
            assert record.pem is not None
            assert record.pem.strip() == leaf.public_bytes(Encoding.PEM).decode().strip()
        with led.engine.connect() as conn:
            states: dict[str, int] = dict(
                conn.execute(
                    select(certificates.c.state, func.count()).group_by(certificates.c.state)
                ).all()
            )
            live_per_device = conn.execute(
                select(func.count())
                .select_from(certificates)
                .where(certificates.c.state == "issued")
                .group_by(certificates.c.device_pk)
                .having(func.count() > 1)
            ).all()
        assert "intent" not in states, states
        assert live_per_device == []
        assert states["issued"] == len(received)
        assert led.audit_verify() is None
