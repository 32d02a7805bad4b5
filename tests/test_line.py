"""The line driver end to end: real agents on ptys, the SoftHSM CA, a SQLite ledger."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

from firmware_hooks.simboard import SimulatedBoard, simulate_boards
from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.line import LineDriver, LineStatus, ProvisionContext
from station.line.broker import MosquittoBroker
from station.line.driver import open_port_client
from station.settings import Settings

# Until tests/conftest.py lists tests.fixtures.mqtt in pytest_plugins:
from tests.fixtures.mqtt import mosquitto_broker  # noqa: F401

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


def _run(ctx: ProvisionContext, ports: list[str], status: LineStatus | None = None) -> LineDriver:
    driver = LineDriver(
        ctx,
        lambda: ports,
        status=status,
        client_factory=lambda path: open_port_client(path, baudrate=1_000_000),
    )
    driver.run(until=lambda d: len(d.finished_devices()) >= len(ports), timeout=120)
    return driver


def test_sixteen_boards_both_key_modes_all_verified(
    station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    ledger = Ledger.from_settings(station_settings)
    drivers: dict[str, LineDriver] = {}

    def line(mode: str, prefix: str) -> None:
        batch = ledger.create_batch(
            f"b-{mode}", product="p", planned_count=8, key_mode=mode, subject_template=TEMPLATE
        )
        ctx = ProvisionContext(ledger, ca, batch)
        status_path = tmp_path / f"{mode}-line-status.json"
        with simulate_boards(8, id_prefix=prefix, baudrate=None) as boards:
            drivers[mode] = _run(ctx, [b.port for b in boards], LineStatus(batch.name, status_path))

    threads = [
        threading.Thread(target=line, args=("board-ecc", "ECC")),
        threading.Thread(target=line, args=("see-rsa", "RSA")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    for mode, driver in drivers.items():
        outcomes = driver.finished_devices()
        assert len(outcomes) == 8
        assert {o.result for o in outcomes.values()} == {"verified"}, outcomes
        verified = {ledger.get_device(d).serial for d in outcomes}
        assert all(ledger.get_device(d).state == "verified" for d in outcomes)
        whitelist = {e.serial for e in ledger.whitelist(f"b-{mode}")}
        assert whitelist == verified
        status = json.loads((tmp_path / f"{mode}-line-status.json").read_text())
        assert status["batch"] == f"b-{mode}"
        assert status["counts"]["verified"] == 8
        assert len(status["ports"]) == 8


def test_ecc_board_chain_connects_to_mosquitto_and_a_foreign_chain_is_refused(
    station_settings: Settings,
    ca: CertificateAuthority,
    tmp_path: Path,
    mosquitto_broker: MosquittoBroker,  # noqa: F811
) -> None:
    ledger = Ledger.from_settings(station_settings)
    batch = ledger.create_batch(
        "mtls", product="p", planned_count=1, key_mode="board-ecc", subject_template=TEMPLATE
    )
    with SimulatedBoard(hardware_id="MTLS-1", baudrate=None, key_dir=tmp_path / "keys") as board:
        driver = _run(ProvisionContext(ledger, ca, batch), [board.port])
    assert driver.finished_devices()["MTLS-1"].result == "verified"
    chain, key = tmp_path / "keys" / "deviceCertAndCACert.crt", tmp_path / "keys" / "deviceCert.key"
    done = mosquitto_broker.publish(chain, key, client_id="MTLS-1")
    assert done.returncode == 0, done.stderr

    # The broker really checks: a self-signed chain for the same key is refused.
    subprocess.run(
        ["openssl", "req", "-new", "-x509", "-key", str(key), "-subj", "/CN=MTLS-1",
         "-days", "1", "-out", str(tmp_path / "foreign.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    refused = mosquitto_broker.publish(tmp_path / "foreign.pem", key, client_id="MTLS-1")
    assert refused.returncode != 0
