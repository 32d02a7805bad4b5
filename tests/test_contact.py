"""Verified on first authenticated contact (station/ledger/contact.py), EST's and CMP's
proof of possession, on a SQLite file and on PostgreSQL, one rule a case."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.ledger.lifecycle import AWAITING_PROOF
from station.ledger.schema import DeviceState, audit_log
from station.whitelist import serial_hex
from tests.test_ledger import TEMPLATE, make_csr


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with Ledger(ledger_url, "test-station", backdate_seconds=60) as led:
        led.create_batch(
            "B1", product="p", planned_count=9, key_mode="board-ecc", subject_template=TEMPLATE
        )
        yield led


def issued(ledger: Ledger, ca: CertificateAuthority, device_id: str) -> str:
    csr, _ = make_csr(device_id)
    return serial_hex(ledger.issue("B1", device_id, csr, ca).serial)


def listed(ledger: Ledger) -> set[str]:
    return {e.serial for e in ledger.whitelist()}


def entries(ledger: Ledger, device_id: str) -> list[dict[str, object]]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            select(audit_log.c.detail).where(
                audit_log.c.entity == device_id, audit_log.c.action == "device.state"
            )
        )
        return [json.loads(r.detail) for r in rows]


def test_the_states_that_await_a_proof_are_the_lifecycles() -> None:
    assert {DeviceState.ISSUED, DeviceState.INSTALLED} == AWAITING_PROOF


def test_an_issued_board_is_verified_and_whitelisted_once(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    serial = issued(ledger, ca, "c1")
    assert ledger.contact.authenticated("c1", serial, proof="est-tls-client-certificate")
    device = ledger.get_device("c1")
    assert device.state == "verified" and serial in listed(ledger)
    [entry] = entries(ledger, "c1")
    assert entry["to"] == "verified" and entry["proof"] == "est-tls-client-certificate"
    # Every later request: nothing to do, nothing recorded.
    assert not ledger.contact.authenticated("c1", serial, proof="est-tls-client-certificate")
    assert len(entries(ledger, "c1")) == 1


def test_an_installed_board_is_verified(ledger: Ledger, ca: CertificateAuthority) -> None:
    serial = issued(ledger, ca, "c2")
    ledger.mark_installed("c2", "ab" * 32)
    assert ledger.contact.authenticated("c2", serial.upper(), proof="cmp-signature")
    assert ledger.get_device("c2").state == "verified"


def test_a_certificate_that_is_not_the_live_one_verifies_nothing(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    old = issued(ledger, ca, "c3")
    csr, _ = make_csr("c3")
    new = serial_hex(ledger.issue("B1", "c3", csr, ca, reprovision=True).serial)
    assert not ledger.contact.authenticated("c3", old, proof="cmp-signature")
    assert ledger.get_device("c3").state == "issued" and not listed(ledger)
    assert ledger.contact.authenticated("c3", new, proof="cmp-signature")


@pytest.mark.parametrize("state", ["failed", "revoked"])
def test_a_failed_or_revoked_board_is_not_brought_back(
    ledger: Ledger, ca: CertificateAuthority, state: str
) -> None:
    serial = issued(ledger, ca, "c4")
    if state == "failed":
        ledger.mark_failed("c4", "chain-not-stored", "the board could not store the chain")
    else:
        ledger.revoke("c4", "lost")
    assert not ledger.contact.authenticated("c4", serial, proof="est-tls-client-certificate")
    assert ledger.get_device("c4").state == state and not listed(ledger)


def test_an_unknown_board_is_not_an_error(ledger: Ledger) -> None:
    assert not ledger.contact.authenticated("nobody", "01ab", proof="cmp-signature")
