"""`station hsm check`: is this token fit to hold the CA key, and how fast does it sign?

It reports the module and token, the mechanisms the station needs (present or
missing), the key's protection flags, a test signature verified against the CA
certificate (or the key's own public key when no certificate belongs to it), and
the token's own signature rate. The check fails when the key could leave the
token or signing fails.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Mechanism

from hsm import HsmError, KeyNotProtected, KeyStore
from station import keys_made
from station.errors import Kind, StationError

# What the station needs, by key family: each row is satisfied by any one of its mechanisms.
NEEDED: dict[str, list[tuple[str, tuple[Mechanism, ...]]]] = {
    "EC": [
        ("generate EC keys", (Mechanism.EC_KEY_PAIR_GEN,)),
        (
            "ECDSA signatures",
            (Mechanism.ECDSA, Mechanism.ECDSA_SHA256, Mechanism.ECDSA_SHA384),
        ),
    ],
    "RSA": [
        ("generate RSA keys", (Mechanism.RSA_PKCS_KEY_PAIR_GEN,)),
        ("RSA PKCS#1 v1.5 signatures", (Mechanism.SHA256_RSA_PKCS, Mechanism.RSA_PKCS)),
        ("RSA-PSS signatures", (Mechanism.SHA256_RSA_PKCS_PSS, Mechanism.RSA_PKCS_PSS)),
    ],
}


@dataclass
class CheckReport:
    module: str
    token: dict[str, Any] = field(default_factory=dict)
    mechanisms: list[dict[str, Any]] = field(default_factory=list)
    key: dict[str, Any] = field(default_factory=dict)
    signature: str = "not made"
    verified_with: str = ""
    signatures_per_second: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _verify(public: Any, sig: bytes, data: bytes, hash_alg: hashes.HashAlgorithm) -> None:
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(sig, data, ec.ECDSA(hash_alg))
    elif isinstance(public, rsa.RSAPublicKey):
        public.verify(sig, data, padding.PKCS1v15(), hash_alg)
    else:
        raise InvalidSignature("unsupported public key")


def check(
    keystore: KeyStore,
    ca_certificate: x509.Certificate | None,
    *,
    seconds: float = 2.0,
) -> CheckReport:
    """Inspect the token and the key the key store names; never raises for a finding."""
    report = CheckReport(module=keystore.module)
    info = keystore.token_info()
    report.token = {
        "label": info.label,
        "manufacturer": info.manufacturer,
        "model": info.model,
        "serial": info.serial,
        "slot_id": info.slot_id,
        "library": info.library,
        "library_version": info.library_version,
    }
    offered = keystore.mechanisms()
    key_info = keystore.key_info()
    family = "EC" if key_info.key_type == "EC" else "RSA"
    for need, options in NEEDED[family]:
        have = [m.name for m in options if m in offered]
        report.mechanisms.append({"need": need, "present": have, "ok": bool(have)})
        if not have and need.endswith("signatures") and "PSS" not in need:
            report.problems.append(f"the token offers no mechanism for {need}")
    report.key = {
        "label": key_info.label,
        "id": key_info.id.hex(),
        "type": key_info.key_type,
        **{k.lower(): v for k, v in key_info.attributes.items()},
        "sign_only": key_info.sign_only,
    }
    if key_info.could_leave_the_token:
        report.problems.append(
            KeyNotProtected.code + ": the key is extractable or not sensitive: it could leave "
            "the token"
        )
    key = keystore.private_key()
    hash_alg: hashes.HashAlgorithm = hashes.SHA256()
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        hash_alg = hashes.SHA384()
    data = os.urandom(64)
    try:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            sig = key.sign(data, ec.ECDSA(hash_alg))
        else:
            sig = key.sign(data, padding.PKCS1v15(), hash_alg)
    except HsmError as exc:
        report.signature = f"failed: [{exc.code}] {exc}"
        report.problems.append(f"signing failed: [{exc.code}] {exc}")
        return report
    public: Any = key.public_key()
    report.verified_with = "the key's own public key"
    if ca_certificate is not None and keys_made.public_key_sha256(
        ca_certificate
    ) == keys_made.public_key_sha256(key):
        public = ca_certificate.public_key()
        report.verified_with = "the CA certificate"
    try:
        _verify(public, sig, data, hash_alg)
        report.signature = "verified"
    except InvalidSignature:
        report.signature = "does not verify"
        report.problems.append("the test signature does not verify")
        return report
    report.signatures_per_second = signature_rate(key, seconds, hash_alg)
    return report


def signature_rate(key: Any, seconds: float, hash_alg: hashes.HashAlgorithm) -> float:
    """Signatures a second the token makes over `seconds`, one after another."""
    digest_input = os.urandom(32)
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            key.sign(digest_input, ec.ECDSA(hash_alg))
        else:
            key.sign(digest_input, padding.PKCS1v15(), hash_alg)
        n += 1
        now = time.perf_counter()
        if now >= end:
            return n / (now - start)


class CheckFailed(StationError):
    code = "hsm-check-failed"
    kind = Kind.REFUSED
