"""A renewal confirmed after its commit (succession.py, renewals.py): the serial line
confirms with the board's proof over its new key, CMP with its certConf."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from firmware_hooks.protocol import proof_message
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


def verified(ledger: Ledger, ca: CertificateAuthority) -> str:
    ledger.issue("B1", "d1", make_csr("d1")[0], ca)
    ledger.mark_verified("d1")
    serial = ledger.get_device("d1").serial
    assert serial is not None
    return serial


def renew_later(ledger: Ledger, ca: CertificateAuthority, old: str) -> tuple[str, object]:
    csr, key = make_csr("d1")
    new = ledger.issue("B1", "d1", csr, ca, renews=old, confirm_later=True)
    return serial_hex(new.serial), key


def states(ledger: Ledger) -> dict[str, str]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(select(certificates.c.serial, certificates.c.state))
        return {r.serial: r.state for r in rows}


def actions(ledger: Ledger) -> list[str]:
    with ledger.engine.connect() as conn:
        return list(conn.execute(select(audit_log.c.action).order_by(audit_log.c.seq)).scalars())


def sign(key: object, nonce: bytes) -> bytes:
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.sign(proof_message("d1", nonce), ec.ECDSA(hashes.SHA256()))


def test_a_renewal_waits_for_the_proof_with_the_new_key(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    old = verified(ledger, ca)
    new, key = renew_later(ledger, ca, old)
    # Issued, not whitelisted; the old one stays live for the board and AWS IoT.
    assert states(ledger) == {old: "renewing", new: "issued"}
    assert [e.serial for e in ledger.whitelist()] == [old]
    assert ledger.get_device("d1").state == "verified"
    pending = ledger.renewals.pending("d1")
    assert pending is not None and (pending.old_serial, pending.new_serial) == (old, new)

    nonce = ledger.renewals.challenge("d1")
    ledger.renewals.prove("d1", nonce, sign(key, nonce), chain_sha256="ab" * 32)
    assert states(ledger) == {old: "superseded", new: "issued"}
    assert [e.serial for e in ledger.whitelist()] == [new]
    device = ledger.get_device("d1")
    assert device.state == "verified" and device.chain_sha256 == "ab" * 32
    assert ledger.renewals.pending("d1") is None
    assert "cert.supersede" in actions(ledger)
    assert ledger.audit_verify() is None


def test_a_proof_with_the_old_key_confirms_nothing(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    csr, old_key = make_csr("d1")
    ledger.issue("B1", "d1", csr, ca)
    ledger.mark_verified("d1")
    old = ledger.get_device("d1").serial
    assert old is not None
    new, _ = renew_later(ledger, ca, old)
    nonce = ledger.renewals.challenge("d1")
    with pytest.raises(StationError, match=r"^bad-proof: "):
        ledger.renewals.prove("d1", nonce, sign(old_key, nonce))
    assert states(ledger) == {old: "renewing", new: "issued"}
    assert [e.serial for e in ledger.whitelist()] == [old]
    with pytest.raises(StationError, match=r"^no-challenge: "):  # spent
        ledger.renewals.prove("d1", nonce, sign(old_key, nonce))


def test_an_abandoned_renewal_is_revoked_and_the_old_certificate_is_live(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    old = verified(ledger, ca)
    new, _ = renew_later(ledger, ca, old)
    assert ledger.renewals.abandon("d1", "board-changed") is True
    assert states(ledger) == {old: "issued", new: "revoked"}
    assert [e.serial for e in ledger.whitelist()] == [old]
    device = ledger.get_device("d1")
    assert device.state == "verified" and device.serial == old and device.failure_code is None
    assert ledger.certificate(new).revoke_reason == "renewal abandoned (board-changed)"
    assert ledger.renewals.abandon("d1", "board-changed") is False
    with pytest.raises(StationError, match=r"^no-renewal: "):
        ledger.renewals.challenge("d1")
    assert ledger.audit_verify() is None


def test_a_new_renewal_abandons_one_never_confirmed(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    old = verified(ledger, ca)
    stale, _ = renew_later(ledger, ca, old)
    fresh, _ = renew_later(ledger, ca, old)
    assert states(ledger) == {old: "renewing", stale: "revoked", fresh: "issued"}
    assert [e.serial for e in ledger.whitelist()] == [old]


def test_a_certconf_confirms_only_its_own_certificate(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    old = verified(ledger, ca)
    new, _ = renew_later(ledger, ca, old)
    assert ledger.renewals.confirm("d1", old) is False
    assert ledger.renewals.confirm("d1", new) is True
    assert states(ledger) == {old: "superseded", new: "issued"}
    assert [e.serial for e in ledger.whitelist()] == [new]
    assert ledger.renewals.confirm("d1", new) is False


class Crash(Exception):
    pass


def test_a_renewal_a_crash_left_is_recovered_unconfirmed(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    """The board never got the recovered certificate: superseding its old one at the
    recovery would take the certificate it uses off the whitelist (and out of AWS IoT)."""
    old = verified(ledger, ca)

    def crash(cert: object) -> None:
        raise Crash

    ledger.after_sign = crash
    with pytest.raises(Crash):
        ledger.issue("B1", "d1", make_csr("d1")[0], ca, renews=old)
    ledger.after_sign = None
    (recovered,) = ledger.recover(ca).resigned
    assert states(ledger) == {old: "renewing", recovered: "issued"}
    assert [e.serial for e in ledger.whitelist()] == [old]
    # The board renews again from its old certificate: the recovered one is revoked.
    fresh, _ = renew_later(ledger, ca, old)
    assert states(ledger) == {old: "renewing", recovered: "revoked", fresh: "issued"}
    assert ledger.audit_verify() is None


def test_a_renewal_while_another_is_being_signed_is_issuance_in_progress(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    """A renewal intent is open (being signed, or a crash left it): a second renewal
    of the same certificate is told to wait or recover, not that its certificate is
    not current (which points the operator at re-provisioning; found in review)."""
    old = verified(ledger, ca)
    ledger.after_sign = lambda cert: (_ for _ in ()).throw(SystemExit("crash"))
    with pytest.raises(SystemExit):
        ledger.issue("B1", "d1", make_csr("d1")[0], ca, renews=old)
    ledger.after_sign = None
    with pytest.raises(StationError) as refused:
        ledger.issue("B1", "d1", make_csr("d1")[0], ca, renews=old)
    assert refused.value.code == "issuance-in-progress"
    assert states(ledger)[old] == "renewing"
