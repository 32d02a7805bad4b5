"""A key backend for simulated boards: P-256 key, CSR and proof in-process with pyca/cryptography.

The real agent runs the OpenSSL CLI on the board (three process starts per
board-ecc board). A rig of tens of simulated boards on the station's own CPUs
would then measure process starts, not the station; this backend
(``AgentConfig(keys=CryptographyKeys())``) makes the same objects in-process:
a PEM key file of mode 0600, a CSR whose subject is what ``openssl req -subj
... -utf8`` makes of the same string, and a DER ECDSA-SHA256 signature. For
simulation only; nothing on a board uses it (``firmware_hooks`` stays
standard library and pyserial).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# OpenSSL's short names for the attributes a -subj string may carry.
_ATTRIBUTES = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
    "serialNumber": NameOID.SERIAL_NUMBER,
    "emailAddress": NameOID.EMAIL_ADDRESS,
    "DC": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
}
_UNESCAPED_SLASH = re.compile(r"(?<!\\)/")


def parse_subject(subject: str) -> x509.Name:
    """An OpenSSL-style ``/O=company/CN=dev-0001/C=US`` as an x509.Name, RDNs in order."""
    if not subject.startswith("/"):
        raise ValueError(f"subject {subject!r} does not start with /")
    attributes = []
    for part in _UNESCAPED_SLASH.split(subject[1:]):
        name, sep, value = part.partition("=")
        if not sep or name not in _ATTRIBUTES:
            raise ValueError(f"subject part {part!r}: unknown or malformed attribute")
        attributes.append(x509.NameAttribute(_ATTRIBUTES[name], value.replace("\\/", "/")))
    return x509.Name(attributes)


class CryptographyKeys:
    """``firmware_hooks.agent.KeyBackend`` in-process; see the module docstring."""

    def generate_key_csr(self, key_path: Path, subject: str) -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(parse_subject(subject))
            .sign(key, hashes.SHA256())
        )
        return csr.public_bytes(serialization.Encoding.DER)

    def sign(self, key_path: Path, data: bytes) -> bytes:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path.name} is not an EC key")
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
