"""Private-key objects whose signatures are made inside the token.

They subclass pyca/cryptography's private-key types, so ``CertificateBuilder``,
``CertificateSigningRequestBuilder`` and friends call their ``sign()`` as they
would a software key's. That route is outside cryptography's stability promise
(pyca/cryptography#11616): the version range is pinned in pyproject.toml and
tests/test_hsm.py::test_certificate_builder_calls_the_token_signer proves the
builders still call it.

Mechanisms are always explicit and chosen from the token's own mechanism list
(asked once per process): EC signs with ``CKM_ECDSA`` over a digest made here
(SoftHSM has no ``CKM_ECDSA_SHA256``), else with ``CKM_ECDSA_SHA256``/``SHA384``
over the message, and the raw r||s is DER-encoded as X.509 wants. RSA PKCS#1
v1.5 signs with ``CKM_SHA256_RSA_PKCS`` (and SHA-384/512), else with
``CKM_RSA_PKCS`` over a DigestInfo made here (opencryptoki's soft token has no
hash-and-sign RSA mechanism); RSA-PSS with ``CKM_SHA256_RSA_PKCS_PSS``, else
``CKM_RSA_PKCS_PSS`` over a digest.
"""

from __future__ import annotations

from typing import Any, NoReturn, Protocol, Self

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import Mechanism
from pkcs11.mechanisms import MGF

from hsm.errors import MechanismNotSupported, MechanismUnsupported


class SignRef(Protocol):
    """Where a signature is made: a key in a token."""

    def sign(self, data: bytes, mechanism: Mechanism, mechanism_param: Any = None) -> bytes: ...

    def mechanisms(self) -> frozenset[Mechanism]: ...


def _offered(ref: SignRef, mechanism: Mechanism) -> bool:
    """True when the token lists mechanism (or lists nothing: then it is tried)."""
    try:
        offered = ref.mechanisms()
    except AttributeError:  # a bare reference (tests' spies) lists nothing
        return True
    return not offered or mechanism in offered


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
        algorithm = signature_algorithm.algorithm
        hash_alg = algorithm._algorithm if isinstance(algorithm, utils.Prehashed) else algorithm
        missing = f"the token has neither CKM_ECDSA nor CKM_ECDSA_{hash_alg.name.upper()}"
        hash_mech = (
            None
            if isinstance(algorithm, utils.Prehashed)
            else _ECDSA_HASH_MECHANISMS.get(hash_alg.name)
        )
        if _offered(self._ref, Mechanism.ECDSA) or hash_mech is None:
            if not _offered(self._ref, Mechanism.ECDSA):
                raise MechanismUnsupported(missing)
            digest, _ = _digest(bytes(data), algorithm)
            raw = self._ref.sign(digest, Mechanism.ECDSA)
        elif _offered(self._ref, hash_mech):
            raw = self._ref.sign(bytes(data), hash_mech)
        else:
            raise MechanismUnsupported(missing)
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


_ECDSA_HASH_MECHANISMS = {
    "sha256": Mechanism.ECDSA_SHA256,
    "sha384": Mechanism.ECDSA_SHA384,
    "sha512": Mechanism.ECDSA_SHA512,
}
_RSA_MECHANISMS = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
_PSS_MECHANISMS = {
    "sha256": (Mechanism.SHA256_RSA_PKCS_PSS, Mechanism.SHA256, MGF.SHA256),
    "sha384": (Mechanism.SHA384_RSA_PKCS_PSS, Mechanism.SHA384, MGF.SHA384),
    "sha512": (Mechanism.SHA512_RSA_PKCS_PSS, Mechanism.SHA512, MGF.SHA512),
}
# DER of DigestInfo's AlgorithmIdentifier and OCTET STRING header (RFC 8017 9.2).
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


class HsmRsaPrivateKey(_TokenKey, rsa.RSAPrivateKey):
    _public: rsa.RSAPublicKey

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        padding: padding.AsymmetricPadding,
        algorithm: Any,
    ) -> bytes:
        prehashed = isinstance(algorithm, utils.Prehashed)
        hash_alg = algorithm._algorithm if prehashed else algorithm
        if not isinstance(hash_alg, hashes.HashAlgorithm) or hash_alg.name not in _DIGEST_INFO:
            raise MechanismNotSupported("token RSA keys sign with SHA-256, SHA-384 or SHA-512")
        name = hash_alg.name
        if padding.name == "EMSA-PKCS1-v1_5":
            if not prehashed and _offered(self._ref, _RSA_MECHANISMS[name]):
                return self._ref.sign(bytes(data), _RSA_MECHANISMS[name])
            digest, _ = _digest(bytes(data), algorithm)
            return self._ref.sign(_DIGEST_INFO[name] + digest, Mechanism.RSA_PKCS)
        if padding.name == "EMSA-PSS":
            mech, hash_mech, mgf = _PSS_MECHANISMS[name]
            param = (hash_mech, mgf, self._salt_length(padding, hash_alg))
            if not prehashed and _offered(self._ref, mech):
                return self._ref.sign(bytes(data), mech, param)
            digest, _ = _digest(bytes(data), algorithm)
            return self._ref.sign(digest, Mechanism.RSA_PKCS_PSS, param)
        raise MechanismNotSupported(f"token RSA keys sign PKCS#1 v1.5 or PSS, not {padding.name}")

    def _salt_length(self, pad: padding.AsymmetricPadding, hash_alg: hashes.HashAlgorithm) -> int:
        salt = getattr(pad, "_salt_length", None)
        if isinstance(salt, int):
            return salt
        if isinstance(salt, padding._MaxLength):
            return (self.key_size + 7) // 8 - hash_alg.digest_size - 2
        return hash_alg.digest_size

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
