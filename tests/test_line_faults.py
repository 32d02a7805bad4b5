"""The line under faults: a noisy cable, a board that stores another chain, a cable
pulled mid-transfer, a verified board plugged in again. Real agents on ptys."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import serial

from firmware_hooks.host import BoardClient
from firmware_hooks.protocol import MsgType
from firmware_hooks.simboard import Faults, SimulatedBoard, simulate_boards
from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.line import LineDriver, ProvisionContext
from station.line.driver import CountingPort, open_port_client
from station.settings import Settings

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
FAST = 1_000_000
SHORT_TIMEOUTS = {t: 3.0 for t in MsgType if t < 0x80}


def _ctx(settings: Settings, ca: CertificateAuthority, mode: str, name: str) -> ProvisionContext:
    ledger = Ledger.from_settings(settings)
    batch = ledger.create_batch(
        name, product="p", planned_count=16, key_mode=mode, subject_template=TEMPLATE
    )
    return ProvisionContext(ledger, ca, batch)


def _fast_client(path: str) -> BoardClient:
    return open_port_client(path, baudrate=FAST, timeouts=SHORT_TIMEOUTS)


def _wait_for(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_noisy_cable_every_board_verified_or_failed_with_a_reason(
    station_settings: Settings, ca: CertificateAuthority
) -> None:
    for mode in ("board-ecc", "see-rsa"):
        ctx = _ctx(station_settings, ca, mode, f"noisy-{mode}")
        ledger = ctx.ledger
        with simulate_boards(
            6,
            id_prefix=f"N{mode[:3].upper()}",
            baudrate=None,
            faults=Faults(corrupt=0.005, drop=0.005, seed=7),
        ) as boards:
            ports = [b.port for b in boards]
            driver = LineDriver(ctx, lambda p=ports: p, client_factory=_fast_client)
            driver.run(until=lambda d: len(d.finished_devices()) >= 6, timeout=90)
            outcomes = driver.finished_devices()
            assert len(outcomes) == 6
            whitelisted = {e.serial for e in ledger.whitelist(ctx.batch.name)}
            for board in boards:
                outcome = outcomes[board.hardware_id]
                device = ledger.get_device(board.hardware_id)
                if outcome.result == "verified":
                    assert device.state == "verified"
                    assert device.serial in whitelisted
                    stored = (board.key_dir / "deviceCertAndCACert.crt").read_bytes()
                    assert hashlib.sha256(stored).hexdigest() == device.chain_sha256
                else:
                    assert outcome.result == "failed" and outcome.code
                    assert device.state == "failed"
                    assert device.failure_code == outcome.code
                    assert device.serial not in whitelisted
            assert len(whitelisted) == sum(o.result == "verified" for o in outcomes.values())


def test_version_3_repairs_a_lightly_noisy_cable_and_the_port_shows_it(
    station_settings: Settings, ca: CertificateAuthority
) -> None:
    """0.3% of bytes flipped, both ways, on boards that speak version 3: every board is
    verified, the damage is repaired by parity (counted on the port as noise), and the
    chain each board stores is the one the ledger recorded."""
    from station.line.status import LineStatus

    ctx = _ctx(station_settings, ca, "board-ecc", "parity")
    status = LineStatus("parity")
    with simulate_boards(
        3, id_prefix="PAR", baudrate=None, faults=Faults(corrupt=0.003, seed=11)
    ) as boards:
        ports = [b.port for b in boards]
        driver = LineDriver(ctx, lambda p=ports: p, client_factory=_fast_client, status=status)
        driver.run(until=lambda d: len(d.finished_devices()) >= 3, timeout=90)
        outcomes = driver.finished_devices()
        assert {o.result for o in outcomes.values()} == {"verified"}
        for board in boards:
            stored = (board.key_dir / "deviceCertAndCACert.crt").read_bytes()
            device = ctx.ledger.get_device(board.hardware_id)
            assert hashlib.sha256(stored).hexdigest() == device.chain_sha256
    ports_seen = status.snapshot()["ports"]
    assert sum(p["corrected"] for p in ports_seen) > 0


class WrongDigestClient(BoardClient):
    """A board that stores something other than the chain it was sent."""

    def put_chain(self, chain_pem: bytes) -> bytes:
        digest = super().put_chain(chain_pem)
        return bytes(b ^ 0xFF for b in digest)


def test_chain_that_does_not_match_is_never_left_installed(
    station_settings: Settings, ca: CertificateAuthority
) -> None:
    ctx = _ctx(station_settings, ca, "board-ecc", "mismatch")

    def factory(path: str) -> BoardClient:
        raw = serial.serial_for_url(path, baudrate=FAST, timeout=0.05)
        return WrongDigestClient(CountingPort(raw), baudrate=FAST)

    with SimulatedBoard(hardware_id="MISMATCH-1", baudrate=None) as board:
        driver = LineDriver(ctx, lambda: [board.port], client_factory=factory)
        driver.run(until=lambda d: bool(d.finished_devices()), timeout=60)
    outcome = driver.finished_devices()["MISMATCH-1"]
    assert (outcome.result, outcome.code) == ("failed", "chain-mismatch")
    device = ctx.ledger.get_device("MISMATCH-1")
    assert device.state == "failed" and device.failure_code == "chain-mismatch"
    assert device.installed_at is None and device.chain_sha256 is None
    assert list(ctx.ledger.whitelist(ctx.batch.name)) == []


def test_cable_pulled_mid_transfer_then_plugged_again_succeeds(
    station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    ctx = _ctx(station_settings, ca, "board-ecc", "pulled")
    home = {"key_dir": tmp_path / "keys", "see_store": tmp_path / "see"}
    ports: list[str] = []
    first = SimulatedBoard(
        hardware_id="PULLED-1", baudrate=None, faults=Faults(disconnect_after=1200), **home
    )
    ports.append(first.port)
    driver = LineDriver(ctx, lambda: list(ports), client_factory=_fast_client, rescan_interval=0.2)

    def verified(d: LineDriver) -> bool:
        outcome = d.finished_devices().get("PULLED-1")
        return outcome is not None and outcome.result == "verified"

    runner = threading.Thread(target=driver.run, kwargs={"until": verified, "timeout": 60})
    runner.start()
    second = None
    try:
        _wait_for(lambda: "PULLED-1" in driver.finished_devices(), 30)
        failed = driver.finished_devices()["PULLED-1"]
        assert (failed.result, failed.code) == ("failed", "disconnected")
        device = ctx.ledger.get_device("PULLED-1")
        assert device.state == "failed" and device.failure_code == "disconnected"
        assert first.disconnected

        ports.remove(first.port)  # unplugged ...
        first.close()
        second = SimulatedBoard(hardware_id="PULLED-1", baudrate=None, **home)
        ports.append(second.port)  # ... and plugged again, on another port
        runner.join(timeout=60)
    finally:
        driver.stop()
        runner.join()
        first.close()
        if second is not None:
            second.close()
    assert verified(driver)
    device = ctx.ledger.get_device("PULLED-1")
    assert device.state == "verified" and device.attempts == 1
    assert [e.serial for e in ctx.ledger.whitelist(ctx.batch.name)] == [device.serial]


def test_verified_board_plugged_again_keeps_its_one_identity(
    station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    ctx = _ctx(station_settings, ca, "see-rsa", "twice")
    home = {"key_dir": tmp_path / "keys", "see_store": tmp_path / "see"}
    results = []
    for _ in range(2):
        with SimulatedBoard(hardware_id="TWICE-1", baudrate=None, **home) as board:
            driver = LineDriver(ctx, lambda b=board: [b.port], client_factory=_fast_client)
            driver.run(until=lambda d: bool(d.finished_devices()), timeout=60)
            results.append(driver.finished_devices()["TWICE-1"])
    assert results[0].result == "verified"
    assert (results[1].result, results[1].code) == ("skipped", "already-verified")
    assert results[1].serial == results[0].serial
    device = ctx.ledger.get_device("TWICE-1")
    assert device.state == "verified" and device.serial == results[0].serial
    assert len(ctx.ledger.certificates("TWICE-1")) == 1
    assert [e.serial for e in ctx.ledger.whitelist("twice")] == [results[0].serial]
