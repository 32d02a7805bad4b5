"""Found in review: a device with a renewal in flight could not be revoked.

The live-certificate join covers ``intent`` and ``issued``; while a renewal is
signed (or waits for its confirmation) the old certificate is ``renewing``, so
revocation answered ``no-certificate`` and left the old serial whitelisted.
Revoking such a device revokes its live (renewing) certificate and makes the
pending renewal unusable.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.ledger.schema import certificates
from station.whitelist import serial_hex
from tests.test_ledger import TEMPLATE, make_csr


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with Ledger(ledger_url, "test-station", backdate_seconds=60) as led:
        led.create_batch(
            "B1", product="p", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
        )
        yield led


def verified(ledger: Ledger, ca: CertificateAuthority) -> str:
    ledger.issue("B1", "d1", make_csr("d1")[0], ca)
    ledger.mark_verified("d1")
    serial = ledger.get_device("d1").serial
    assert serial is not None
    return serial


def states(ledger: Ledger) -> dict[str, str]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(select(certificates.c.serial, certificates.c.state))
        return {r.serial: r.state for r in rows}


class Crash(Exception):
    pass


def test_revoking_a_device_whose_renewal_is_being_signed(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    old = verified(ledger, ca)

    def crash(cert: object) -> None:
        raise Crash  # the station died after the signature, before the commit

    ledger.after_sign = crash
    with pytest.raises(Crash):
        ledger.issue("B1", "d1", make_csr("d1")[0], ca, renews=old)
    ledger.after_sign = None
    (pending,) = [s for s in states(ledger) if s != old]
    assert states(ledger) == {old: "renewing", pending: "intent"}

    device = ledger.revoke("d1", "stolen from the field")
    assert device.state == "revoked"
    # The live certificate is revoked and off the whitelist; the intent is never
    # signed (a recovery finds nothing to sign).
    assert states(ledger) == {old: "revoked", pending: "failed"}
    assert list(ledger.whitelist()) == []
    assert {d.serial: d.revoked for d in ledger.delisted_serials()} == {old: True}
    assert ledger.recover(ca).resigned == ()
    assert ledger.audit_verify() is None


def test_revoking_a_device_whose_renewal_waits_for_confirmation(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    """A renewal signed but not yet confirmed (serial line before its proof, CMP before
    its certConf): both certificates are revoked, nothing stays whitelisted, and the
    confirmation that comes late confirms nothing."""
    old = verified(ledger, ca)
    new = serial_hex(
        ledger.issue("B1", "d1", make_csr("d1")[0], ca, renews=old, confirm_later=True).serial
    )
    assert states(ledger) == {old: "renewing", new: "issued"}
    assert [e.serial for e in ledger.whitelist()] == [old]

    ledger.revoke("d1", "returned by the customer")
    assert states(ledger) == {old: "revoked", new: "revoked"}
    assert list(ledger.whitelist()) == []
    assert ledger.renewals.confirm("d1", new) is False
    assert list(ledger.whitelist()) == []
    assert ledger.get_device("d1").state == "revoked"
    assert ledger.audit_verify() is None
