"""The PKCS#11 key store: keys named by RFC 7512 URIs, signers for pyca/cryptography."""

from hsm.errors import (
    HsmError,
    KeyExists,
    KeyMismatch,
    KeyNotFound,
    KeyNotOwned,
    KeyNotProtected,
    MechanismNotSupported,
    MechanismUnsupported,
    ModuleLoadError,
    PinFileNotPrivate,
    PinLocked,
    PinUnavailable,
    TemplateRefused,
    TokenNotFound,
    TokenUnavailable,
    UriError,
    WrongPin,
)
from hsm.keystore import KeyInfo, KeyStore, KeyType, TokenInfo, list_tokens, reset_module
from hsm.signer import HsmEcPrivateKey, HsmPrivateKey, HsmRsaPrivateKey
from hsm.uri import Pkcs11Uri

__all__ = [
    "HsmEcPrivateKey",
    "HsmError",
    "HsmPrivateKey",
    "HsmRsaPrivateKey",
    "KeyExists",
    "KeyInfo",
    "KeyMismatch",
    "KeyNotFound",
    "KeyNotOwned",
    "KeyNotProtected",
    "KeyStore",
    "KeyType",
    "MechanismNotSupported",
    "MechanismUnsupported",
    "ModuleLoadError",
    "PinFileNotPrivate",
    "PinLocked",
    "PinUnavailable",
    "Pkcs11Uri",
    "TemplateRefused",
    "TokenInfo",
    "TokenNotFound",
    "TokenUnavailable",
    "UriError",
    "WrongPin",
    "list_tokens",
    "reset_module",
]
