"""The line under load (CI size of bench/line_load.py): 64 simulated ports, two boards each.

SimulatedLine serves every pty from one thread with the real Agent.handle and
in-process board keys; the station side is the real line driver, SoftHSM CA
and SQLite ledger. The line is unthrottled: what is checked is that nothing
gets lost or stuck with 64 ports at once, not how fast it goes.
"""

from __future__ import annotations

from firmware_hooks.simboard import SimulatedLine
from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.line import LineDriver, LineStatus, ProvisionContext
from station.line.driver import open_port_client
from station.line.simkeys import CryptographyKeys
from station.settings import Settings

PORTS = 64
PER_PORT = 2
TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


def test_64_ports_128_boards_all_verified_no_port_stuck(
    station_settings: Settings, ca: CertificateAuthority
) -> None:
    ledger = Ledger.from_settings(station_settings)
    total = PORTS * PER_PORT
    batch = ledger.create_batch(
        "load", product="p", planned_count=total, key_mode="board-ecc", subject_template=TEMPLATE
    )
    status = LineStatus(batch.name)
    with SimulatedLine(
        PORTS, PER_PORT, id_prefix="LOAD", baudrate=None, keys=CryptographyKeys()
    ) as line:
        driver = LineDriver(
            ProvisionContext(ledger, ca, batch),
            lambda: line.ports,
            status=status,
            client_factory=lambda path: open_port_client(path, baudrate=1_000_000),
        )
        records = driver.run(until=lambda d: len(d.records) >= total, timeout=240)
        plugged, waiting = line.plugged(), line.waiting()

    outcomes = driver.finished_devices()
    failures = {d: (o.code, o.message) for d, o in outcomes.items() if o.result != "verified"}
    assert not failures
    assert len(outcomes) == len(records) == total  # each board handled once
    # No stuck port: every port got through its whole queue, each board to verified.
    assert set(waiting.values()) == {0}
    assert all(len(ids) == PER_PORT for ids in plugged.values())
    by_port: dict[str, set[str]] = {}
    for r in records:
        by_port.setdefault(r.port, set()).add(r.outcome.device_id)
    assert by_port == {port: set(ids) for port, ids in plugged.items()}

    verified = {ledger.get_device(d).serial for d in outcomes}
    assert len(verified) == total
    assert {e.serial for e in ledger.whitelist("load")} == verified
    assert {o.serial for o in outcomes.values()} == verified
    ledger.close()
