"""The CSR policy, one rule per test."""

from __future__ import annotations

import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from station.errors import PolicyError
from station.policy import (
    check_csr,
    check_subject,
    load_csr,
    parse_subject,
    subject_from_template,
    validate_template,
)
from tests.csrs import csr_der, csr_pem, device_name, make_csr, name, rsa_key

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


def code_of(fn, *args) -> str:
    with pytest.raises(PolicyError) as info:
        fn(*args)
    return info.value.code


def test_good_ec_and_rsa_csrs_pass() -> None:
    for key in (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        rsa_key(2048),
    ):
        csr, _ = make_csr(device_name("d1"), key)
        check_csr(load_csr(csr_pem(csr)))
        check_csr(load_csr(csr_der(csr)))


def test_tampered_csr_is_bad_signature() -> None:
    csr, _ = make_csr(device_name("d1"))
    der = bytearray(csr_der(csr))
    der[-5] ^= 0x01  # inside the signature
    assert code_of(lambda d: check_csr(load_csr(d)), bytes(der)) == "bad-signature"


def test_rsa_1024_is_weak() -> None:
    csr, _ = make_csr(device_name("d1"), rsa_key(1024))
    assert code_of(check_csr, csr) == "weak-key"


def test_p192_is_weak() -> None:
    csr, _ = make_csr(device_name("d1"), ec.generate_private_key(ec.SECP192R1()))
    assert code_of(check_csr, csr) == "weak-key"


def test_secp256k1_is_unsupported() -> None:
    csr, _ = make_csr(device_name("d1"), ec.generate_private_key(ec.SECP256K1()))
    assert code_of(check_csr, csr) == "unsupported-key"


def test_ed25519_is_unsupported() -> None:
    csr, _ = make_csr(device_name("d1"), ed25519.Ed25519PrivateKey.generate())
    assert code_of(check_csr, csr) == "unsupported-key"


def test_sha1_signed_csr_is_weak_signature(tmp_path) -> None:
    # cryptography will not sign with SHA-1 any more; the OpenSSL CLI still does.
    key = tmp_path / "k.pem"
    subprocess.run(
        ["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-out", str(key)],
        check=True,
        capture_output=True,
    )
    der = subprocess.run(
        ["openssl", "req", "-new", "-sha1", "-key", str(key), "-subj", "/CN=d1", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    assert code_of(check_csr, load_csr(der)) == "weak-signature"


def test_ca_true_request_is_refused() -> None:
    csr, _ = make_csr(
        device_name("d1"), extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)]
    )
    assert code_of(check_csr, csr) == "ca-requested"


def test_control_characters_in_subject_are_refused() -> None:
    csr, _ = make_csr(name(CN="dev\x00ice"))
    assert code_of(check_csr, csr) == "bad-subject"


def test_overlong_subject_is_refused() -> None:
    csr, _ = make_csr(name(O="x" * 65, CN="d"))
    assert code_of(check_csr, csr) == "bad-subject"


def test_der_with_trailing_garbage_is_malformed() -> None:
    csr, _ = make_csr(device_name("d1"))
    assert code_of(load_csr, csr_der(csr) + b"\x00\x01") == "malformed-csr"


def test_a_bit_string_under_another_attribute_is_malformed() -> None:
    """Found by the API's DER fuzzing: cryptography raises TypeError (not ValueError)
    parsing a subject whose BIT STRING value is not an x500UniqueIdentifier; it was a 500."""
    from cryptography.x509.name import _ASN1Type
    from cryptography.x509.oid import NameOID

    unique = x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, b"\x01", _type=_ASN1Type.BitString)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d1"), unique])
    der = csr_der(make_csr(subject)[0])
    # 2.5.4.45 (x500UniqueIdentifier) -> 2.5.4.46 (dnQualifier): same length, same BIT STRING.
    assert der.count(b"\x06\x03\x55\x04\x2d") == 1
    bent = der.replace(b"\x06\x03\x55\x04\x2d", b"\x06\x03\x55\x04\x2e")
    assert code_of(load_csr, bent) == "malformed-csr"


def test_pem_with_two_blocks_is_malformed() -> None:
    csr, _ = make_csr(device_name("d1"))
    assert code_of(load_csr, csr_pem(csr) + csr_pem(csr)) == "malformed-csr"


@pytest.mark.parametrize(
    "data", [b"", b"   ", b"hello", b"-----BEGIN CERTIFICATE REQUEST-----\nAA\n"]
)
def test_garbage_is_malformed(data: bytes) -> None:
    assert code_of(load_csr, data) == "malformed-csr"


def test_oversized_csr_is_refused() -> None:
    assert code_of(load_csr, b"0" * 20000) == "csr-too-large"


def test_subject_template_fills_device_id_in_order() -> None:
    assert subject_from_template(TEMPLATE, "dev-42") == device_name("dev-42")


def test_subject_mismatch() -> None:
    csr, _ = make_csr(device_name("dev-1"))
    check_subject(csr, subject_from_template(TEMPLATE, "dev-1"))
    assert code_of(check_subject, csr, subject_from_template(TEMPLATE, "dev-2")) == (
        "subject-mismatch"
    )


@pytest.mark.parametrize(
    "device_id", ["", "a/b", "x" * 65, "-lead", "sp ace", "nul\x00", "DEV-1\n", "[/]"]
)
def test_bad_device_ids(device_id: str) -> None:
    assert code_of(subject_from_template, TEMPLATE, device_id) == "bad-device-id"


@pytest.mark.parametrize(
    "template",
    [
        "O=x/CN={device_id}",
        "/O=x",
        "/XX=1/CN={device_id}",
        "/C=USA/CN={device_id}",
        "/CN={device_id}/O={device_id}",
    ],
)
def test_bad_templates(template: str) -> None:
    assert code_of(validate_template, template) == "bad-template"


def test_parse_subject_keeps_order() -> None:
    parsed = parse_subject("/C=US/O=a/CN=b")
    assert [a.value for a in parsed] == ["US", "a", "b"]
