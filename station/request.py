"""What the issuer signs from: a certificate request, PKCS#10 or CRMF (RFC 4211).

The one issuance path takes any object with this shape: the serial line, the
JSON API and EST hand it a PKCS#10 (cryptography's CertificateSigningRequest);
CMP's ir, cr and kur hand it a CRMF request whose proof of possession the channel
parsed (station/enroll/crmf.py). The policy checks either the same way: the key,
the signature (the PKCS#10 self-signature, or CRMF's POPO signature), the
extensions asked for, the subject. The intent stores ``public_bytes(DER)``, and
recovery loads it again with :func:`load_request`.
"""

from __future__ import annotations

from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes


class CertRequest(Protocol):
    @property
    def subject(self) -> x509.Name: ...

    @property
    def signature_hash_algorithm(self) -> hashes.HashAlgorithm | None: ...

    @property
    def is_signature_valid(self) -> bool: ...

    @property
    def extensions(self) -> x509.Extensions: ...

    def public_key(self) -> CertificatePublicKeyTypes: ...

    def public_bytes(self, encoding: serialization.Encoding) -> bytes: ...


def load_request(der: bytes) -> CertRequest:
    """A stored request (an intent's): PKCS#10, else a CRMF CertReqMsg. Codes: malformed-csr."""
    from station import policy
    from station.errors import PolicyError

    try:
        return policy.load_csr(der)
    except PolicyError:
        from station.enroll.crmf import CrmfRequest

        try:
            return CrmfRequest.load(der)
        except PolicyError:
            pass
        raise
