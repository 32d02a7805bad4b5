"""EST (RFC 7030) over HTTPS with real clients: curl + openssl, and strongSwan's `pki --est`.

One `station serve` (TLS, client certificates optional) for the module; every
certificate a client gets must be one the ledger knows, renewals must show as a
succession in the ledger, and every kind of bad input gets EST's own answer
(a 4xx and a `code: message` line), issues nothing and is audited.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from station.enroll.est import parse_csr_attributes
from station.ledger import Ledger
from station.ledger.schema import audit_log, certificates
from station.settings import Settings
from station.whitelist import serial_hex
from tests.csrs import device_name, make_csr
from tests.fixtures.hsm import settings_for
from tests.serving import Served, serve

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


@dataclass
class Est:
    served: Served
    settings: Settings
    token: str
    work: Path

    @property
    def base(self) -> str:
        return f"{self.served.url}/.well-known/est"

    def ledger(self) -> Ledger:
        return Ledger.from_settings(self.settings)

    def curl(self, *args: str, binary: bool = False) -> subprocess.CompletedProcess[bytes]:
        assert self.served.ca_file is not None
        return subprocess.run(
            ["curl", "-sS", "--max-time", "30", "--cacert", str(self.served.ca_file), *args],
            capture_output=True,
            timeout=60,
            cwd=self.work,
        )

    def status(self, *args: str) -> tuple[int, str]:
        """(HTTP status, body) of a curl call."""
        done = self.curl("-w", "\n%{http_code}", *args)
        assert done.returncode == 0, done.stderr
        body, _, code = done.stdout.decode().rpartition("\n")
        return int(code), body


@pytest.fixture(scope="module")
def est(ca_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Est]:
    root = tmp_path_factory.mktemp("est")
    settings = settings_for(ca_home, root / "data")
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "E", product="p", planned_count=100, key_mode="board-ecc", subject_template=TEMPLATE
        )
        ledger.create_batch(
            "R", product="p", planned_count=5, key_mode="see-rsa", subject_template=TEMPLATE
        )
        ledger.create_batch(
            "E2", product="p", planned_count=10, key_mode="board-ecc", subject_template=TEMPLATE
        )
        token = ledger.create_token("est-board", "board")
        ledger.create_token("est-qa", "qa")
    work = root / "work"
    work.mkdir()
    with serve(settings, STATION_EST_DEFAULT_BATCH="E") as served:
        yield Est(served, settings, token, work)


def openssl(*args: str, cwd: Path, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *args], capture_output=True, cwd=cwd, input=stdin, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def openssl_csr(est: Est, name: str, device_id: str) -> None:
    """name.key and name.b64 (base64 DER PKCS#10), made by the openssl CLI."""
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-subj", f"/O=company/OU=team/CN={device_id}/C=US",
        "-outform", "DER", "-out", f"{name}.der", cwd=est.work,
    )  # fmt: skip
    openssl("base64", "-in", f"{name}.der", "-out", f"{name}.b64", cwd=est.work)


def certs_of(est: Est, pkcs7_b64: bytes) -> list[x509.Certificate]:
    """The certificates of a base64 certs-only answer, as `openssl pkcs7` prints them."""
    der = openssl("base64", "-d", cwd=est.work, stdin=pkcs7_b64)
    pem = openssl("pkcs7", "-inform", "DER", "-print_certs", cwd=est.work, stdin=der)
    return x509.load_pem_x509_certificates(pem)


def count(est: Est, table: object, *where: object) -> int:
    with est.ledger() as ledger, ledger.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar())


# --------------------------------------------------------------------- curl + openssl


def test_cacerts_and_csrattrs(est: Est) -> None:
    for path in ("/E/cacerts", "/cacerts"):
        done = est.curl("-D", "headers.txt", est.base + path)
        assert done.returncode == 0, done.stderr
        headers = (est.work / "headers.txt").read_text().lower()
        assert "content-type: application/pkcs7-mime" in headers
        certs = certs_of(est, done.stdout)
        ca = x509.load_pem_x509_certificate(est.settings.ca_cert_path.read_bytes())
        assert certs == [ca]
    done = est.curl(est.base + "/E/csrattrs")
    assert done.returncode == 0
    der = base64.b64decode(done.stdout)
    printed = openssl("asn1parse", "-inform", "DER", cwd=est.work, stdin=der).decode()
    for name in ("ecdsa-with-SHA256", "id-ecPublicKey", "prime256v1", "commonName"):
        assert name in printed
    assert "2.5.4.3" in parse_csr_attributes(der)


def test_enrol_verify_and_renew_with_curl(est: Est) -> None:
    openssl_csr(est, "c1", "est-curl-1")
    done = est.curl(
        "-D", "h.txt", "-u", f"anyone:{est.token}", "-H", "Content-Type: application/pkcs10",
        "--data-binary", "@c1.b64", est.base + "/E/simpleenroll",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    headers = (est.work / "h.txt").read_text().lower()
    assert headers.startswith("http/1.1 200"), headers
    assert "application/pkcs7-mime; smime-type=certs-only" in headers
    [cert] = certs_of(est, done.stdout)
    (est.work / "c1.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    openssl("verify", "-CAfile", str(est.settings.ca_cert_path), "c1.pem", cwd=est.work)
    serial = serial_hex(cert.serial_number)
    with est.ledger() as ledger:
        record = ledger.certificate(serial)
        assert record.device_id == "est-curl-1" and record.batch == "E"
        assert record.fingerprint == cert.fingerprint(hashes.SHA256()).hex()
        assert ledger.get_device("est-curl-1").state == "issued"
        assert serial not in {e.serial for e in ledger.whitelist()}

    # The board uses its certificate as a TLS client certificate: verified, whitelisted.
    done = est.curl("--cert", "c1.pem", "--key", "c1.key", est.base + "/E/cacerts")
    assert done.returncode == 0, done.stderr
    with est.ledger() as ledger:
        assert ledger.get_device("est-curl-1").state == "verified"
        assert serial in {e.serial for e in ledger.whitelist()}

    # Renewal: the current certificate authenticates, a new key, the same subject.
    openssl_csr(est, "c1b", "est-curl-1")
    done = est.curl(
        "--cert", "c1.pem", "--key", "c1.key", "-H", "Content-Type: application/pkcs10",
        "--data-binary", "@c1b.b64", est.base + "/E/simplereenroll",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [renewed] = certs_of(est, done.stdout)
    new_serial = serial_hex(renewed.serial_number)
    assert new_serial != serial and renewed.subject == cert.subject
    (est.work / "c1b.pem").write_bytes(renewed.public_bytes(serialization.Encoding.PEM))
    with est.ledger() as ledger:
        assert ledger.certificate(serial).state == "superseded"
        assert ledger.certificate(new_serial).state == "issued"
        device = ledger.get_device("est-curl-1")
        assert device.state == "verified" and device.serial == new_serial
        listed = {e.serial for e in ledger.whitelist()}
        assert new_serial in listed and serial not in listed
        assert ledger.audit_verify() is None

    # The superseded certificate no longer renews anything.
    openssl_csr(est, "c1c", "est-curl-1")
    code, body = est.status(
        "--cert", "c1.pem", "--key", "c1.key", "-H", "Content-Type: application/pkcs10",
        "--data-binary", "@c1c.b64", est.base + "/E/simplereenroll",
    )  # fmt: skip
    assert code == 403 and body.startswith("est-certificate-not-live:"), body


def test_a_board_whose_renewal_never_reached_it_renews_again_with_its_old_certificate(
    est: Est,
) -> None:
    """A renewal intent a crash left is recovered unconfirmed: the board never got the
    new certificate and still holds the old one (``renewing``, whitelisted). Its next
    simplereenroll with that certificate renews again; the stranded one is revoked."""
    from station.ca import open_ca

    openssl_csr(est, "s1", "est-stranded-1")
    done = est.curl(
        "-u", f"x:{est.token}", "-H", "Content-Type: application/pkcs10",
        "--data-binary", "@s1.b64", est.base + "/E/simpleenroll",
    )  # fmt: skip
    [cert] = certs_of(est, done.stdout)
    (est.work / "s1.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    old = serial_hex(cert.serial_number)
    assert est.curl("--cert", "s1.pem", "--key", "s1.key", est.base + "/E/cacerts").returncode == 0
    # The stranded renewal: issued, never confirmed, never delivered.
    other = ec.generate_private_key(ec.SECP256R1())
    stranded_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(cert.subject)
        .sign(other, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    with est.ledger() as ledger:
        stranded = ledger.issue(
            "E", "est-stranded-1", stranded_csr, open_ca(est.settings), renews=old,
            confirm_later=True,
        ).serial  # fmt: skip
        assert ledger.certificate(old).state == "renewing"

    openssl_csr(est, "s1b", "est-stranded-1")
    done = est.curl(
        "--cert", "s1.pem", "--key", "s1.key", "-H", "Content-Type: application/pkcs10",
        "--data-binary", "@s1b.b64", est.base + "/E/simplereenroll",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [renewed] = certs_of(est, done.stdout)
    new = serial_hex(renewed.serial_number)
    with est.ledger() as ledger:
        assert ledger.certificate(old).state == "superseded"
        assert ledger.certificate(stranded).state == "revoked"
        assert ledger.certificate(new).state == "issued"
        assert {e.serial for e in ledger.whitelist()} & {old, stranded, new} == {new}


# ----------------------------------------------------------------- strongSwan pki --est


def pki(est: Est, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["pki", *args], capture_output=True, cwd=est.work, timeout=120)


def test_pki_est_enrol_and_reenrol(est: Est) -> None:
    assert est.served.ca_file is not None
    dn = "O=company, OU=team, CN=est-pki-1, C=US"
    for name in ("p1", "p2"):
        (est.work / f"{name}.key").write_bytes(
            pki(est, "--gen", "--type", "ecdsa", "--size", "256", "--outform", "pem").stdout
        )
        req = pki(est, "--req", "--in", f"{name}.key", "--type", "priv", "--dn", dn)
        assert req.returncode == 0, req.stderr
        (est.work / f"{name}.req").write_bytes(req.stdout)
    trust = ["--cacert", str(est.served.ca_file), "--cacert", str(est.settings.ca_cert_path)]
    # pki --est appends /.well-known/est/simpleenroll to the URL: the default batch.
    enrol = pki(
        est, "--est", "--url", est.served.url, *trust, "--in", "p1.req",
        "--userpass", f"pki:{est.token}", "--outform", "pem",
    )  # fmt: skip
    assert enrol.returncode == 0, enrol.stderr.decode()
    first = x509.load_pem_x509_certificate(enrol.stdout)
    (est.work / "p1.pem").write_bytes(enrol.stdout)
    with est.ledger() as ledger:
        assert ledger.certificate(serial_hex(first.serial_number)).device_id == "est-pki-1"

    renew = pki(
        est, "--est", "--url", est.served.url, *trust, "--in", "p2.req",
        "--cert", "p1.pem", "--key", "p1.key", "--outform", "pem",
    )  # fmt: skip
    assert renew.returncode == 0, renew.stderr.decode()
    second = x509.load_pem_x509_certificate(renew.stdout)
    with est.ledger() as ledger:
        assert ledger.certificate(serial_hex(first.serial_number)).state == "superseded"
        device = ledger.get_device("est-pki-1")
        assert device.serial == serial_hex(second.serial_number)
        assert device.state == "verified"

    cacerts = pki(est, "--estca", "--url", est.served.url, *trust, "--outform", "pem")
    assert cacerts.returncode == 0, cacerts.stderr.decode()
    assert x509.load_pem_x509_certificate(cacerts.stdout) == x509.load_pem_x509_certificate(
        est.settings.ca_cert_path.read_bytes()
    )

    # A wrong board token: pki --est reports the server's 401 and writes nothing.
    bad = pki(
        est, "--est", "--url", est.served.url, *trust, "--in", "p2.req",
        "--userpass", "pki:not-a-token", "--outform", "pem",
    )  # fmt: skip
    assert bad.returncode != 0 and b"401" in bad.stderr and not bad.stdout


# ------------------------------------------------------------------------ bad input


def _csr_b64(device_id: str, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    csr, _ = make_csr(device_name(device_id), key)
    return base64.b64encode(csr.public_bytes(serialization.Encoding.DER))


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("no-auth", 401, "unauthorized"),
        ("wrong-token", 401, "unauthorized"),
        ("qa-token", 403, "forbidden"),
        ("content-type", 415, "est-media-type"),
        ("not-base64", 400, "est-malformed"),
        ("bad-der", 422, "malformed-csr"),
        ("no-cn", 422, "est-no-device-id"),
        ("wrong-subject", 422, "subject-mismatch"),
        ("unknown-batch", 404, "unknown-batch"),
        ("see-rsa-batch", 403, "est-key-mode"),
        ("reenrol-without-certificate", 401, "est-no-client-certificate"),
    ],
)
def test_bad_input_gets_an_est_error_and_is_audited(
    est: Est, case: str, status: int, code: str
) -> None:
    body = _csr_b64(f"bad-{case}")
    path = "/E/simpleenroll"
    auth = ["-u", f"x:{est.token}"]
    ctype = "application/pkcs10"
    if case == "no-auth":
        auth = []
    elif case == "wrong-token":
        auth = ["-u", "x:nope"]
    elif case == "qa-token":
        with est.ledger() as ledger:
            auth = ["-u", f"x:{ledger.create_token(f'qa-{case}', 'qa')}"]
    elif case == "content-type":
        ctype = "application/json"
    elif case == "not-base64":
        body = b"{not base64!}"
    elif case == "bad-der":
        body = base64.b64encode(b"\x30\x82\xff\xff garbage")
    elif case == "no-cn":
        from tests.csrs import name

        csr, _ = make_csr(name(O="company"))
        body = base64.b64encode(csr.public_bytes(serialization.Encoding.DER))
    elif case == "wrong-subject":
        from tests.csrs import name

        csr, _ = make_csr(name(O="other", OU="team", CN="bad-wrong-subject", C="US"))
        body = base64.b64encode(csr.public_bytes(serialization.Encoding.DER))
    elif case == "unknown-batch":
        path = "/NOPE/simpleenroll"
    elif case == "see-rsa-batch":
        path = "/R/simpleenroll"
    elif case == "reenrol-without-certificate":
        path = "/E/simplereenroll"
    (est.work / f"{case}.b64").write_bytes(body)
    refused_before = count(est, audit_log, audit_log.c.action == "est.refused")
    certs_before = count(est, certificates)
    got, text = est.status(
        *auth, "-H", f"Content-Type: {ctype}", "--data-binary", f"@{case}.b64", est.base + path
    )
    assert got == status, text
    assert text.startswith(f"{code}: "), text
    assert count(est, certificates) == certs_before  # nothing issued, no intent
    assert count(est, audit_log, audit_log.c.action == "est.refused") == refused_before + 1
    if status == 401 and case != "reenrol-without-certificate":
        done = est.curl("-D", "-", "-o", "/dev/null", "-X", "POST", est.base + path)
        assert b'www-authenticate: basic realm="station est"' in done.stdout.lower()


def test_oversized_body_is_refused(est: Est) -> None:
    (est.work / "big.b64").write_bytes(b"A" * 200_000)
    got, _ = est.status(
        "-u", f"x:{est.token}", "-H", "Content-Type: application/pkcs10",
        "--data-binary", "@big.b64", est.base + "/E/simpleenroll",
    )  # fmt: skip
    assert got == 413


def test_reenrol_refusals(est: Est) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (est.work / "r.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (est.work / "r.b64").write_bytes(_csr_b64("est-r-1", key))
    done = est.curl(
        "-u", f"x:{est.token}", "-H", "Content-Type: application/pkcs10",
        "--data-binary", "@r.b64", est.base + "/E/simpleenroll",
    )  # fmt: skip
    [cert] = certs_of(est, done.stdout)
    (est.work / "r.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls = ["--cert", "r.pem", "--key", "r.key", "-H", "Content-Type: application/pkcs10"]
    # The same key again: a renewal needs a new one.
    got, text = est.status(*tls, "--data-binary", "@r.b64", est.base + "/E/simplereenroll")
    assert got == 409 and text.startswith("renewal-same-key:"), text
    # Another subject than the current certificate's.
    (est.work / "r2.b64").write_bytes(_csr_b64("est-r-other"))
    got, text = est.status(*tls, "--data-binary", "@r2.b64", est.base + "/E/simplereenroll")
    assert got == 409 and text.startswith("est-subject-mismatch:"), text
    with est.ledger() as ledger:
        assert ledger.certificate(serial_hex(cert.serial_number)).state == "issued"
        assert len(ledger.certificates("est-r-1")) == 1


# -------------------------------------------------------------- the label of a renewal


def test_a_renewal_under_another_batchs_label_is_refused(est: Est) -> None:
    """A board of batch E2 renews under E2 or without a label (its own batch), never
    under E's label: 403 renewal-other-batch, audited, nothing issued."""
    openssl_csr(est, "lb", "est-label-1")
    done = est.curl(
        "-u", f"x:{est.token}", "-H", "Content-Type: application/pkcs10",
        "--data-binary", "@lb.b64", est.base + "/E2/simpleenroll",
    )  # fmt: skip
    [cert] = certs_of(est, done.stdout)
    (est.work / "lb.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    openssl_csr(est, "lb2", "est-label-1")
    tls = ["--cert", "lb.pem", "--key", "lb.key", "-H", "Content-Type: application/pkcs10"]
    refused_before = count(est, audit_log, audit_log.c.action == "est.refused")
    certs_before = count(est, certificates)
    got, text = est.status(*tls, "--data-binary", "@lb2.b64", est.base + "/E/simplereenroll")
    assert got == 403 and text.startswith("renewal-other-batch: "), text
    assert count(est, certificates) == certs_before
    assert count(est, audit_log, audit_log.c.action == "est.refused") == refused_before + 1
    # A label that names no batch is another batch too: the same answer, not a 404.
    got, text = est.status(*tls, "--data-binary", "@lb2.b64", est.base + "/NOPE/simplereenroll")
    assert got == 403 and text.startswith("renewal-other-batch: "), text
    with est.ledger() as ledger:
        assert ledger.get_device("est-label-1").serial == serial_hex(cert.serial_number)

    # Without a label (strongSwan's pki --est cannot send one): the board's own batch,
    # whatever STATION_EST_DEFAULT_BATCH says (E here).
    assert est.served.ca_file is not None
    (est.work / "lb3.key").write_bytes(
        pki(est, "--gen", "--type", "ecdsa", "--size", "256", "--outform", "pem").stdout
    )
    req = pki(est, "--req", "--in", "lb3.key", "--type", "priv",
              "--dn", "O=company, OU=team, CN=est-label-1, C=US")  # fmt: skip
    (est.work / "lb3.req").write_bytes(req.stdout)
    trust = ["--cacert", str(est.served.ca_file), "--cacert", str(est.settings.ca_cert_path)]
    renew = pki(
        est, "--est", "--url", est.served.url, *trust, "--in", "lb3.req",
        "--cert", "lb.pem", "--key", "lb.key", "--outform", "pem",
    )  # fmt: skip
    assert renew.returncode == 0, renew.stderr.decode()
    renewed = x509.load_pem_x509_certificate(renew.stdout)
    (est.work / "lb3.pem").write_bytes(renew.stdout)
    with est.ledger() as ledger:
        record = ledger.certificate(serial_hex(renewed.serial_number))
        assert record.batch == "E2" and record.device_id == "est-label-1"
        assert ledger.certificate(serial_hex(cert.serial_number)).state == "superseded"
    # And under its own label, with curl.
    openssl_csr(est, "lb4", "est-label-1")
    got, text = est.status(
        "--cert", "lb3.pem", "--key", "lb3.key", "-H", "Content-Type: application/pkcs10",
        "--data-binary", "@lb4.b64", est.base + "/E2/simplereenroll",
    )  # fmt: skip
    assert got == 200, text


def test_an_unlabelled_renewal_keeps_the_key_mode_rule(est: Est, tmp_path: Path) -> None:
    """A see-rsa board's keys are the station's (serial line): no EST renewal, with
    or without a label."""
    from station.ca import open_ca
    from tests.csrs import rsa_key

    key = rsa_key()
    csr, _ = make_csr(device_name("est-see-1"), key)
    with est.ledger() as ledger:
        issued = ledger.issue("R", "est-see-1", csr_der_of(csr), open_ca(est.settings))
    (est.work / "see.pem").write_bytes(issued.certificate.public_bytes(serialization.Encoding.PEM))
    (est.work / "see.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (est.work / "see2.b64").write_bytes(_csr_b64("est-see-1"))
    tls = ["--cert", "see.pem", "--key", "see.key", "-H", "Content-Type: application/pkcs10"]
    for path in ("/simplereenroll", "/R/simplereenroll"):
        got, text = est.status(*tls, "--data-binary", "@see2.b64", est.base + path)
        assert got == 403 and text.startswith("est-key-mode: "), (path, text)
    with est.ledger() as ledger:
        assert len(ledger.certificates("est-see-1")) == 1


def csr_der_of(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)
