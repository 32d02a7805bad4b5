"""The PKCS#11 key store: keys named by RFC 7512 URIs, signers for pyca/cryptography."""

from hsm.errors import (
    HsmError,
    KeyExists,
    KeyMismatch,
    KeyNotFound,
    MechanismNotSupported,
    ModuleLoadError,
    PinLocked,
    PinUnavailable,
    TokenNotFound,
    TokenUnavailable,
    UriError,
    WrongPin,
)
from hsm.keystore import KeyStore, KeyType, TokenInfo, reset_module
from hsm.signer import HsmEcPrivateKey, HsmPrivateKey, HsmRsaPrivateKey
from hsm.uri import Pkcs11Uri

__all__ = [
    "HsmEcPrivateKey",
    "HsmError",
    "HsmPrivateKey",
    "HsmRsaPrivateKey",
    "KeyExists",
    "KeyMismatch",
    "KeyNotFound",
    "KeyStore",
    "KeyType",
    "MechanismNotSupported",
    "ModuleLoadError",
    "PinLocked",
    "PinUnavailable",
    "Pkcs11Uri",
    "TokenInfo",
    "TokenNotFound",
    "TokenUnavailable",
    "UriError",
    "WrongPin",
    "reset_module",
]
