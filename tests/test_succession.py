"""Field renewal in the ledger (succession.py), on a SQLite file and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from station.ca import CertificateAuthority
from station.errors import StationError
from station.ledger import Ledger
from station.ledger.schema import audit_log, certificates
from station.whitelist import serial_hex
from tests.test_ledger import TEMPLATE, make_csr


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with Ledger(ledger_url, "test-station", backdate_seconds=60) as led:
        led.create_batch(
            "B1", product="p", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
        )
        yield led


def refused(code: str) -> pytest.RaisesExc[StationError]:
    return pytest.raises(StationError, match=rf"^{code}: ")


def verified(ledger: Ledger, ca: CertificateAuthority, device_id: str = "d1") -> str:
    csr, _ = make_csr(device_id)
    first = ledger.issue("B1", device_id, csr, ca)
    ledger.mark_verified(device_id)
    return serial_hex(first.serial)


def states(ledger: Ledger) -> dict[str, tuple[str, str | None]]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            select(certificates.c.serial, certificates.c.state, certificates.c.renews)
        )
        return {r.serial: (r.state, r.renews) for r in rows}


def test_renewal_supersedes_the_old_certificate_and_moves_the_whitelist(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    old = verified(ledger, ca)
    csr, _ = make_csr("d1")
    new = ledger.issue("B1", "d1", csr, ca, renews=old)
    new_serial = serial_hex(new.serial)
    assert not new.reused and new_serial != old
    assert states(ledger) == {old: ("superseded", None), new_serial: ("issued", old)}
    device = ledger.get_device("d1")
    assert device.state == "verified" and device.serial == new_serial
    assert [e.serial for e in ledger.whitelist()] == [new_serial]
    # The old one leaves AWS IoT at the next sync (inactive, not revoked).
    delisted = {d.serial: d.revoked for d in ledger.delisted_serials()}
    assert delisted == {old: False}
    with ledger.engine.connect() as conn:
        entry = conn.execute(
            select(audit_log.c.detail).where(audit_log.c.action == "cert.supersede")
        ).scalar_one()
    assert old in entry and new_serial in entry
    # A second renewal succeeds the new one; the first stays superseded.
    csr3, _ = make_csr("d1")
    third = serial_hex(ledger.issue("B1", "d1", csr3, ca, renews=new_serial).serial)
    assert states(ledger)[new_serial] == ("superseded", old)
    assert [e.serial for e in ledger.whitelist()] == [third]
    assert ledger.audit_verify() is None


def test_a_board_that_fails_while_its_renewal_is_signed_is_not_whitelisted(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    """Found in review: a board marked failed between the renewal's intent and its
    commit got the new serial whitelisted while it stayed failed."""
    old = verified(ledger, ca)
    ledger.after_sign = lambda cert: ledger.mark_failed("d1", "test", "left the line")
    try:
        new = ledger.issue("B1", "d1", make_csr("d1")[0], ca, renews=old)
    finally:
        ledger.after_sign = None
    assert states(ledger)[serial_hex(new.serial)] == ("issued", old)
    assert ledger.get_device("d1").state == "failed"
    assert list(ledger.whitelist()) == []
    assert ledger.audit_verify() is None


def test_renewal_refusals_issue_nothing(ledger: Ledger, ca: CertificateAuthority) -> None:
    old = verified(ledger, ca)
    csr, _ = make_csr("d1")
    with refused("renewal-not-current"):
        ledger.issue("B1", "d1", csr, ca, renews="abc123")
    with refused("renewal-not-current"):
        ledger.issue("B1", "nobody", make_csr("nobody")[0], ca, renews=old)
    # Another board's key: duplicate-key, as for any issuance.
    d2_csr, d2_key = make_csr("d2")
    ledger.issue("B1", "d2", d2_csr, ca)
    with refused("duplicate-key"):
        ledger.issue("B1", "d1", make_csr("d1", d2_key)[0], ca, renews=old)
    before = states(ledger)
    assert all(state == "issued" for state, _ in before.values())
    # Not yet verified: no renewal.
    ledger.issue("B1", "d3", make_csr("d3")[0], ca)
    d3 = ledger.get_device("d3").serial
    assert d3 is not None
    with refused("bad-state"):
        ledger.issue("B1", "d3", make_csr("d3")[0], ca, renews=d3)
    assert states(ledger)[d3] == ("issued", None)


def test_renewal_needs_a_new_key(ledger: Ledger, ca: CertificateAuthority) -> None:
    csr, key = make_csr("d1")
    first = ledger.issue("B1", "d1", csr, ca)
    ledger.mark_verified("d1")
    old = serial_hex(first.serial)
    with refused("renewal-same-key"):
        ledger.issue("B1", "d1", make_csr("d1", key)[0], ca, renews=old)
    assert states(ledger) == {old: ("issued", None)}
    assert [e.serial for e in ledger.whitelist()] == [old]


def test_a_closed_batch_still_renews(ledger: Ledger, ca: CertificateAuthority) -> None:
    old = verified(ledger, ca)
    ledger.close_batch("B1")
    with refused("batch-closed"):
        ledger.issue("B1", "d9", make_csr("d9")[0], ca)
    new = ledger.issue("B1", "d1", make_csr("d1")[0], ca, renews=old)
    assert ledger.get_device("d1").serial == serial_hex(new.serial)


def test_a_renewal_the_token_cannot_sign_leaves_the_old_certificate_live(
    ledger: Ledger, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = verified(ledger, ca)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("token removed")

    monkeypatch.setattr(ca, "issue", broken)
    with refused("sign-failed"):
        ledger.issue("B1", "d1", make_csr("d1")[0], ca, renews=old)
    s = states(ledger)
    assert s[old] == ("issued", None)
    assert sorted(state for state, _ in s.values()) == ["failed", "issued"]
    device = ledger.get_device("d1")
    assert device.state == "verified" and device.serial == old
    assert [e.serial for e in ledger.whitelist()] == [old]


def test_ocsp_says_good_for_a_superseded_certificate(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    """Superseded is not revoked: OCSP (RFC 6960) answers good, not unknown."""
    from station.publish.revoked import serial_status

    old = verified(ledger, ca)
    new = ledger.issue("B1", "d1", make_csr("d1")[0], ca, renews=old)
    assert serial_status(ledger.engine, int(old, 16)).status == "good"
    assert serial_status(ledger.engine, new.serial).status == "good"
