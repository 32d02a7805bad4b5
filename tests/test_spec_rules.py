"""The spec states what the host enforces: every reason code the line records is in
its checklist, and its byte counts are measured here, not counted by hand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import firmware_hooks.protocol as protocol
from firmware_hooks.protocol import ErrorCode
from firmware_hooks.simboard import SimulatedBoard
from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.line import ProvisionContext
from station.line.driver import open_port_client
from station.line.provision import NOT_OURS, provision_board
from station.settings import Settings

ROOT = Path(__file__).parent.parent
SPEC = (ROOT / "docs" / "serial-protocol.md").read_text()
TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


def _checklist() -> set[str]:
    section = SPEC[SPEC.index("## 11. Checklist") :]
    return set(re.findall(r"^\| `([a-z0-9-]+)` \|", section, re.MULTILINE))


def _host_codes() -> set[str]:
    """Reason codes the line's own code can record for a board."""
    line = ROOT / "station" / "line"
    source = (line / "provision.py").read_text() + (line / "renew.py").read_text()
    codes = set(re.findall(r'code="([a-z0-9-]+)"', source))
    codes |= set(re.findall(r'"(?:failed|skipped)", "([a-z0-9-]+)"', source))
    codes |= set(re.findall(r'_record_failure\(ledger, device_id, "([a-z0-9-]+)"', source))
    codes |= set(re.findall(r'return "([a-z0-9-]+)"', source)) - {"internal"}
    codes |= {
        cls.code
        for cls in vars(protocol).values()
        if isinstance(cls, type) and issubclass(cls, protocol.ProtocolError)
    }
    codes |= {"serial-crc", protocol.BoardError(ErrorCode.WRONG_BOARD, "").code}
    codes.add("bad-device-id")  # policy.check_device_id, via refuse_hello
    # Another run's device (ledger conflicts): documented with the ledger.
    return codes - (NOT_OURS - {"duplicate-id", "already-verified"})


def test_every_reason_code_of_the_host_is_in_the_specs_checklist() -> None:
    codes = _host_codes()
    assert {"board-changed", "chain-mismatch", "unsupported-mode", "bad-proof"} <= codes
    assert {"renewal-unsupported", "renewal-chain-unknown", "renewal-not-committed"} <= codes
    missing = codes - _checklist()
    assert not missing, f"docs/serial-protocol.md section 11 lacks {sorted(missing)}"


def test_the_checklist_names_no_code_the_host_does_not_have() -> None:
    assert _checklist() <= _host_codes()


def _spec_bytes(version: int) -> tuple[int, int]:
    match = re.search(
        rf"version {version}: about ([\d,]+) bytes to the board and ([\d,]+) back", SPEC
    )
    assert match, f"section 10 states no byte counts for version {version}"
    return int(match[1].replace(",", "")), int(match[2].replace(",", ""))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_the_specs_byte_counts_are_measured(
    station_settings: Settings, ca: CertificateAuthority, version: int
) -> None:
    ledger = Ledger.from_settings(station_settings)
    batch = ledger.create_batch(
        f"bytes-v{version}",
        product="p",
        planned_count=1,
        key_mode="board-ecc",
        subject_template=TEMPLATE,
    )
    ctx = ProvisionContext(ledger, ca, batch)
    with SimulatedBoard(
        baudrate=None, hardware_id="ARTIK-0001", agent_args=["--max-protocol", str(version)]
    ) as board:
        client = open_port_client(board.port)
        try:
            outcome = provision_board(client, client.hello(), ctx)
            sent, received = client.port.tx, client.port.rx  # type: ignore[attr-defined]
        finally:
            client.close()
    assert outcome.result == "verified"
    to_board, back = _spec_bytes(version)
    assert sent == pytest.approx(to_board, rel=0.05)
    assert received == pytest.approx(back, rel=0.05)


def _renewal_spec_bytes(version: int) -> tuple[int, int]:
    match = re.search(
        rf"a renewal in version {version}: about ([\d,]+) bytes to the board and ([\d,]+) back",
        " ".join(SPEC.split()),  # the sentence may wrap anywhere
    )
    assert match, f"section 10 states no renewal byte counts for version {version}"
    return int(match[1].replace(",", "")), int(match[2].replace(",", ""))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_the_specs_renewal_byte_counts_are_measured(
    station_settings: Settings, ca: CertificateAuthority, version: int
) -> None:
    ledger = Ledger.from_settings(station_settings)
    batch = ledger.create_batch(
        f"renew-bytes-v{version}",
        product="p",
        planned_count=1,
        key_mode="board-ecc",
        subject_template=TEMPLATE,
    )
    with SimulatedBoard(
        baudrate=None, hardware_id="ARTIK-0001", agent_args=["--max-protocol", str(version)]
    ) as board:
        client = open_port_client(board.port)
        try:
            assert provision_board(client, client.hello(), ProvisionContext(ledger, ca, batch))
            tx0, rx0 = client.port.tx, client.port.rx  # type: ignore[attr-defined]
            renewing = ProvisionContext(ledger, ca, batch, renew=True)
            outcome = provision_board(client, client.hello(), renewing)
            sent = client.port.tx - tx0  # type: ignore[attr-defined]
            received = client.port.rx - rx0  # type: ignore[attr-defined]
        finally:
            client.close()
    assert outcome.result == "verified" and outcome.renews is not None
    to_board, back = _renewal_spec_bytes(version)
    assert sent == pytest.approx(to_board, rel=0.05)
    assert received == pytest.approx(back, rel=0.05)
