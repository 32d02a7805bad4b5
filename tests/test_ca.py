"""The CA: init, intermediates, and the device certificate profile, checked by OpenSSL too.

The CA tests run with the CA key in each of the three tested PKCS#11 implementations
(SoftHSM2, tpm2-pkcs11 over swtpm, opencryptoki's soft token).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from hsm import KeyType
from station.ca import (
    CertificateAuthority,
    DeviceProfile,
    import_ca_certificate,
    init_ca,
    new_serial,
    open_ca,
)
from station.errors import StationError
from station.settings import Settings
from tests.csrs import device_name, make_csr, rsa_key
from tests.fixtures.tokens import TOKEN_NAMES, Token

DEFAULT_PROFILE = DeviceProfile()


@pytest.fixture(scope="module", params=TOKEN_NAMES)
def token_ca_settings(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    """A CA whose key is in one of the three tokens (EC P-256, RSA-2048 where no EC)."""
    token: Token = request.getfixturevalue(f"{request.param}_token")
    home = tmp_path_factory.mktemp(f"ca-{request.param}")
    settings = Settings(
        data_dir=home, ca_key_uri=token.uri(f"ca-{uuid.uuid4().hex[:8]}"), station_id="ca-tests"
    )
    assert init_ca(settings, key_type=token.ca_key_type).status == "created"
    return settings


@pytest.fixture
def ca(token_ca_settings: Settings) -> CertificateAuthority:
    return open_ca(token_ca_settings)


def issue(ca, key=None, serial=None, profile=DEFAULT_PROFILE):
    csr, key = make_csr(device_name("dev-1"), key)
    cert = ca.issue(csr, subject=csr.subject, serial=serial or new_serial(), profile=profile)
    return cert, key


def openssl_verify(ca_pem: bytes, chain_pem: bytes, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    (tmp_path / "leaf.pem").write_bytes(chain_pem)
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            str(tmp_path / "ca.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_ca_certificate_profile(ca) -> None:
    cert = ca.certificate
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_device_certificate_profile(ca) -> None:
    cert, key = issue(ca)
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_encipherment
    assert ext.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    )
    assert len(ext) == 5
    assert cert.issuer == ca.certificate.subject
    cert.verify_directly_issued_by(ca.certificate)


def test_rsa_device_gets_key_encipherment(ca) -> None:
    cert, _ = issue(ca, rsa_key(2048))
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


def test_no_extension_is_copied_from_the_csr(ca) -> None:
    csr, _ = make_csr(
        device_name("dev-1"),
        extensions=[
            (x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False),
            (x509.BasicConstraints(ca=True, path_length=None), True),
        ],
    )
    cert = ca.issue(csr, subject=csr.subject, serial=new_serial(), profile=DeviceProfile())
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_validity_backdated_and_capped_by_the_ca(ca) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    csr, _ = make_csr(device_name("dev-1"))
    cert = ca.issue(csr, subject=csr.subject, serial=5, profile=DeviceProfile(30, 600), now=now)
    assert cert.not_valid_before_utc == now - dt.timedelta(seconds=600)
    assert cert.not_valid_after_utc == now + dt.timedelta(days=30)
    long = ca.issue(csr, subject=csr.subject, serial=6, profile=DeviceProfile(36500, 0))
    assert long.not_valid_after_utc <= ca.certificate.not_valid_after_utc


def test_serials_are_positive_and_at_most_159_bits() -> None:
    serials = {new_serial() for _ in range(2000)}
    assert len(serials) == 2000
    assert all(0 < s < 2**159 for s in serials)


def test_issued_chain_passes_openssl_x509_strict(ca, tmp_path) -> None:
    for key in (None, rsa_key(2048), ec.generate_private_key(ec.SECP384R1())):
        cert, _ = issue(ca, key)
        result = openssl_verify(ca.chain_pem, ca.chain_for(cert), tmp_path)
        assert result.returncode == 0, result.stderr
        assert ": OK" in result.stdout


def test_chain_from_another_ca_fails_openssl(ca, tmp_path) -> None:
    cert, _ = issue(ca)
    other = ec.generate_private_key(ec.SECP256R1())
    n = device_name("other-ca")
    now = dt.datetime.now(dt.UTC)
    other_ca = (
        x509.CertificateBuilder()
        .subject_name(n)
        .issuer_name(n)
        .public_key(other.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(other, hashes.SHA256())
    )
    result = openssl_verify(
        other_ca.public_bytes(serialization.Encoding.PEM),
        cert.public_bytes(serialization.Encoding.PEM),
        tmp_path,
    )
    assert result.returncode != 0


def test_init_is_idempotent_and_force_replaces(ca_home, tmp_path) -> None:
    settings = Settings(data_dir=tmp_path / "fresh", station_id="s1", dev_token_label="t-fresh")
    first = init_ca(settings, key_type=KeyType.EC_P384)
    assert first.status == "created"
    again = init_ca(settings)
    assert again.status == "kept"
    assert again.ca is not None and first.ca is not None
    assert again.ca.fingerprint == first.ca.fingerprint
    replaced = init_ca(settings, force=True)
    assert replaced.status == "replaced"
    assert replaced.ca is not None and replaced.ca.fingerprint != first.ca.fingerprint
    assert open_ca(settings).fingerprint == replaced.ca.fingerprint


def test_p384_ca_signs_with_sha384(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path / "p384", station_id="s2", dev_token_label="t-p384")
    ca = init_ca(settings, key_type=KeyType.EC_P384, subject="/O=acme/CN=P384 CA").ca
    assert ca is not None
    cert, _ = issue(ca)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)
    assert openssl_verify(ca.chain_pem, ca.chain_for(cert), tmp_path).returncode == 0


def test_intermediate_via_external_root(any_token: Token, tmp_path) -> None:
    """The key ceremony on each token: key in the token, CSR out, root signs, cert in."""
    settings = Settings(
        data_dir=tmp_path / "inter",
        station_id="s3",
        ca_key_uri=any_token.uri(f"inter-{uuid.uuid4().hex[:8]}"),
    )
    csr_path = tmp_path / "ca.csr"
    outcome = init_ca(
        settings,
        subject="/O=acme/CN=Line CA",
        csr_out=csr_path,
        key_type=any_token.ca_key_type,
    )
    assert outcome.status == "csr-written"
    station_csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert station_csr.is_signature_valid
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = device_name("root")
    now = dt.datetime.now(dt.UTC)
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=9))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )

    def sign_intermediate(public_key):
        return (
            x509.CertificateBuilder()
            .subject_name(station_csr.subject)
            .issuer_name(root_name)
            .public_key(public_key)
            .serial_number(2)
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=8))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
            )
            .sign(root_key, hashes.SHA256())
        )

    wrong = sign_intermediate(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(StationError) as info:
        import_ca_certificate(settings, wrong.public_bytes(serialization.Encoding.PEM))
    assert info.value.code == "key-mismatch"

    good = sign_intermediate(station_csr.public_key())
    pem = good.public_bytes(serialization.Encoding.PEM) + root.public_bytes(
        serialization.Encoding.PEM
    )
    ca = import_ca_certificate(settings, pem)
    cert, _ = issue(ca)
    # The root is the trust anchor; the station's certificate travels in the chain.
    (tmp_path / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "chain.pem").write_bytes(ca.chain_for(cert))
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "chain.pem"),
            str(tmp_path / "chain.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert open_ca(settings).fingerprint == ca.fingerprint
