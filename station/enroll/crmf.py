"""CRMF (RFC 4211) certificate requests, as CMP's ir, cr and kur carry them.

A :class:`CrmfRequest` has the shape the issuer signs from (station/request.py):
the template's subject and public key, and as its "signature" the proof of
possession, a POPOSigningKey signature over the DER of the CertRequest made with
the template's key (RFC 4211 section 4.1; without poposkInput, so the template
must carry the subject and the key). Other kinds of proof (raVerified, key
encipherment) are refused: the station issues only to a key it saw sign.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1_modules import rfc2459, rfc2511

from station.errors import PolicyError

_POPO_HASH = {
    "1.2.840.10045.4.3.2": ("ec", hashes.SHA256),
    "1.2.840.10045.4.3.3": ("ec", hashes.SHA384),
    "1.2.840.10045.4.3.4": ("ec", hashes.SHA512),
    "1.2.840.113549.1.1.11": ("rsa", hashes.SHA256),
    "1.2.840.113549.1.1.12": ("rsa", hashes.SHA384),
    "1.2.840.113549.1.1.13": ("rsa", hashes.SHA512),
    "1.2.840.10045.4.1": ("ec", hashes.SHA1),
    "1.2.840.113549.1.1.5": ("rsa", hashes.SHA1),
}
_BASIC_CONSTRAINTS = "2.5.29.19"
_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
_DER_OID_TAG = 0x06


def _untag(value: Any, spec: Any) -> bytes:
    """DER of an implicitly tagged constructed value under its own (universal) tag."""
    out = spec.clone()
    for i in range(len(value)):
        component = value.getComponentByPosition(i)
        if component.isValue:
            out.setComponentByPosition(i, component)
    return bytes(der_encoder.encode(out))


class CrmfRequest:
    """One CertReqMsg, checked for shape; the policy checks the rest."""

    def __init__(self, msg: Any) -> None:
        self._msg = msg
        req = msg["certReq"]
        template = req["certTemplate"]
        if not template["publicKey"].isValue or not template["subject"].isValue:
            raise PolicyError(
                "the certificate template needs a subject and a public key",
                code="malformed-csr",
            )
        self.cert_req_id = int(req["certReqId"])
        try:
            name_der = _untag(template["subject"], rfc2459.Name())
            self._subject = _name_from_der(name_der)
            spki_value = template["publicKey"]
            alg = spki_value["algorithm"]
            if str(alg["algorithm"]) == _EC_PUBLIC_KEY:
                # As for a PKCS#10 (policy.check_named_curve): a named curve, never
                # explicit parameters cryptography would map onto one.
                params = bytes(alg["parameters"]) if alg["parameters"].isValue else b""
                if not params or params[0] != _DER_OID_TAG:
                    raise PolicyError(
                        "the EC key carries explicit curve parameters; name the curve "
                        "(P-256 or P-384)",
                        code="explicit-curve-params",
                    )
            spki = _untag(spki_value, rfc2459.SubjectPublicKeyInfo())
            self._public_key = serialization.load_der_public_key(spki)
        except (ValueError, PyAsn1Error, TypeError) as exc:
            raise PolicyError(
                f"the certificate template cannot be read: {type(exc).__name__}",
                code="malformed-csr",
            ) from None
        if template["extensions"].isValue:
            for ext in template["extensions"]:
                if str(ext["extnID"]) == _BASIC_CONSTRAINTS:
                    try:
                        bc, _ = der_decoder.decode(
                            bytes(ext["extnValue"]), asn1Spec=rfc2459.BasicConstraints()
                        )
                    except PyAsn1Error:
                        raise PolicyError(
                            "the template's basicConstraints cannot be read",
                            code="malformed-csr",
                        ) from None
                    if bc["cA"]:
                        raise PolicyError(
                            "the template asks to be a CA (CA:TRUE)", code="ca-requested"
                        )
        self._cert_req_der = bytes(der_encoder.encode(req))

    @classmethod
    def load(cls, der: bytes) -> CrmfRequest:
        """Codes: malformed-csr."""
        try:
            msg, rest = der_decoder.decode(der, asn1Spec=rfc2511.CertReqMsg())
        except (PyAsn1Error, ValueError, TypeError, IndexError):
            raise PolicyError("not a CRMF CertReqMsg", code="malformed-csr") from None
        if rest:
            raise PolicyError("bytes after the CertReqMsg", code="malformed-csr")
        return cls(msg)

    @property
    def subject(self) -> x509.Name:
        return self._subject

    def public_key(self) -> CertificatePublicKeyTypes:
        return self._public_key  # type: ignore[return-value]

    def public_bytes(self, encoding: serialization.Encoding) -> bytes:
        if encoding != serialization.Encoding.DER:
            raise ValueError("a CRMF request is stored as DER")
        return bytes(der_encoder.encode(self._msg))

    @property
    def extensions(self) -> x509.Extensions:
        # Never copied into a certificate (station/ca.py); CA:TRUE was refused above.
        return x509.Extensions([])

    def _popo(self) -> tuple[Any, str, type[hashes.HashAlgorithm]] | None:
        pop = self._msg["pop"]
        if not pop.isValue or pop.getName() != "signature":
            return None
        sig = pop["signature"]
        if sig["poposkInput"].isValue:
            return None  # the template carries subject and key: RFC 4211 says no input
        found = _POPO_HASH.get(str(sig["algorithmIdentifier"]["algorithm"]))
        if found is None:
            return None
        return sig, found[0], found[1]

    @property
    def signature_hash_algorithm(self) -> hashes.HashAlgorithm | None:
        popo = self._popo()
        return None if popo is None else popo[2]()

    @cached_property
    def is_signature_valid(self) -> bool:
        popo = self._popo()
        if popo is None:
            return False
        sig, kind, hash_cls = popo
        signature = sig["signature"].asOctets()
        key = self._public_key
        try:
            if kind == "ec" and isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, self._cert_req_der, ec.ECDSA(hash_cls()))
            elif kind == "rsa" and isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, self._cert_req_der, padding.PKCS1v15(), hash_cls())
            else:
                return False
        except InvalidSignature:
            return False
        return True


def _name_from_der(der: bytes) -> x509.Name:
    """An x509.Name from its DER (cryptography has no loader for a bare Name): each
    attribute's type and text, as pyasn1 decodes them."""
    name, _ = der_decoder.decode(der, asn1Spec=rfc2459.Name())
    rdns = []
    for rdn in name[0]:
        attrs = []
        for atv in rdn:
            oid = x509.ObjectIdentifier(str(atv["type"]))
            value_any = atv["value"]
            decoded, _ = der_decoder.decode(bytes(value_any))
            attrs.append(x509.NameAttribute(oid, str(decoded)))
        rdns.append(x509.RelativeDistinguishedName(attrs))
    return x509.Name(rdns)
