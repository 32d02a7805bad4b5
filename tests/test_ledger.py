"""The ledger, rule by rule, on a SQLite file and on PostgreSQL, with the SoftHSM CA."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.x509.oid import NameOID
from sqlalchemy import select, text

from firmware_hooks.protocol import proof_message
from station.ca import CertificateAuthority
from station.errors import StationError
from station.ledger import Ledger
from station.ledger.schema import certificates
from station.whitelist import serial_hex

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


def make_csr(
    device_id: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    *,
    org: str = "company",
) -> tuple[bytes, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "team"),
            x509.NameAttribute(NameOID.COMMON_NAME, device_id),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM), key


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with Ledger(ledger_url, "test-station", backdate_seconds=60) as led:
        yield led


@pytest.fixture
def batch(ledger: Ledger) -> str:
    ledger.create_batch(
        "B1", product="artik530", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
    )
    return "B1"


def refused(code: str) -> pytest.RaisesExc[StationError]:
    return pytest.raises(StationError, match=rf"^{code}: ")


def test_issue_records_the_certificate_before_returning_it(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    csr, _ = make_csr("dev-1")
    result = ledger.issue(batch, "dev-1", csr, ca)

    assert not result.reused
    assert result.certificate.serial_number == result.serial
    assert result.fingerprint == result.certificate.fingerprint(hashes.SHA256()).hex()
    assert result.chain_pem.endswith(ca.chain_pem)
    record = ledger.certificate(result.serial)
    assert record.state == "issued"
    assert record.device_id == "dev-1" and record.batch == "B1"
    assert record.fingerprint == result.fingerprint
    assert record.pem is not None and x509.load_pem_x509_certificate(record.pem.encode()) == (
        result.certificate
    )
    assert record.not_after == result.certificate.not_valid_after_utc
    device = ledger.get_device("dev-1")
    assert device.state == "issued" and device.serial == serial_hex(result.serial)
    assert device.issued_at is not None
    assert ledger.audit_verify() is None


def test_same_device_same_csr_gets_the_same_certificate(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    csr, key = make_csr("dev-1")
    first = ledger.issue(batch, "dev-1", csr, ca)
    again = ledger.issue(batch, "dev-1", csr, ca)
    # A fresh CSR from the same key (new signature bytes) is the same request.
    regenerated, _ = make_csr("dev-1", key)
    third = ledger.issue(batch, "dev-1", regenerated, ca)

    assert again.reused and third.reused
    assert again.certificate == first.certificate == third.certificate
    assert len(ledger.certificates("dev-1")) == 1


def test_different_csr_for_a_provisioned_device_is_refused(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    ledger.issue(batch, "dev-1", make_csr("dev-1")[0], ca)
    with refused("already-provisioned"):
        ledger.issue(batch, "dev-1", make_csr("dev-1")[0], ca)


def test_reprovision_revokes_the_old_certificate(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    old = ledger.issue(batch, "dev-1", make_csr("dev-1")[0], ca)
    ledger.mark_verified("dev-1")
    assert [e.serial for e in ledger.whitelist()] == [serial_hex(old.serial)]

    new = ledger.issue(batch, "dev-1", make_csr("dev-1")[0], ca, reprovision=True)

    assert new.serial != old.serial
    assert ledger.certificate(old.serial).state == "revoked"
    assert ledger.certificate(old.serial).revoke_reason == "reprovisioned"
    assert list(ledger.whitelist()) == []
    assert serial_hex(old.serial) in {d.serial for d in ledger.delisted_serials() if d.revoked}
    assert ledger.get_device("dev-1").state == "issued"


def test_same_public_key_for_two_devices_is_refused(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    csr1, key = make_csr("dev-1")
    ledger.issue(batch, "dev-1", csr1, ca)
    csr2, _ = make_csr("dev-2", key)
    with refused("duplicate-key"):
        ledger.issue(batch, "dev-2", csr2, ca)


def test_subject_must_match_the_batch_template(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    csr, _ = make_csr("dev-1", org="someone-else")
    with refused("subject-mismatch"):
        ledger.issue(batch, "dev-1", csr, ca)


def test_device_id_must_match_the_hardware_id(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    csr, _ = make_csr("dev-1")
    with refused("device-id-mismatch"):
        ledger.issue(batch, "hw-0042", csr, ca)


def test_closed_batch_refuses_issuance(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    ledger.close_batch(batch)
    with refused("batch-closed"):
        ledger.issue(batch, "dev-1", make_csr("dev-1")[0], ca)
    assert ledger.get_batch(batch).state == "closed"


def test_full_batch_refuses_another_device(ledger: Ledger, ca: CertificateAuthority) -> None:
    ledger.create_batch(
        "tiny", product="p", planned_count=1, key_mode="see-rsa", subject_template=TEMPLATE
    )
    ledger.issue("tiny", "dev-1", make_csr("dev-1")[0], ca)
    with refused("batch-full"):
        ledger.issue("tiny", "dev-2", make_csr("dev-2")[0], ca)
    # The device already in the batch may still come back.
    assert ledger.issue("tiny", "dev-1", ledger_csr(ledger, "dev-1"), ca).reused


def ledger_csr(ledger: Ledger, device_id: str) -> bytes:
    with ledger.engine.connect() as conn:
        der = conn.execute(select(certificates.c.csr_der)).scalar_one()
    return bytes(der)


def test_unknown_batch_is_refused(ledger: Ledger, ca: CertificateAuthority) -> None:
    with refused("unknown-batch"):
        ledger.issue("nope", "dev-1", make_csr("dev-1")[0], ca)


def test_policy_refusals_keep_their_codes(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    with refused("malformed-csr"):
        ledger.issue(batch, "dev-1", b"not a csr", ca)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    with refused("weak-key"):
        ledger.issue(batch, "dev-1", make_csr("dev-1", weak)[0], ca)


def test_crash_between_sign_and_commit_is_recovered(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    signed: list[x509.Certificate] = []

    def crash(cert: x509.Certificate) -> None:
        signed.append(cert)
        raise SystemExit("power cut")

    ledger.after_sign = crash
    with pytest.raises(SystemExit):
        ledger.issue(batch, "dev-1", make_csr("dev-1")[0], ca)
    ledger.after_sign = None
    # Nothing was returned; the ledger holds the intent, and a new request waits for recovery.
    (intent,) = ledger.certificates("dev-1")
    assert intent.state == "intent" and intent.pem is None
    with refused("issuance-in-progress"):
        ledger.issue(batch, "dev-1", make_csr("dev-1")[0], ca)

    report = ledger.recover(ca)

    assert report.resigned == (intent.serial,) and report.failed == ()
    record = ledger.certificate(intent.serial)
    assert record.state == "issued"
    recovered = x509.load_pem_x509_certificate((record.pem or "").encode())
    # Same serial, subject, key and validity as the certificate lost in the crash.
    assert recovered.tbs_certificate_bytes == signed[0].tbs_certificate_bytes
    assert ledger.get_device("dev-1").state == "issued"
    assert ledger.recover(ca).resigned == ()
    assert ledger.audit_verify() is None


def test_an_intent_that_cannot_be_signed_is_marked_failed(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    ledger.after_sign = lambda cert: (_ for _ in ()).throw(SystemExit("crash"))
    with pytest.raises(SystemExit):
        ledger.issue(batch, "dev-1", make_csr("dev-1")[0], ca)
    ledger.after_sign = None
    # The CSR stored with the intent is damaged while the station is down.
    with ledger.engine.begin() as conn:
        conn.execute(certificates.update().values(csr_der=b"\x30\x03junk"))

    report = ledger.recover(ca)

    assert report.resigned == () and report.failed[0][1] == "malformed-csr"
    device = ledger.get_device("dev-1")
    assert device.state == "failed" and device.failure_code == "malformed-csr"
    # The board can be retried afterwards.
    assert not ledger.issue(batch, "dev-1", make_csr("dev-1")[0], ca).reused


def test_a_late_signing_failure_leaves_an_intent_resolved_elsewhere_alone(
    ledger: Ledger, batch: str, ca: CertificateAuthority, ledger_url: str
) -> None:
    """The token stalls past recovery's grace; another process of the station re-signs
    and commits the intent; then the stalled call fails. The board keeps its certificate."""

    class StalledThenFailing:
        chain_pem = ca.chain_pem

        def issue(self, *args: object, **kwargs: object) -> x509.Certificate:
            with Ledger(ledger_url, "test-station") as restarted:
                assert len(restarted.recover(ca, older_than=timedelta(0)).resigned) == 1
            raise RuntimeError("the token timed out")

    with refused("sign-failed"):
        ledger.issue(batch, "dev-1", make_csr("dev-1")[0], StalledThenFailing())  # type: ignore[arg-type]
    (record,) = ledger.certificates("dev-1")
    assert record.state == "issued"
    device = ledger.get_device("dev-1")
    assert device.state == "issued" and device.failure_code is None
    with ledger.engine.connect() as conn:
        actions = [row[0] for row in conn.execute(text("SELECT action FROM audit_log"))]
    assert "cert.issued" in actions and "cert.failed" not in actions
    assert ledger.audit_verify() is None


def test_delisted_serials_are_the_issued_certificates_off_the_whitelist(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    """What a whitelist sync takes out of AWS: revoked ones, and boards not (or no longer)
    verified; each with the fingerprint AWS IoT knows it by."""
    issued = {d: ledger.issue(batch, d, make_csr(d)[0], ca) for d in ("dev-1", "dev-2", "dev-3")}
    for device in ("dev-1", "dev-2"):
        ledger.mark_verified(device)
    ledger.revoke("dev-2", "returned")
    delisted = {d.serial: d for d in ledger.delisted_serials()}
    assert set(delisted) == {serial_hex(issued[d].serial) for d in ("dev-2", "dev-3")}
    two, three = (delisted[serial_hex(issued[d].serial)] for d in ("dev-2", "dev-3"))
    assert two.revoked and not three.revoked
    assert two.fingerprint == issued["dev-2"].fingerprint


def test_line_steps_and_whitelist(ledger: Ledger, batch: str, ca: CertificateAuthority) -> None:
    ledger.mark_key_ready("dev-1", batch=batch)
    ledger.mark_key_ready("dev-2", batch=batch)
    one = ledger.issue(batch, "dev-1", make_csr("dev-1")[0], ca)
    two = ledger.issue(batch, "dev-2", make_csr("dev-2")[0], ca)
    ledger.mark_installed("dev-1", "AB" * 32)
    ledger.mark_verified("dev-1")
    ledger.mark_verified("dev-2")
    with refused("bad-state"):
        ledger.mark_installed("dev-2", "ab" * 32)

    entries = sorted(ledger.whitelist(), key=lambda e: e.device_id)
    assert [(e.serial, e.device_id, e.batch) for e in entries] == [
        (serial_hex(one.serial), "dev-1", "B1"),
        (serial_hex(two.serial), "dev-2", "B1"),
    ]
    assert entries[0].fingerprint == one.fingerprint
    assert entries[0].not_after == one.certificate.not_valid_after_utc

    ledger.revoke("dev-2", "returned by customer")
    assert [e.device_id for e in ledger.whitelist()] == ["dev-1"]
    assert [d.serial for d in ledger.delisted_serials() if d.revoked] == [serial_hex(two.serial)]
    dev1 = ledger.get_device("dev-1")
    assert dev1.chain_sha256 == "ab" * 32
    assert dev1.key_ready_at and dev1.issued_at and dev1.installed_at and dev1.verified_at
    assert ledger.counts() == {"B1": {"verified": 1, "revoked": 1}}
    assert [d.device_id for d in ledger.list_devices(batch, "revoked")] == ["dev-2"]
    assert [d.device_id for d in ledger.list_devices(limit=1, offset=1)] == ["dev-2"]
    with refused("unknown-batch"):
        list(ledger.whitelist("nope"))


def test_verified_board_is_not_given_a_second_identity(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    ledger.issue(batch, "dev-1", make_csr("dev-1")[0], ca)
    ledger.mark_verified("dev-1")
    with refused("already-provisioned"):
        ledger.mark_key_ready("dev-1")
    with refused("already-provisioned"):
        ledger.issue(batch, "dev-1", make_csr("dev-1")[0], ca)


def test_failed_board_counts_attempts_and_can_retry(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    csr, _ = make_csr("dev-1")
    first = ledger.issue(batch, "dev-1", csr, ca)
    ledger.mark_failed("dev-1", "install-timeout", "the board did not answer")
    failed = ledger.get_device("dev-1")
    assert (failed.state, failed.failure_code, failed.attempts) == ("failed", "install-timeout", 1)
    assert list(ledger.whitelist()) == []

    again = ledger.issue(batch, "dev-1", csr, ca)

    assert again.reused and again.serial == first.serial
    assert ledger.get_device("dev-1").state == "issued"


def _signed(key: ec.EllipticCurvePrivateKey, device_id: str, nonce: bytes) -> bytes:
    return key.sign(proof_message(device_id, nonce), ec.ECDSA(hashes.SHA256()))


def test_proof_of_possession(ledger: Ledger, batch: str, ca: CertificateAuthority) -> None:
    csr, key = make_csr("dev-1")
    ledger.issue(batch, "dev-1", csr, ca)
    assert isinstance(key, ec.EllipticCurvePrivateKey)

    nonce = ledger.create_challenge("dev-1")
    other = ec.generate_private_key(ec.SECP256R1())
    with refused("bad-proof"):
        ledger.verify_proof("dev-1", nonce, _signed(other, "dev-1", nonce))
    with refused("no-challenge"):  # single use, even after a failure
        ledger.verify_proof("dev-1", nonce, _signed(key, "dev-1", nonce))
    stale = ledger.create_challenge("dev-1", ttl=timedelta(seconds=-1))
    with refused("challenge-expired"):
        ledger.verify_proof("dev-1", stale, _signed(key, "dev-1", stale))
    assert ledger.get_device("dev-1").state == "issued"

    nonce = ledger.create_challenge("dev-1")
    device = ledger.verify_proof("dev-1", nonce, _signed(key, "dev-1", nonce))

    assert device.state == "verified"
    assert [e.device_id for e in ledger.whitelist()] == ["dev-1"]


def test_a_signature_over_anything_but_the_proof_message_proves_nothing(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    csr, key = make_csr("dev-1")
    ledger.issue(batch, "dev-1", csr, ca)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    nonce = ledger.create_challenge("dev-1")
    with refused("bad-proof"):  # the bare nonce: what a signing oracle would sign
        ledger.verify_proof("dev-1", nonce, key.sign(nonce, ec.ECDSA(hashes.SHA256())))
    nonce = ledger.create_challenge("dev-1")
    with refused("bad-proof"):  # the message of another device
        ledger.verify_proof("dev-1", nonce, _signed(key, "dev-2", nonce))
    assert ledger.get_device("dev-1").state == "issued"


def test_proof_of_possession_rsa(ledger: Ledger, ca: CertificateAuthority) -> None:
    ledger.create_batch(
        "see", product="artik710", planned_count=2, key_mode="see-rsa", subject_template=TEMPLATE
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ledger.issue("see", "dev-9", make_csr("dev-9", key)[0], ca)
    nonce = ledger.create_challenge("dev-9")
    message = proof_message("dev-9", nonce)
    ledger.verify_proof("dev-9", nonce, key.sign(message, PKCS1v15(), hashes.SHA256()))
    assert ledger.get_device("dev-9").state == "verified"


def test_audit_verify_reports_the_first_tampered_entry(
    ledger: Ledger, batch: str, ca: CertificateAuthority
) -> None:
    ledger.issue(batch, "dev-1", make_csr("dev-1")[0], ca)
    ledger.revoke("dev-1", "test")
    report = ledger.audit_report()
    assert report.broken is None and report.entries >= 4

    with ledger.engine.begin() as conn:
        conn.execute(text('UPDATE audit_log SET detail = \'{"reason":"nothing"}\' WHERE seq = 3'))
    broken = ledger.audit_verify()
    assert broken is not None and (broken.seq, broken.reason) == (3, "hash-mismatch")

    with ledger.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE seq = 2"))
    broken = ledger.audit_verify()
    assert broken is not None and (broken.seq, broken.reason) == (2, "gap")


def test_api_tokens_store_only_a_hash(ledger: Ledger) -> None:
    token = ledger.create_token("line-1", "operator")
    assert ledger.lookup_token(token) == ("line-1", "operator")
    assert ledger.lookup_token(token + "x") is None
    with ledger.engine.connect() as conn:
        dump = " ".join(str(r) for r in conn.execute(text("SELECT * FROM api_tokens")))
        dump += " ".join(str(r) for r in conn.execute(text("SELECT * FROM audit_log")))
    assert token not in dump
    with refused("token-exists"):
        ledger.create_token("line-1", "qa")
    ledger.revoke_token("line-1")
    assert ledger.lookup_token(token) is None


@pytest.mark.parametrize("name", ["", "evil\nINFO forged", "nul\x00", "x" * 129])
def test_token_names_are_printable(ledger: Ledger, name: str) -> None:
    with refused("bad-token-name"):
        ledger.create_token(name, "qa")


def test_adhoc_batch_takes_the_subject_as_presented(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    batch = ledger.ensure_adhoc_batch()
    csr, _ = make_csr("bench-7", org="lab")
    result = ledger.issue(batch.name, "bench-7", csr, ca)
    assert result.certificate.subject == x509.load_pem_x509_csr(csr).subject
    assert ledger.ensure_adhoc_batch().device_count == 1


def test_migrations_create_exactly_the_declared_schema(ledger: Ledger) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from station.ledger.schema import metadata

    with ledger.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


@pytest.mark.parametrize("before", ["0004", "0005"])
def test_a_ledger_with_verified_boards_upgrades_to_head(
    ledger_url: str, ca: CertificateAuthority, before: str
) -> None:
    """A station started on an older ledger that already whitelists boards: the
    migrations that rebuild the certificates table (SQLite's batch mode: copy, DROP,
    rename) must not trip over the whitelist's foreign key, and lose nothing (found
    in review: 0005 and 0006 failed with FOREIGN KEY constraint failed at start)."""
    from alembic import command
    from sqlalchemy import create_engine, func

    from station.ledger.db import alembic_config, current_revision, head_revision

    with Ledger(ledger_url, "test-station") as led:
        led.create_batch(
            "B1", product="p", planned_count=2, key_mode="board-ecc", subject_template=TEMPLATE
        )
        serial = format(led.issue("B1", "dev-1", make_csr("dev-1")[0], ca).serial, "x")
        led.mark_verified("dev-1")
    engine = create_engine(ledger_url)  # foreign keys off: the downgrade is not under test
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), before)
        assert current_revision(engine) == before
    finally:
        engine.dispose()
    with Ledger(ledger_url, "test-station") as led:  # the station's start migrates
        assert current_revision(led.engine) == head_revision()
        assert led.get_device("dev-1").state == "verified"
        assert [e.serial for e in led.whitelist()] == [serial]
        with led.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(certificates)).scalar() == 1
            if led.engine.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_migration_0006_leaves_the_boards_own_keys_to_recovery(
    ledger_url: str, ca: CertificateAuthority
) -> None:
    """0006 adds certificates.station_made_key; rows from before it are the boards' own
    keys (false): an intent a crash left under 0005 is still signed again after it."""
    from alembic import command
    from sqlalchemy import create_engine, inspect

    from station.ledger.db import alembic_config, upgrade

    with Ledger(ledger_url, "test-station") as led:
        led.create_batch(
            "B1", product="p", planned_count=2, key_mode="board-ecc", subject_template=TEMPLATE
        )
        led.after_sign = lambda cert: (_ for _ in ()).throw(SystemExit("crash"))
        with pytest.raises(SystemExit):
            led.issue("B1", "dev-1", make_csr("dev-1")[0], ca)
    engine = create_engine(ledger_url)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0005")
        columns = {c["name"] for c in inspect(engine).get_columns("certificates")}
        assert "station_made_key" not in columns
        upgrade(engine)
        with engine.connect() as conn:
            assert conn.execute(select(certificates.c.station_made_key)).scalars().all() == [False]
    finally:
        engine.dispose()
    with Ledger(ledger_url, "test-station") as led:
        report = led.recover(ca)
        assert len(report.resigned) == 1 and report.failed == ()
        assert led.get_device("dev-1").state == "issued"
