"""The subject allow-list and text rules (issue 15, items 2 and 7), one rule per test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from station.errors import PolicyError
from station.policy import check_csr, load_csr, parse_subject, validate_template
from tests.csrs import make_csr


def code_of(fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(PolicyError) as info:
        fn(*args)
    return info.value.code


def csr_with(*attrs: x509.NameAttribute) -> x509.CertificateSigningRequest:
    return make_csr(x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, "d-1")]))[0]


@pytest.mark.parametrize(
    "oid",
    [
        NameOID.USER_ID,
        ObjectIdentifier("2.5.4.72"),  # role
        NameOID.EMAIL_ADDRESS,
        NameOID.DOMAIN_COMPONENT,
        NameOID.TITLE,
        NameOID.GIVEN_NAME,
    ],
    ids=lambda oid: oid.dotted_string,
)
def test_attribute_types_outside_the_allow_list_are_refused(oid: ObjectIdentifier) -> None:
    csr = csr_with(x509.NameAttribute(oid, "x"))
    assert code_of(check_csr, csr) == "subject-attribute-not-allowed"


@pytest.mark.parametrize("key", ["CN", "O", "OU", "C", "ST", "L", "serialNumber"])
def test_allow_listed_types_pass(key: str) -> None:
    value = "US" if key == "C" else "Line 1"
    parse_subject(f"/{key}={value}")


@pytest.mark.parametrize(
    "value",
    [
        "Amazon Web Services\u202eevil",  # right-to-left override
        "a\u2066b",  # left-to-right isolate
        "a\u200fb",  # right-to-left mark
        "com\u200bpany",  # zero-width space
        "com\u200dpany",  # zero-width joiner
        "\ufeffcompany",  # BOM / zero-width no-break space
        "com\u00a0pany",  # no-break space: not printable
        "com\u2028pany",  # line separator
    ],
)
def test_invisible_and_bidi_characters_are_refused(value: str) -> None:
    csr = csr_with(x509.NameAttribute(NameOID.ORGANIZATION_NAME, value))
    assert code_of(check_csr, csr) == "bad-subject"
    assert code_of(parse_subject, f"/O={value}/CN=x") == "bad-subject"


def test_other_scripts_stay_accepted_in_subjects() -> None:
    check_csr(csr_with(x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Société Générale 株式会社")))


def test_templates_follow_the_same_allow_list() -> None:
    assert code_of(validate_template, "/emailAddress=a@b/CN={device_id}") == "bad-template"
    assert code_of(validate_template, "/O=a\u202eb/CN={device_id}") == "bad-subject"
    validate_template("/O=company/OU=team/L=Seoul/ST=x/serialNumber=1/CN={device_id}/C=KR")


def test_explicit_curve_parameters_are_refused(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    subprocess.run(
        [
            *("openssl", "ecparam", "-name", "prime256v1", "-param_enc", "explicit"),
            *("-genkey", "-noout", "-out", str(key)),
        ],
        check=True,
        capture_output=True,
    )
    der = subprocess.run(
        ["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=d1", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    assert code_of(lambda d: check_csr(load_csr(d)), der) == "explicit-curve-params"


def test_named_curves_pass() -> None:
    check_csr(csr_with())
