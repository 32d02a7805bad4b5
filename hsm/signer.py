"""Private-key objects whose signatures are made inside the token.

They subclass pyca/cryptography's private-key types, so ``CertificateBuilder``,
``CertificateSigningRequestBuilder`` and friends call their ``sign()`` as they
would a software key's. That route is outside cryptography's stability promise
(pyca/cryptography#11616): the version range is pinned in pyproject.toml and
tests/test_hsm.py::test_certificate_builder_calls_the_token_signer proves the
builders still call it.

Mechanisms are always explicit: EC signs with ``CKM_ECDSA`` over a digest made
here (SoftHSM has no ``CKM_ECDSA_SHA256``), and the raw r||s is DER-encoded as
X.509 wants; RSA signs with ``CKM_SHA256_RSA_PKCS`` / ``CKM_SHA384_RSA_PKCS``.
"""

from __future__ import annotations

from typing import Any, NoReturn, Protocol, Self

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import Mechanism

from hsm.errors import MechanismNotSupported


class SignRef(Protocol):
    """Where a signature is made: a key in a token."""

    def sign(self, data: bytes, mechanism: Mechanism) -> bytes: ...


def _no_export() -> NoReturn:
    raise UnsupportedAlgorithm("the key lives in a PKCS#11 token and cannot be exported")


def _digest(data: bytes, algorithm: Any) -> tuple[bytes, hashes.HashAlgorithm]:
    if isinstance(algorithm, utils.Prehashed):
        return data, algorithm._algorithm
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize(), algorithm


class _TokenKey:
    """What the EC and RSA token keys share: a key reference, no export, no copies."""

    def __init__(self, ref: SignRef, public: Any) -> None:
        self._ref = ref
        self._public = public

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _no_export()

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self


class HsmEcPrivateKey(_TokenKey, ec.EllipticCurvePrivateKey):
    _public: ec.EllipticCurvePublicKey

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise MechanismNotSupported("only ECDSA signatures are made with an EC token key")
        digest, _ = _digest(bytes(data), signature_algorithm.algorithm)
        raw = self._ref.sign(digest, Mechanism.ECDSA)
        half = len(raw) // 2
        r = int.from_bytes(raw[:half], "big")
        s = int.from_bytes(raw[half:], "big")
        return utils.encode_dss_signature(r, s)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise MechanismNotSupported("the CA key is sign-only; key agreement is not allowed")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _no_export()


_RSA_MECHANISMS = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}


class HsmRsaPrivateKey(_TokenKey, rsa.RSAPrivateKey):
    _public: rsa.RSAPublicKey

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        padding: padding.AsymmetricPadding,
        algorithm: Any,
    ) -> bytes:
        if padding.name != "EMSA-PKCS1-v1_5" or not isinstance(algorithm, hashes.HashAlgorithm):
            raise MechanismNotSupported("token RSA keys sign PKCS#1 v1.5 over the whole message")
        mechanism = _RSA_MECHANISMS.get(algorithm.name)
        if mechanism is None:
            raise MechanismNotSupported(f"no RSA mechanism for hash {algorithm.name}")
        return self._ref.sign(bytes(data), mechanism)

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise MechanismNotSupported("the CA key is sign-only; decryption is not allowed")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _no_export()


HsmPrivateKey = HsmEcPrivateKey | HsmRsaPrivateKey
