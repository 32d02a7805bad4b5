"""The CRMF certificate template (CMP ir/cr/kur) read by station/enroll/crmf.py."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pyasn1.codec.der import decoder
from pyasn1.type import univ
from pyasn1_modules import rfc2459, rfc4211

from station.enroll.crmf import CrmfRequest
from station.errors import PolicyError


def _msg_with_basic_constraints(extn_value: bytes) -> rfc4211.CertReqMsg:
    key = ec.generate_private_key(ec.SECP256R1())
    spki_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    msg = rfc4211.CertReqMsg()
    req = msg["certReq"]
    req["certReqId"] = 0
    template = req["certTemplate"]
    spki, _ = decoder.decode(spki_der, asn1Spec=rfc2459.SubjectPublicKeyInfo())
    public = template["publicKey"]
    public["algorithm"]["algorithm"] = spki["algorithm"]["algorithm"]
    public["algorithm"]["parameters"] = spki["algorithm"]["parameters"]
    public["subjectPublicKey"] = spki["subjectPublicKey"]
    name_der = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "d1")]).public_bytes()
    name, _ = decoder.decode(name_der, asn1Spec=rfc2459.Name())
    template["subject"].setComponentByPosition(0, name[0])
    ext = rfc2459.Extension()
    ext["extnID"] = rfc2459.id_ce_basicConstraints
    ext["critical"] = True
    ext["extnValue"] = univ.OctetString(extn_value)
    template["extensions"].append(ext)
    return msg


def test_an_unreadable_basic_constraints_is_malformed_not_a_500() -> None:
    """Found in review: the extension was decoded outside the template's error handling,
    so a PyAsn1Error reached the CMP route as a traceback."""
    with pytest.raises(PolicyError) as refused:
        CrmfRequest(_msg_with_basic_constraints(b"\x01\x02\x03"))
    assert refused.value.code == "malformed-csr"


def test_a_template_asking_for_ca_true_is_refused() -> None:
    with pytest.raises(PolicyError) as refused:
        CrmfRequest(_msg_with_basic_constraints(bytes.fromhex("30030101ff")))
    assert refused.value.code == "ca-requested"
