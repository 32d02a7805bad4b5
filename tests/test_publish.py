"""CRL and OCSP: signed in the token, read by real relying parties (openssl, mosquitto)."""

from __future__ import annotations

import base64
import datetime as dt
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from pkcs11 import Mechanism

from api.app import create_app
from station.ca import CertificateAuthority
from station.errors import StationError
from station.ledger import Ledger
from station.line.broker import MosquittoBroker, free_port
from station.publish import crl as crls
from station.publish.ocsp import Responder
from station.publish.revoked import reason_flag, serial_status
from station.settings import Settings
from tests.test_ledger import TEMPLATE, make_csr

# RFC 5019 CertIDs hash with SHA-1 (an identifier, not a signature): what openssl sends.
CERT_ID_HASH = hashes.SHA1()  # noqa: S303


class Board:
    def __init__(self, device_id: str, cert: x509.Certificate, key: object) -> None:
        self.device_id, self.cert, self.key = device_id, cert, key

    def files(self, ca: CertificateAuthority, directory: Path) -> tuple[Path, Path, Path]:
        """(certificate, chain as installed on the board, key)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert = directory / f"{self.device_id}.pem"
        cert.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        chain = directory / f"{self.device_id}-chain.pem"
        chain.write_bytes(ca.chain_for(self.cert))
        key = directory / f"{self.device_id}.key"
        key.write_bytes(
            self.key.private_bytes(  # type: ignore[attr-defined]
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key.chmod(0o644)  # mosquitto_pub runs as us, but keep the broker dir readable
        return cert, chain, key


def provision(ledger: Ledger, ca: CertificateAuthority, device_id: str, batch: str = "P") -> Board:
    csr, key = make_csr(device_id)
    result = ledger.issue(batch, device_id, csr, ca)
    ledger.mark_verified(device_id)
    return Board(device_id, result.certificate, key)


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with Ledger(ledger_url, "test-station", backdate_seconds=60) as led:
        led.create_batch(
            "P", product="p", planned_count=50, key_mode="board-ecc", subject_template=TEMPLATE
        )
        yield led


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=60, check=False
    )


# --------------------------------------------------------------------------- the token signs


def test_crl_and_ocsp_builders_call_the_token_signer(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """cryptography's CRL and OCSP builders take the HSM key class as CertificateBuilder
    does: guards the pinned cryptography range like tests/test_hsm.py's builder test."""
    calls: list[bytes] = []
    original = ca.key._ref

    class Spy:
        def sign(self, data: bytes, mechanism: Mechanism) -> bytes:
            calls.append(data)
            return original.sign(data, mechanism)

    ca.key._ref = Spy()  # type: ignore[assignment]
    try:
        now = dt.datetime.now(dt.UTC)
        crl = crls.build_crl(ca, [], number=1, this_update=now)
        assert len(calls) == 1 and len(calls[0]) == 32  # a SHA-256 digest went to CKM_ECDSA
        assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]

        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(ca.certificate, ca.certificate, CERT_ID_HASH)
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        with Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}", "test-station") as led:
            answer = Responder(led.engine, ca).respond(request)
        response = ocsp.load_der_ocsp_response(answer)
        assert len(calls) == 2
        assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert response.certificate_status == ocsp.OCSPCertStatus.UNKNOWN
        ca.certificate.public_key().verify(  # type: ignore[call-arg]
            response.signature,
            response.tbs_response_bytes,
            ec.ECDSA(response.signature_hash_algorithm),  # type: ignore[arg-type]
        )
    finally:
        ca.key._ref = original


# --------------------------------------------------------------------------- CRL


def test_crl_profile_and_openssl_verification(
    ledger: Ledger, ca: CertificateAuthority, tmp_path: Path
) -> None:
    live = provision(ledger, ca, "live-1")
    stolen = provision(ledger, ca, "stolen-1")
    ledger.revoke("stolen-1", "key-compromise")
    retired = provision(ledger, ca, "retired-1")
    ledger.revoke("retired-1", "decommissioned by QA")  # no reason code: none is written

    made = crls.current(ledger.engine, ca, "test-station")
    crl = x509.load_der_x509_crl(made.der)
    assert made.number == 1 and made.revoked_count == 2
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert crl.issuer == ca.certificate.subject
    assert crl.next_update_utc is not None and crl.next_update_utc > crl.last_update_utc
    entry = crl.get_revoked_certificate_by_serial_number(stolen.cert.serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    other = crl.get_revoked_certificate_by_serial_number(retired.cert.serial_number)
    assert other is not None and len(other.extensions) == 0
    assert crl.get_revoked_certificate_by_serial_number(live.cert.serial_number) is None

    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(ca.chain_pem)
    crl_pem = tmp_path / "crl.pem"
    crl_pem.write_bytes(made.pem)
    checked = openssl("crl", "-in", str(crl_pem), "-CAfile", str(ca_pem), "-noout")
    assert checked.returncode == 0 and "verify OK" in checked.stderr + checked.stdout, checked

    for board, ok in ((live, True), (stolen, False), (retired, False)):
        cert, _, _ = board.files(ca, tmp_path / "boards")
        done = openssl(
            "verify", "-crl_check", "-CAfile", str(ca_pem), "-CRLfile", str(crl_pem), str(cert)
        )
        if ok:
            assert done.returncode == 0, done.stderr + done.stdout
        else:
            assert done.returncode != 0 and "certificate revoked" in done.stderr + done.stdout

    # a CRL from another key does not verify against the CA
    other_key = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(dt.datetime.now(dt.UTC))
        .next_update(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        .sign(other_key, hashes.SHA256())
    )
    crl_pem.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    refused = openssl("crl", "-in", str(crl_pem), "-CAfile", str(ca_pem), "-noout")
    assert "verify OK" not in refused.stderr + refused.stdout


def test_crl_is_made_again_on_revocation_and_before_next_update(
    ledger: Ledger, ca: CertificateAuthority
) -> None:
    provision(ledger, ca, "a-1")
    first = crls.current(ledger.engine, ca, "test-station")
    assert crls.current(ledger.engine, ca, "test-station") == first  # reused: no signature
    ledger.revoke("a-1", "superseded")
    second = crls.current(ledger.engine, ca, "test-station")
    assert second.number == first.number + 1 and second.revoked_count == 1
    # more than half its validity gone: a new one, whatever the revocations
    old = crls.generate(
        ledger.engine,
        ca,
        "test-station",
        validity=dt.timedelta(hours=2),
        now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1, minutes=1),
    )
    third = crls.current(ledger.engine, ca, "test-station")
    assert third.number == old.number + 1
    assert third.this_update > old.this_update


def test_reason_codes_from_the_ledger_text() -> None:
    assert reason_flag("key-compromise") == x509.ReasonFlags.key_compromise
    assert reason_flag("keyCompromise") == x509.ReasonFlags.key_compromise
    assert reason_flag("Cessation of operation") == x509.ReasonFlags.cessation_of_operation
    assert reason_flag("reprovisioned") == x509.ReasonFlags.superseded
    assert reason_flag("stolen from the line") is None
    assert reason_flag("unspecified") is None  # RFC 5280: leave the extension out
    assert reason_flag("removeFromCRL") is None  # delta CRLs only


def test_mosquitto_with_the_crl_refuses_the_revoked_board_and_accepts_a_live_one(
    station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    with Ledger.from_settings(station_settings) as led:
        led.create_batch(
            "P", product="p", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
        )
        live, revoked = provision(led, ca, "mq-live"), provision(led, ca, "mq-revoked")
        led.revoke("mq-revoked", "key-compromise")
        made = crls.current(led.engine, ca, station_settings.station_id)
    _, live_chain, live_key = live.files(ca, tmp_path / "b")
    _, bad_chain, bad_key = revoked.files(ca, tmp_path / "b")

    with MosquittoBroker(ca.chain_pem) as without_crl:  # the broker alone lets it in
        assert without_crl.publish(bad_chain, bad_key, client_id="mq-revoked").returncode == 0
    with MosquittoBroker(ca.chain_pem, crl_pem=made.pem) as broker:
        done = broker.publish(live_chain, live_key, client_id="mq-live")
        assert done.returncode == 0, done.stderr
        refused = broker.publish(bad_chain, bad_key, client_id="mq-revoked")
        assert refused.returncode != 0
        # the same chain that got in without the CRL: refused in the TLS handshake (the
        # broker writes its log line on its own time: wait for it, a loaded machine
        # reads the log before mosquitto flushed it)
        deadline = time.monotonic() + 10
        while "certificate verify failed" not in broker.log.read_text():
            assert time.monotonic() < deadline, broker.log.read_text()
            time.sleep(0.05)


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture
def served(station_settings: Settings) -> Iterator[str]:
    """The station's app under a real uvicorn on 127.0.0.1 (a thread of this process)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(station_settings), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_get_crl_is_public_der_with_etag_and_last_modified(
    served: str, station_settings: Settings, ca: CertificateAuthority
) -> None:
    with Ledger.from_settings(station_settings) as led:
        led.create_batch(
            "P", product="p", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
        )
        board = provision(led, ca, "http-1")
        first = httpx.get(served + "/crl", timeout=30)
        assert first.status_code == 200
        assert first.headers["content-type"] == "application/pkix-crl"
        crl = x509.load_der_x509_crl(first.content)
        assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
        assert len(crl) == 0
        etag, modified = first.headers["etag"], first.headers["last-modified"]
        assert modified.endswith("GMT")
        again = httpx.get(served + "/crl", headers={"If-None-Match": etag}, timeout=30)
        assert again.status_code == 304 and again.content == b""

        led.revoke("http-1", "key-compromise")
        after = httpx.get(served + "/crl", headers={"If-None-Match": etag}, timeout=30)
    assert after.status_code == 200 and after.headers["etag"] != etag
    listed = x509.load_der_x509_crl(after.content)
    assert listed.get_revoked_certificate_by_serial_number(board.cert.serial_number) is not None


def _ocsp_status(out: str, cert: Path) -> str:
    for line in out.splitlines():
        if line.startswith(f"{cert}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(out)


def test_openssl_ocsp_gets_good_revoked_and_unknown(
    served: str, station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    with Ledger.from_settings(station_settings) as led:
        led.create_batch(
            "P", product="p", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
        )
        live, stolen = provision(led, ca, "ocsp-live"), provision(led, ca, "ocsp-stolen")
        led.revoke("ocsp-stolen", "key-compromise")
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(ca.chain_pem)
    live_cert, _, _ = live.files(ca, tmp_path / "b")
    stolen_cert, _, _ = stolen.files(ca, tmp_path / "b")
    # a certificate with the CA's name but a serial the station never issued
    stranger = tmp_path / "b" / "stranger.pem"
    stranger.write_bytes(
        x509.CertificateBuilder()
        .subject_name(live.cert.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(live.cert.public_key())
        .serial_number(12345)
        .not_valid_before(live.cert.not_valid_before_utc)
        .not_valid_after(live.cert.not_valid_after_utc)
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )

    def ask(cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return openssl(
            "ocsp", "-issuer", str(ca_pem), "-cert", str(cert), "-url", served + "/ocsp",
            "-CAfile", str(ca_pem), "-resp_text", *extra,
        )  # fmt: skip

    good = ask(live_cert)
    assert good.returncode == 0, good.stderr
    assert "Response verify OK" in good.stderr
    assert _ocsp_status(good.stdout, live_cert) == "good"

    revoked = ask(stolen_cert)
    assert "Response verify OK" in revoked.stderr
    assert _ocsp_status(revoked.stdout, stolen_cert) == "revoked"
    assert "Reason: keyCompromise" in revoked.stdout
    assert "Revocation Time:" in revoked.stdout
    assert "OCSP Nonce:" in revoked.stdout  # openssl sends a nonce and checks it came back

    unknown = ask(stranger)
    assert _ocsp_status(unknown.stdout, stranger) == "unknown"

    # The GET form (RFC 6960 A.1), without a nonce.
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(stolen.cert, ca.certificate, CERT_ID_HASH)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    got = httpx.get(served + "/ocsp/" + base64.b64encode(request).decode(), timeout=30)
    assert got.headers["content-type"] == "application/ocsp-response"
    answer = ocsp.load_der_ocsp_response(got.content)
    assert answer.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert answer.revocation_reason == x509.ReasonFlags.key_compromise
    assert answer.serial_number == stolen.cert.serial_number


def test_ocsp_answers_garbage_and_other_issuers_with_ocsp_errors(
    served: str, ca: CertificateAuthority
) -> None:
    def post(body: bytes) -> ocsp.OCSPResponse:
        r = httpx.post(
            served + "/ocsp",
            content=body,
            headers={"Content-Type": "application/ocsp-request"},
            timeout=30,
        )
        assert r.status_code == 200 and r.headers["content-type"] == "application/ocsp-response"
        return ocsp.load_der_ocsp_response(r.content)

    assert post(b"").response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert post(b"\x30\x03junk").response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert post(b"x" * 10_000).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    huge = httpx.post(served + "/ocsp", content=b"x" * 100_000, timeout=30)
    assert huge.status_code == 413  # the station's body limit, as a problem+json
    bad_get = httpx.get(served + "/ocsp/%%%not-base64", timeout=30)
    assert bad_get.status_code == 200
    assert (
        ocsp.load_der_ocsp_response(bad_get.content).response_status
        == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    )
    other_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "other CA")])
    now = dt.datetime.now(dt.UTC)
    other = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(other_key.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(other_key, hashes.SHA256())
    )
    foreign = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(other, other, CERT_ID_HASH)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    assert post(foreign).response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    # The same extension twice: cryptography raises DuplicateExtension (not a
    # ValueError) reading it; that was a 500 from a public route (found in review).
    from pyasn1.codec.der import decoder, encoder
    from pyasn1_modules import rfc2560

    once = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(other, other, CERT_ID_HASH)
        .add_extension(x509.OCSPNonce(b"\x01" * 16), critical=False)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    request, _ = decoder.decode(once, asn1Spec=rfc2560.OCSPRequest())
    extensions = request["tbsRequest"]["requestExtensions"]
    extensions.append(extensions[0])
    assert post(encoder.encode(request)).response_status == (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    )


def test_pkilint_finds_nothing_in_the_crl(
    ledger: Ledger, ca: CertificateAuthority, tmp_path: Path
) -> None:
    provision(ledger, ca, "lint-live")
    provision(ledger, ca, "lint-stolen")
    ledger.revoke("lint-stolen", "key-compromise")
    provision(ledger, ca, "lint-other")
    ledger.revoke("lint-other", "no reason code for this text")
    path = tmp_path / "crl.der"
    path.write_bytes(crls.current(ledger.engine, ca, "test-station").der)
    lint = Path(sys.executable).parent / "lint_crl"
    done = subprocess.run(
        [str(lint), "lint", "-t", "CRL", "-p", "PKIX", "-s", "INFO", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr

    # the linter does look: a CRL without CRL number and AKI is reported
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    bare = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(bare.public_bytes(serialization.Encoding.DER))
    flagged = subprocess.run(
        [str(lint), "lint", "-t", "CRL", "-p", "PKIX", "-s", "INFO", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "crl_number" in flagged.stdout.lower() or "crlnumber" in flagged.stdout.lower(), (
        flagged.stdout
    )


# --------------------------------------------------------------------------- per-batch URLs


def test_a_batchs_crl_and_ocsp_urls_reach_relying_parties(
    served: str, station_settings: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """openssl finds the CRL and the responder from the device certificate alone."""
    with Ledger.from_settings(station_settings) as led:
        led.create_batch(
            "P", product="p", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
        )
        led.create_batch(
            "U",
            product="p",
            planned_count=5,
            key_mode="board-ecc",
            subject_template=TEMPLATE,
            crl_url=served + "/crl",
            ocsp_url=served + "/ocsp",
        )
        assert led.get_batch("U").crl_url == served + "/crl"
        board = provision(led, ca, "url-1", batch="U")
        led.revoke("url-1", "key-compromise")
        plain = provision(led, ca, "url-2")  # batch P has no URLs
    cdp = board.cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for n in cdp[0].full_name or []] == [served + "/crl"]
    aia = board.cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [(d.access_method, d.access_location.value) for d in aia] == [
        (x509.AuthorityInformationAccessOID.OCSP, served + "/ocsp")
    ]
    for ext in (x509.CRLDistributionPoints, x509.AuthorityInformationAccess):
        with pytest.raises(x509.ExtensionNotFound):
            plain.cert.extensions.get_extension_for_class(ext)

    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(ca.chain_pem)
    cert, _, _ = board.files(ca, tmp_path / "b")
    fetched = openssl("verify", "-crl_check", "-crl_download", "-CAfile", str(ca_pem), str(cert))
    assert fetched.returncode != 0 and "certificate revoked" in fetched.stderr + fetched.stdout
    uri = openssl("x509", "-in", str(cert), "-noout", "-ocsp_uri").stdout.strip()
    assert uri == served + "/ocsp"
    asked = openssl(
        "ocsp", "-issuer", str(ca_pem), "-cert", str(cert), "-url", uri, "-CAfile", str(ca_pem)
    )
    assert "Response verify OK" in asked.stderr
    assert _ocsp_status(asked.stdout, cert) == "revoked"


def test_a_recovered_intent_keeps_its_batchs_urls(ledger: Ledger, ca: CertificateAuthority) -> None:
    ledger.create_batch(
        "U",
        product="p",
        planned_count=5,
        key_mode="board-ecc",
        subject_template=TEMPLATE,
        crl_url="http://pki.example/crl",
        ocsp_url="http://pki.example/ocsp",
    )
    signed: list[x509.Certificate] = []

    def crash(cert: x509.Certificate) -> None:
        signed.append(cert)
        raise SystemExit("power cut")

    ledger.after_sign = crash
    with pytest.raises(SystemExit):
        ledger.issue("U", "dev-1", make_csr("dev-1")[0], ca)
    ledger.after_sign = None
    (serial,) = ledger.recover(ca).resigned
    recovered = x509.load_pem_x509_certificate((ledger.certificate(serial).pem or "").encode())
    assert recovered.tbs_certificate_bytes == signed[0].tbs_certificate_bytes
    recovered.extensions.get_extension_for_class(x509.CRLDistributionPoints)


@pytest.mark.parametrize(
    "url", ["ftp://pki.example/crl", "http://", "http://pki.example/a b", "http://pki.example/é"]
)
def test_a_bad_url_is_refused(ledger: Ledger, url: str) -> None:
    with pytest.raises(StationError, match=r"^bad-url: "):
        ledger.create_batch(
            "X", product="p", planned_count=1, key_mode="board-ecc", subject_template=TEMPLATE,
            crl_url=url,
        )  # fmt: skip


def test_serial_status_on_both_databases(ledger: Ledger, ca: CertificateAuthority) -> None:
    live, gone = provision(ledger, ca, "st-live"), provision(ledger, ca, "st-gone")
    ledger.revoke("st-gone", "key-compromise")
    revoked_at = ledger.certificate(gone.cert.serial_number).revoked_at
    assert serial_status(ledger.engine, live.cert.serial_number).status == "good"
    status = serial_status(ledger.engine, gone.cert.serial_number)
    assert (status.status, status.reason) == ("revoked", x509.ReasonFlags.key_compromise)
    assert status.revoked_at == revoked_at and status.revoked_at.tzinfo is not None
    assert serial_status(ledger.engine, 12345).status == "unknown"
    assert serial_status(ledger.engine, -1).status == "unknown"


def test_station_crl_command(
    station_env: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    station = str(Path(sys.executable).parent / "station")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [station, "crl", *args], capture_output=True, text=True, timeout=120, check=False
        )

    with Ledger.from_settings(station_env) as led:
        led.create_batch(
            "P", product="p", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
        )
        board = provision(led, ca, "cli-1")
        led.revoke("cli-1", "key-compromise")
    pem_path, der_path = tmp_path / "out" / "station.crl", tmp_path / "station.crl.der"
    done = run("--out", str(pem_path))
    assert done.returncode == 0, done.stderr
    assert "CRL number 1 (1 revoked" in done.stdout
    crl = x509.load_pem_x509_crl(pem_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(board.cert.serial_number) is not None
    assert pem_path.stat().st_mode & 0o777 == 0o644  # brokers read it after dropping root
    assert run("--out", str(der_path), "--der").returncode == 0
    assert x509.load_der_x509_crl(der_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    ) == crl.public_bytes(serialization.Encoding.DER)  # the stored CRL, not a new one
    assert "CRL number 2" in run("--out", str(der_path), "--der", "--fresh").stdout
    bad = run("--out", str(der_path), "--validity-hours", "0")
    assert bad.returncode == 1 and bad.stderr.startswith("error [bad-argument] ")


def test_station_crl_watch_rewrites_the_file_after_a_revocation(
    station_env: Settings, ca: CertificateAuthority, tmp_path: Path
) -> None:
    with Ledger.from_settings(station_env) as led:
        led.create_batch(
            "P", product="p", planned_count=5, key_mode="board-ecc", subject_template=TEMPLATE
        )
        board = provision(led, ca, "watch-1")
    out = tmp_path / "watched.crl"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "station"), "crl", "--out", str(out), "--watch",
         "--interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not out.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.1)
        assert len(x509.load_pem_x509_crl(out.read_bytes())) == 0
        with Ledger.from_settings(station_env) as led:
            led.revoke("watch-1", "key-compromise")
        while True:
            crl = x509.load_pem_x509_crl(out.read_bytes())
            if crl.get_revoked_certificate_by_serial_number(board.cert.serial_number):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "not rewritten"
            time.sleep(0.1)
    finally:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "CRL number 2 (1 revoked" in stdout
