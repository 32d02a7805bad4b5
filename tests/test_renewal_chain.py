"""A renewal from a renewal: the board renews with the successor still waiting for
its confirmation (CMP kur signed with it, EST simplereenroll authenticated by it),
and a renewal stays in the device's own batch. SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from station.ca import CertificateAuthority
from station.errors import StationError
from station.ledger import Ledger, devices, succession
from station.ledger.rawsql import Raw
from station.ledger.schema import audit_log
from station.whitelist import serial_hex
from tests.test_ledger import TEMPLATE, make_csr
from tests.test_renewal_pending import ledger, renew_later, states, verified

__all__ = ["ledger"]


def test_renewing_from_the_waiting_successor_confirms_it_first(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    """The request proves possession of the waiting successor: it is confirmed (the old
    one superseded) in the same transaction, then renewed from; one renewing row."""
    old = verified(ledger, ca)
    new1, _ = renew_later(ledger, ca, old)
    new2 = serial_hex(ledger.issue("B1", "d1", make_csr("d1")[0], ca, renews=new1).serial)
    assert states(ledger) == {old: "superseded", new1: "superseded", new2: "issued"}
    assert [e.serial for e in ledger.whitelist()] == [new2]
    device = ledger.get_device("d1")
    assert device.state == "verified" and device.serial == new2
    assert ledger.renewals.pending("d1") is None
    with ledger.engine.connect() as conn:
        supersedes = [
            r.detail
            for r in conn.execute(select(audit_log).where(audit_log.c.action == "cert.supersede"))
        ]
    assert len(supersedes) == 2
    assert ledger.audit_verify() is None


def test_renewing_from_the_waiting_successor_with_a_later_confirmation(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    old = verified(ledger, ca)
    new1, _ = renew_later(ledger, ca, old)
    new2 = serial_hex(
        ledger.issue("B1", "d1", make_csr("d1")[0], ca, renews=new1, confirm_later=True).serial
    )
    assert states(ledger) == {old: "superseded", new1: "renewing", new2: "issued"}
    assert [e.serial for e in ledger.whitelist()] == [new1]
    pending = ledger.renewals.pending("d1")
    assert pending is not None and (pending.old_serial, pending.new_serial) == (new1, new2)
    assert ledger.renewals.confirm("d1", new2) is True
    assert states(ledger) == {old: "superseded", new1: "superseded", new2: "issued"}
    assert [e.serial for e in ledger.whitelist()] == [new2]


def test_an_abandoned_renewal_from_the_successor_leaves_the_successor_live(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    old = verified(ledger, ca)
    new1, _ = renew_later(ledger, ca, old)
    new2 = serial_hex(
        ledger.issue("B1", "d1", make_csr("d1")[0], ca, renews=new1, confirm_later=True).serial
    )
    assert ledger.renewals.abandon("d1", "cmp-cert-rejected") is True
    assert states(ledger) == {old: "superseded", new1: "issued", new2: "revoked"}
    assert [e.serial for e in ledger.whitelist()] == [new1]
    assert ledger.get_device("d1").state == "verified"


def test_begin_refuses_a_second_renewing_certificate(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    old = verified(ledger, ca)
    new1, _ = renew_later(ledger, ca, old)
    with ledger.engine.begin() as conn:
        raw = Raw(conn)
        device = devices.live(raw, "d1")
        assert device is not None
        pending = succession.pending(raw, device.id)
        assert pending is not None and pending.new_id is not None
        with pytest.raises(StationError, match=r"^renewal-in-progress: "):
            succession.begin(raw, pending.new_id, device.id)
    assert states(ledger) == {old: "renewing", new1: "issued"}


def test_a_renewal_naming_another_batch_is_refused(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    old = verified(ledger, ca)
    for name, close in (("B2", True), ("B3", False)):
        ledger.create_batch(
            name, product="p", planned_count=1, key_mode="board-ecc", subject_template=TEMPLATE
        )
        if close:
            ledger.close_batch(name)
        with pytest.raises(StationError, match=r"^renewal-other-batch: ") as refused:
            ledger.issue(name, "d1", make_csr("d1")[0], ca, renews=old)
        assert refused.value.kind == "forbidden"
    assert states(ledger) == {old: "issued"}
    device = ledger.get_device("d1")
    assert device.batch == "B1" and device.state == "verified"
    assert [e.serial for e in ledger.whitelist()] == [old]
    assert {b.name: b.device_count for b in ledger.list_batches()}["B1"] == 1
