"""Proof of possession: the challenge a board signs and how its answer is checked.

A challenge is a fresh 32-byte nonce, single use, valid for CHALLENGE_TTL.
The board signs it with the key its certificate certifies: ECDSA-SHA256 (DER
signature) for EC keys, PKCS#1 v1.5 SHA-256 for RSA. Knows nothing of storage
or channels: the ledger stores challenges, the serial line and the HTTP API
carry them.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from station.errors import ConflictError, PolicyError, StationError

CHALLENGE_TTL = timedelta(seconds=120)
NONCE_BYTES = 32


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def signature_ok(certificate_pem: str, nonce: bytes, signature: bytes) -> bool:
    """Does ``signature`` over ``nonce`` verify with the certificate's public key?"""
    key = x509.load_pem_x509_certificate(certificate_pem.encode()).public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, nonce, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, nonce, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def refusal(
    device_id: str,
    *,
    expires_at: datetime,
    now: datetime,
    certificate_pem: str | None,
    nonce: bytes,
    signature: bytes,
) -> StationError | None:
    """Why an answer to an open challenge is refused, or None when it proves possession.

    ``certificate_pem`` is the board's live, issued certificate (None without one).
    """
    if expires_at < now:
        return PolicyError("the challenge has expired", code="challenge-expired")
    if certificate_pem is None:
        return ConflictError(f"device {device_id!r} has no live certificate", code="no-certificate")
    if not signature_ok(certificate_pem, nonce, signature):
        return PolicyError(
            "the signature over the nonce does not verify with the certificate's key",
            code="bad-proof",
        )
    return None
