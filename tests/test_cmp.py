"""Lightweight CMP (RFC 9483) with the real `openssl cmp` client (OpenSSL 3.0).

One `station serve` for the module: ir, cr and p10cr with MAC protection (a
board token as the secret, its name as the senderKID), kur, cr and p10cr with
signature protection by the current certificate (renewal), certConf/pkiConf,
implicit confirmation, and error messages with the right PKIFailureInfo for bad
input, each audited, nothing issued.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pyasn1.codec.der import decoder as der_decoder
from pyasn1_modules import rfc4210
from sqlalchemy import func, select

from station.enroll import cmp
from station.ledger import Ledger
from station.ledger.schema import audit_log, certificates
from station.settings import Settings
from station.whitelist import serial_hex
from tests.fixtures.hsm import settings_for
from tests.serving import Served, serve

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


@dataclass
class Cmp:
    served: Served
    settings: Settings
    token: str
    work: Path

    def url(self, label: str = "C", op: str = "pkcs10") -> str:
        return f"{self.served.url}/.well-known/cmp/p/{label}/{op}"

    def ledger(self) -> Ledger:
        return Ledger.from_settings(self.settings)

    def client(
        self, *args: str, label: str = "C", op: str = "pkcs10"
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "openssl", "cmp", "-server", f"127.0.0.1:{self.served.port}",
                "-path", f".well-known/cmp/p/{label}/{op}",
                "-trusted", str(self.settings.ca_cert_path), *args,
            ],
            capture_output=True, text=True, cwd=self.work, timeout=120,
        )  # fmt: skip

    def mac(
        self, *args: str, secret: str | None = None, **kw: str
    ) -> subprocess.CompletedProcess[str]:
        return self.client(
            "-ref", "cmp-board", "-secret", f"pass:{secret or self.token}", *args, **kw
        )


@pytest.fixture(scope="module")
def cmp_station(ca_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cmp]:
    root = tmp_path_factory.mktemp("cmp")
    settings = settings_for(ca_home, root / "data")
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "C", product="p", planned_count=100, key_mode="board-ecc", subject_template=TEMPLATE
        )
        ledger.create_batch(
            "R", product="p", planned_count=5, key_mode="see-rsa", subject_template=TEMPLATE
        )
        ledger.create_batch(
            "C2", product="p", planned_count=10, key_mode="board-ecc", subject_template=TEMPLATE
        )
        token = ledger.create_token("cmp-board", "board")
        qa = ledger.create_token("cmp-qa", "qa")
    secrets_file = root / "cmp-secrets"
    secrets_file.write_text(f"# name token\ncmp-board {token}\ncmp-qa {qa}\n")
    os.chmod(secrets_file, 0o600)
    work = root / "work"
    work.mkdir()
    with serve(settings, tls=False, STATION_CMP_SECRETS=str(secrets_file)) as served:
        yield Cmp(served, settings, token, work)


def csr(c: Cmp, name: str, device_id: str) -> None:
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", f"{name}.key", "-subj", f"/O=company/OU=team/CN={device_id}/C=US",
         "-out", f"{name}.csr"],
        check=True, capture_output=True, cwd=c.work,
    )  # fmt: skip


def count(c: Cmp, table: object, *where: object) -> int:
    with c.ledger() as ledger, ledger.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar())


def test_p10cr_with_mac_then_certconf(cmp_station: Cmp) -> None:
    c = cmp_station
    csr(c, "m1", "cmp-mac-1")
    done = c.mac("-cmd", "p10cr", "-csr", "m1.csr", "-certout", "m1.pem")
    assert done.returncode == 0, done.stdout + done.stderr
    cert = x509.load_pem_x509_certificate((c.work / "m1.pem").read_bytes())
    with c.ledger() as ledger:
        record = ledger.certificate(serial_hex(cert.serial_number))
        assert record.device_id == "cmp-mac-1" and record.state == "issued"
        # openssl cmp confirmed (certConf) and the station answered pkiConf: verified.
        assert ledger.get_device("cmp-mac-1").state == "verified"
        assert record.serial in {e.serial for e in ledger.whitelist()}


def test_implicit_and_disabled_confirmation(cmp_station: Cmp) -> None:
    c = cmp_station
    csr(c, "i1", "cmp-implicit-1")
    done = c.mac("-cmd", "p10cr", "-csr", "i1.csr", "-certout", "i1.pem", "-implicit_confirm")
    assert done.returncode == 0, done.stdout + done.stderr
    csr(c, "d1", "cmp-noconf-1")
    done = c.mac("-cmd", "p10cr", "-csr", "d1.csr", "-certout", "d1.pem", "-disable_confirm")
    assert done.returncode == 0, done.stdout + done.stderr
    with c.ledger() as ledger:
        assert ledger.get_device("cmp-implicit-1").state == "verified"
        # Issued, but never confirmed: not verified, not whitelisted.
        assert ledger.get_device("cmp-noconf-1").state == "issued"


def test_renewal_with_signature_protection(cmp_station: Cmp) -> None:
    c = cmp_station
    csr(c, "s1", "cmp-sig-1")
    assert c.mac("-cmd", "p10cr", "-csr", "s1.csr", "-certout", "s1.pem").returncode == 0
    csr(c, "s2", "cmp-sig-1")
    done = c.client(
        "-cmd", "p10cr", "-csr", "s2.csr", "-cert", "s1.pem", "-key", "s1.key",
        "-certout", "s2.pem",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    old = x509.load_pem_x509_certificate((c.work / "s1.pem").read_bytes())
    new = x509.load_pem_x509_certificate((c.work / "s2.pem").read_bytes())
    with c.ledger() as ledger:
        assert ledger.certificate(serial_hex(old.serial_number)).state == "superseded"
        device = ledger.get_device("cmp-sig-1")
        assert device.serial == serial_hex(new.serial_number) and device.state == "verified"
        assert [e.serial for e in ledger.whitelist() if e.device_id == "cmp-sig-1"] == [
            device.serial
        ]
    # The superseded certificate protects nothing any more (not revoked: notAuthorized).
    csr(c, "s3", "cmp-sig-1")
    done = c.client(
        "-cmd", "p10cr", "-csr", "s3.csr", "-cert", "s1.pem", "-key", "s1.key",
        "-certout", "s3.pem",
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "PKIFailureInfo: notAuthorized" in out, out
    assert "cmp-certificate-not-live" in out, out


@pytest.mark.parametrize(
    ("case", "failure"),
    [
        ("wrong-secret", "badMessageCheck"),
        ("unknown-kid", "badMessageCheck"),
        ("qa-token", "notAuthorized"),
        ("genm", "badRequest"),
        ("kur-with-mac", "notAuthorized"),
        ("unknown-batch", "badRequest"),
        ("see-rsa-batch", "notAuthorized"),
        ("wrong-subject", "badCertTemplate"),
    ],
)
def test_openssl_cmp_gets_the_protocol_error(cmp_station: Cmp, case: str, failure: str) -> None:
    c = cmp_station
    csr(c, case, f"cmp-{case}")
    args = ["-cmd", "p10cr", "-csr", f"{case}.csr", "-certout", f"{case}.pem"]
    label = "C"
    secret = None
    ref = "cmp-board"
    if case == "wrong-secret":
        secret = "not-the-token"
    elif case == "unknown-kid":
        ref = "nobody"
    elif case == "qa-token":
        ref = "cmp-qa"
        secret = (Path(c.settings.data_dir).parent / "cmp-secrets").read_text().split()[-1]
    elif case == "genm":
        args = ["-cmd", "genm"]
    elif case == "kur-with-mac":
        args = ["-cmd", "kur", "-newkey", f"{case}.key", "-oldcert", str(c.settings.ca_cert_path),
                "-certout", f"{case}.pem"]  # fmt: skip
    elif case == "unknown-batch":
        label = "NOPE"
    elif case == "see-rsa-batch":
        label = "R"
    elif case == "wrong-subject":
        subprocess.run(
            ["openssl", "req", "-new", "-key", f"{case}.key", "-subj", "/CN=elsewhere",
             "-out", f"{case}.csr"],
            check=True, capture_output=True, cwd=c.work,
        )  # fmt: skip
    certs_before = count(c, certificates)
    refused_before = count(c, audit_log, audit_log.c.action == "cmp.refused")
    done = c.client("-ref", ref, "-secret", f"pass:{secret or c.token}", *args, label=label)
    out = done.stdout + done.stderr  # openssl cmp logs to stdout
    assert done.returncode != 0
    assert f"PKIFailureInfo: {failure}" in out, out
    assert not (c.work / f"{case}.pem").exists()
    assert count(c, certificates) == certs_before
    assert count(c, audit_log, audit_log.c.action == "cmp.refused") == refused_before + 1


def _error_of(der: bytes) -> tuple[list[str], str]:
    msg, _ = der_decoder.decode(der, asn1Spec=rfc4210.PKIMessage())
    assert msg["body"].getName() == "error"
    info = msg["body"]["error"]["pKIStatusInfo"]
    bits = info["failInfo"]
    names = [n for n, v in rfc4210.PKIFailureInfo.namedValues.items() if len(bits) > v and bits[v]]
    return names, str(info["statusString"][0])


def _signed_by_responder(c: Cmp, der: bytes) -> None:
    """The error message is protected by the station's CMP key, certified by the CA."""
    msg = cmp.decode(der)
    signer, ca_cert = cmp.extra_certs(msg)[:2]
    station_ca = x509.load_pem_x509_certificate(c.settings.ca_cert_path.read_bytes())
    assert ca_cert == station_ca
    signer.verify_directly_issued_by(station_ca)
    cmp.check_signature(msg, signer)


def test_raw_bad_input(cmp_station: Cmp) -> None:
    c = cmp_station
    headers = {"Content-Type": cmp.CONTENT_TYPE}
    # Not DER at all.
    r = httpx.post(c.url(), content=b"\x30\x03garbage", headers=headers, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == cmp.CONTENT_TYPE
    names, text = _error_of(r.content)
    assert names == ["badDataFormat"] and text.startswith("cmp-bad-der")
    _signed_by_responder(c, r.content)
    # Wrong content type, unknown operation: HTTP's own answers.
    r = httpx.post(c.url(), content=b"x", headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415
    r = httpx.post(c.url(op="nonsense"), content=b"x", headers=headers, timeout=30)
    assert r.status_code == 404
    # Oversized.
    r = httpx.post(c.url(), content=b"\x30" * 200_000, headers=headers, timeout=30)
    assert r.status_code == 413


def test_replayed_request_and_certconf_are_refused(cmp_station: Cmp) -> None:
    c = cmp_station
    csr(c, "rp", "cmp-replay-1")
    done = c.mac("-cmd", "p10cr", "-csr", "rp.csr", "-certout", "rp.pem",
                 "-reqout", "rp-p10cr.der,rp-certconf.der")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    certs_before = count(c, certificates)
    headers = {"Content-Type": cmp.CONTENT_TYPE}
    for name, failure in (("rp-p10cr.der", "transactionIdInUse"),
                          ("rp-certconf.der", "transactionIdInUse")):  # fmt: skip
        r = httpx.post(c.url(), content=(c.work / name).read_bytes(), headers=headers, timeout=30)
        names, text = _error_of(r.content)
        assert names == [failure], (name, text)
    assert count(c, certificates) == certs_before


def test_a_tampered_request_fails_its_mac(cmp_station: Cmp) -> None:
    c = cmp_station
    csr(c, "tm", "cmp-tamper-1")
    # -reqout writes the request; the server answers it, so use a fresh transaction:
    # flip one byte of the CSR's subject inside the saved request and send it again.
    done = c.mac("-cmd", "p10cr", "-csr", "tm.csr", "-certout", "tm.pem",
                 "-reqout", "tm-req.der,tm-conf.der")  # fmt: skip
    assert done.returncode == 0
    der = bytearray((c.work / "tm-req.der").read_bytes())
    at = der.find(b"cmp-tamper-1")
    der[at] ^= 0x01
    r = httpx.post(c.url(), content=bytes(der), headers={"Content-Type": cmp.CONTENT_TYPE})
    names, _ = _error_of(r.content)
    # The transactionID is the original's: refused as a replay or a bad MAC, never issued.
    assert names in (["badMessageCheck"], ["transactionIdInUse"])
    with c.ledger() as ledger:
        assert len(ledger.certificates("cmp-tamper-1")) == 1


def genkey(c: Cmp, name: str) -> None:
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-out", f"{name}.key"],
        check=True, capture_output=True, cwd=c.work,
    )  # fmt: skip


def test_ir_cr_and_kur(cmp_station: Cmp) -> None:
    c = cmp_station
    genkey(c, "ir")
    done = c.mac(
        "-cmd", "ir", "-newkey", "ir.key", "-subject", "/O=company/OU=team/CN=cmp-ir-1/C=US",
        "-certout", "ir.pem", op="initialization",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    genkey(c, "cr")
    done = c.mac(
        "-cmd", "cr", "-newkey", "cr.key", "-subject", "/O=company/OU=team/CN=cmp-cr-1/C=US",
        "-certout", "cr.pem", op="certification",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    ir = x509.load_pem_x509_certificate((c.work / "ir.pem").read_bytes())
    cr = x509.load_pem_x509_certificate((c.work / "cr.pem").read_bytes())
    with c.ledger() as ledger:
        assert ledger.certificate(serial_hex(ir.serial_number)).device_id == "cmp-ir-1"
        assert ledger.certificate(serial_hex(cr.serial_number)).device_id == "cmp-cr-1"
        assert ledger.get_device("cmp-ir-1").state == "verified"  # certConf
    # kur: a new key, signed with the current certificate; the subject stays.
    genkey(c, "kur")
    done = c.client(
        "-cmd", "kur", "-cert", "ir.pem", "-key", "ir.key", "-newkey", "kur.key",
        "-certout", "kur.pem", op="keyupdate",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    kur = x509.load_pem_x509_certificate((c.work / "kur.pem").read_bytes())
    assert kur.subject == ir.subject
    # cr signed with the current certificate renews as well.
    genkey(c, "cr2")
    done = c.client(
        "-cmd", "cr", "-cert", "cr.pem", "-key", "cr.key", "-newkey", "cr2.key",
        "-subject", "/O=company/OU=team/CN=cmp-cr-1/C=US", "-certout", "cr2.pem",
        op="certification",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    cr2 = x509.load_pem_x509_certificate((c.work / "cr2.pem").read_bytes())
    with c.ledger() as ledger:
        assert ledger.certificate(serial_hex(ir.serial_number)).state == "superseded"
        assert ledger.get_device("cmp-ir-1").serial == serial_hex(kur.serial_number)
        assert ledger.certificate(serial_hex(cr.serial_number)).state == "superseded"
        assert ledger.get_device("cmp-cr-1").serial == serial_hex(cr2.serial_number)
        listed = {e.serial for e in ledger.whitelist()}
        assert (
            serial_hex(kur.serial_number) in listed and serial_hex(ir.serial_number) not in listed
        )


def _captured_ir(c: Cmp, name: str, device_id: str) -> bytes:
    """A real ir from openssl cmp, written with -reqout and sent nowhere (port 1)."""
    genkey(c, name)
    subprocess.run(
        ["openssl", "cmp", "-cmd", "ir", "-server", "127.0.0.1:1", "-path", "x",
         "-ref", "cmp-board", "-secret", f"pass:{c.token}", "-newkey", f"{name}.key",
         "-subject", f"/O=company/OU=team/CN={device_id}/C=US", "-reqout", f"{name}.der",
         "-certout", f"{name}.pem"],
        capture_output=True, cwd=c.work, timeout=60,
    )  # fmt: skip
    return (c.work / f"{name}.der").read_bytes()


def test_crmf_proof_of_possession_is_checked(cmp_station: Cmp) -> None:
    from pyasn1.codec.der import encoder as der_encoder

    from station import policy
    from station.enroll.crmf import CrmfRequest
    from station.errors import StationError

    c = cmp_station
    msg = cmp.decode(_captured_ir(c, "pop", "cmp-pop-1"))
    request = cmp.crmf_request(msg)
    assert request.is_signature_valid and request.subject.rfc4514_string() == (
        "C=US,CN=cmp-pop-1,OU=team,O=company"
    )
    policy.check_csr(request)
    # The same request with one bit of its POPO signature flipped.
    der = bytearray(request.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01
    forged = CrmfRequest.load(bytes(der))
    assert not forged.is_signature_valid
    with pytest.raises(StationError, match=r"^bad-signature: "):
        policy.check_csr(forged)
    # raVerified (no signature) is not a proof the station takes.
    pop = msg["body"]["ir"][0]["pop"]
    pop["raVerified"] = pop["raVerified"].clone("")
    unproved = CrmfRequest.load(bytes(der_encoder.encode(msg["body"]["ir"][0])))
    assert not unproved.is_signature_valid


def test_a_crmf_intent_left_by_a_crash_is_recovered(
    cmp_station: Cmp, ca_home: Path, tmp_path: Path
) -> None:
    """The intent stores the CRMF request; recovery loads it again and signs."""
    from station.ca import open_ca
    from station.enroll.crmf import CrmfRequest

    c = cmp_station
    request = cmp.crmf_request(cmp.decode(_captured_ir(c, "crash", "cmp-crash-1")))
    settings = settings_for(ca_home, tmp_path / "data")
    ca = open_ca(settings)
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "C", product="p", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
        )

        def crash(_cert: x509.Certificate) -> None:
            raise RuntimeError("killed between signature and commit")

        ledger.after_sign = crash
        with pytest.raises(RuntimeError):
            ledger.issue("C", "cmp-crash-1", request, ca)
        ledger.after_sign = None
        report = ledger.recover(ca)
        assert len(report.resigned) == 1 and not report.failed
        record = ledger.certificate(report.resigned[0])
        assert record.state == "issued" and record.device_id == "cmp-crash-1"
        cert = x509.load_pem_x509_certificate((record.pem or "").encode())
        assert cert.public_key() == request.public_key()
        assert isinstance(request, CrmfRequest)


def test_cmp_over_https(ca_home: Path, tmp_path: Path) -> None:
    """`openssl cmp -tls_used` against `station serve` with TLS: the same exchange."""
    settings = settings_for(ca_home, tmp_path / "data")
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "C", product="p", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
        )
        token = ledger.create_token("tls-board", "board")
    secrets_file = tmp_path / "cmp-secrets"
    secrets_file.write_text(f"tls-board {token}\n")
    os.chmod(secrets_file, 0o600)
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-out", "k.pem"],
        check=True, capture_output=True, cwd=work,
    )  # fmt: skip
    with serve(settings, STATION_CMP_SECRETS=str(secrets_file)) as served:
        assert served.ca_file is not None
        done = subprocess.run(
            ["openssl", "cmp", "-server", f"localhost:{served.port}", "-tls_used",
             "-tls_trusted", str(served.ca_file), "-path", ".well-known/cmp/p/C/initialization",
             "-trusted", str(settings.ca_cert_path), "-cmd", "ir", "-ref", "tls-board",
             "-secret", "env:TOKEN", "-newkey", "k.pem",
             "-subject", "/O=company/OU=team/CN=cmp-tls-1/C=US", "-certout", "c.pem"],
            capture_output=True, text=True, cwd=work, timeout=120,
            env={**os.environ, "TOKEN": token},
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    cert = x509.load_pem_x509_certificate((work / "c.pem").read_bytes())
    with Ledger.from_settings(settings) as ledger:
        assert ledger.get_device("cmp-tls-1").serial == serial_hex(cert.serial_number)


def test_a_secrets_file_others_may_read_is_refused(cmp_station: Cmp) -> None:
    c = cmp_station
    secrets_file = Path(c.settings.data_dir).parent / "cmp-secrets"
    csr(c, "perm", "cmp-perm-1")
    os.chmod(secrets_file, 0o644)
    try:
        done = c.mac("-cmd", "p10cr", "-csr", "perm.csr", "-certout", "perm.pem")
    finally:
        os.chmod(secrets_file, 0o600)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "PKIFailureInfo: systemUnavail" in out, out
    assert "cmp-secrets-not-private" in out
    done = c.mac("-cmd", "p10cr", "-csr", "perm.csr", "-certout", "perm.pem")
    assert done.returncode == 0, done.stdout + done.stderr


def test_rr_revokes_the_signers_own_certificate(cmp_station: Cmp) -> None:
    c = cmp_station
    for name in ("rv", "rv2"):
        csr(c, name, f"cmp-{name}-1")
        done = c.mac("-cmd", "p10cr", "-csr", f"{name}.csr", "-certout", f"{name}.pem")
        assert done.returncode == 0, done.stdout + done.stderr
    mine = x509.load_pem_x509_certificate((c.work / "rv.pem").read_bytes())
    sign = ["-cert", "rv.pem", "-key", "rv.key"]
    # Another board's certificate: refused, nothing revoked.
    done = c.client("-cmd", "rr", *sign, "-oldcert", "rv2.pem", op="revocation")
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "PKIFailureInfo: notAuthorized" in out, out
    # A board token (MAC) revokes nothing.
    done = c.mac("-cmd", "rr", "-oldcert", "rv.pem", op="revocation")
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "PKIFailureInfo: notAuthorized" in out, out
    with c.ledger() as ledger:
        assert ledger.get_device("cmp-rv2-1").state == "verified"
        assert ledger.get_device("cmp-rv-1").state == "verified"
    # Its own, signed with it: revoked and off the whitelist.
    done = c.client("-cmd", "rr", *sign, "-oldcert", "rv.pem", op="revocation")
    assert done.returncode == 0, done.stdout + done.stderr
    serial = serial_hex(mine.serial_number)
    with c.ledger() as ledger:
        assert ledger.certificate(serial).state == "revoked"
        assert ledger.get_device("cmp-rv-1").state == "revoked"
        assert serial not in {e.serial for e in ledger.whitelist()}
    done = c.client("-cmd", "rr", *sign, "-oldcert", "rv.pem", op="revocation")
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "PKIFailureInfo: certRevoked" in out, out


def test_a_renewal_under_another_batchs_label_is_refused(cmp_station: Cmp) -> None:
    """A board of batch C2 renews (kur, signed p10cr) and revokes under C2 only; under
    C's label: notAuthorized (renewal-other-batch), audited, nothing issued."""
    c = cmp_station
    genkey(c, "lb")
    done = c.mac(
        "-cmd", "ir", "-newkey", "lb.key", "-subject", "/O=company/OU=team/CN=cmp-label-1/C=US",
        "-certout", "lb.pem", label="C2", op="initialization",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    genkey(c, "lb2")
    csr(c, "lb3", "cmp-label-1")
    sign = ["-cert", "lb.pem", "-key", "lb.key"]
    attempts = [
        ("keyupdate", ["-cmd", "kur", *sign, "-newkey", "lb2.key", "-certout", "x.pem"]),
        ("pkcs10", ["-cmd", "p10cr", *sign, "-csr", "lb3.csr", "-certout", "x.pem"]),
        ("revocation", ["-cmd", "rr", *sign, "-oldcert", "lb.pem"]),
    ]
    for label in ("C", "NOPE"):
        for op, args in attempts:
            certs_before = count(c, certificates)
            refused_before = count(c, audit_log, audit_log.c.action == "cmp.refused")
            done = c.client(*args, label=label, op=op)
            out = done.stdout + done.stderr
            assert done.returncode != 0, (label, op, out)
            assert "PKIFailureInfo: notAuthorized" in out and "renewal-other-batch" in out, out
            assert not (c.work / "x.pem").exists()
            assert count(c, certificates) == certs_before
            assert count(c, audit_log, audit_log.c.action == "cmp.refused") == refused_before + 1
    first = x509.load_pem_x509_certificate((c.work / "lb.pem").read_bytes())
    with c.ledger() as ledger:
        device = ledger.get_device("cmp-label-1")
        assert device.serial == serial_hex(first.serial_number) and device.state == "verified"
    # Under its own batch's label: renewed.
    done = c.client(
        "-cmd", "kur", *sign, "-newkey", "lb2.key", "-certout", "lb2.pem",
        label="C2", op="keyupdate",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    renewed = x509.load_pem_x509_certificate((c.work / "lb2.pem").read_bytes())
    with c.ledger() as ledger:
        assert ledger.certificate(serial_hex(renewed.serial_number)).batch == "C2"


def test_a_see_rsa_board_does_not_renew_over_cmp(cmp_station: Cmp) -> None:
    """Its keys are the station's, pushed over the serial line: its own batch's label
    does not make CMP take it (cmp-key-mode, notAuthorized)."""
    from station.ca import open_ca
    from tests.csrs import device_name, make_csr, rsa_key

    c = cmp_station
    key = rsa_key()
    request, _ = make_csr(device_name("cmp-see-1"), key)
    with c.ledger() as ledger:
        issued = ledger.issue(
            "R", "cmp-see-1", request.public_bytes(serialization.Encoding.DER),
            open_ca(c.settings),
        )  # fmt: skip
    (c.work / "see.pem").write_bytes(issued.certificate.public_bytes(serialization.Encoding.PEM))
    (c.work / "see.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    csr(c, "see2", "cmp-see-1")
    done = c.client(
        "-cmd", "p10cr", "-cert", "see.pem", "-key", "see.key", "-csr", "see2.csr",
        "-certout", "see2.pem", label="R",
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "PKIFailureInfo: notAuthorized" in out, out
    assert "cmp-key-mode" in out
    with c.ledger() as ledger:
        assert len(ledger.certificates("cmp-see-1")) == 1
