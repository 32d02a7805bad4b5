"""Building CSRs the way boards (and attackers) do, for tests."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID


def name(**attrs: str) -> x509.Name:
    oids = {
        "O": NameOID.ORGANIZATION_NAME,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "CN": NameOID.COMMON_NAME,
        "C": NameOID.COUNTRY_NAME,
    }
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in attrs.items()])


def device_name(device_id: str) -> x509.Name:
    """The subject of the test batches' template /O=company/OU=team/CN={device_id}/C=US."""
    return name(O="company", OU="team", CN=device_id, C="US")


def make_csr(
    subject: x509.Name,
    key: object | None = None,
    *,
    hash_alg: hashes.HashAlgorithm | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] = (),  # type: ignore[assignment]
) -> tuple[x509.CertificateSigningRequest, object]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    alg = None if isinstance(key, ed25519.Ed25519PrivateKey) else (hash_alg or hashes.SHA256())
    return builder.sign(key, alg), key  # type: ignore[arg-type]


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)
