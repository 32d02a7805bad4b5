"""Proof of possession: the challenge a board signs and how its answer is checked.

A challenge is a fresh 32-byte nonce, spent by any answer, valid for CHALLENGE_TTL;
a board has at most one (:mod:`station.ledger.challenges`), and only a board with a
live, issued certificate that is neither verified nor revoked gets one.
The board signs, with the key its certificate certifies, the proof message of
its device id and the nonce (``signed_message``: a fixed context, the id, the
nonce; ``firmware_hooks.protocol.proof_message``), never bytes of the caller's
choosing, which would make the board a signing oracle for its key. The same
message on the serial line (PROVE) and over HTTP. ECDSA-SHA256 (DER signature)
for EC keys, PKCS#1 v1.5 SHA-256 for RSA. Knows nothing of storage or channels:
the ledger stores challenges, the serial line and the HTTP API carry them.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from firmware_hooks.protocol import proof_message
from station.errors import ConflictError, PolicyError, StationError
from station.ledger.revocation import device_revoked
from station.ledger.schema import DeviceState

CHALLENGE_TTL = timedelta(seconds=120)
NONCE_BYTES = 32


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def may_challenge(device_id: str, state: DeviceState, has_issued_certificate: bool) -> None:
    """Refuse a challenge that could never be answered usefully.

    Codes: device-revoked, already-verified, no-certificate."""
    if state is DeviceState.REVOKED:
        raise device_revoked(device_id)
    if state is DeviceState.VERIFIED:
        raise ConflictError(
            f"device {device_id!r} is already verified; nothing to prove", code="already-verified"
        )
    if not has_issued_certificate:
        raise ConflictError(f"device {device_id!r} has no live certificate", code="no-certificate")


def signed_message(device_id: str, nonce: bytes) -> bytes:
    """What ``device_id`` must have signed for ``nonce``; empty (which no signature
    verifies over a challenge) when the nonce is not a challenge's 32 bytes or the
    id cannot be in a proof message."""
    try:
        return proof_message(device_id, nonce)
    except ValueError:
        return b""


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
    if not signature_ok(certificate_pem, signed_message(device_id, nonce), signature):
        return PolicyError(
            "the signature over the proof message does not verify with the certificate's key",
            code="bad-proof",
        )
    return None
