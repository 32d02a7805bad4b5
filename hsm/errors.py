"""Typed key-store errors, each with a message that tells an operator what to do.

No message ever contains a PIN: PINs are held only in the key store and passed
straight to the PKCS#11 module.
"""

from __future__ import annotations


class HsmError(Exception):
    """Base of every key-store failure.

    `code` is a stable reason code; `kind` is one of the station's error kinds
    (`station.errors.Kind`, spelled as its value because `hsm/` imports nothing
    of the station): the edges map it to an HTTP status or an exit code."""

    code = "hsm-error"
    kind = "unavailable"


class UriError(HsmError):
    code = "hsm-bad-uri"
    kind = "not-configured"


class ModuleLoadError(HsmError):
    code = "hsm-module-not-loadable"
    kind = "not-configured"


class TokenNotFound(HsmError):
    code = "hsm-token-not-found"


class WrongPin(HsmError):
    code = "hsm-wrong-pin"


class PinLocked(HsmError):
    code = "hsm-pin-locked"


class PinUnavailable(HsmError):
    code = "hsm-pin-unavailable"
    kind = "not-configured"


class KeyNotFound(HsmError):
    code = "hsm-key-not-found"


class KeyMismatch(HsmError):
    """A key was found, but it is not the one the CA certificate names (replaced?)."""

    code = "hsm-key-mismatch"


class KeyExists(HsmError):
    code = "hsm-key-exists"


class MechanismNotSupported(HsmError):
    """The station's signer cannot make the signature asked for (e.g. ECDH with a CA key)."""

    code = "hsm-mechanism-not-supported"
    kind = "refused"


class TokenUnavailable(HsmError):
    """The token went away or the session broke while running; retried on next use."""

    code = "hsm-token-unavailable"


class TemplateRefused(HsmError):
    """The token refused a key template or attribute: deterministic, never retried."""

    code = "hsm-template-refused"
    kind = "refused"


class MechanismUnsupported(MechanismNotSupported):
    """The token lacks the mechanism or key type asked for: deterministic, never retried."""

    code = "hsm-mechanism-unsupported"
    kind = "refused"


class KeyNotProtected(HsmError):
    """A key came out (or is) extractable or not sensitive: it could leave the token."""

    code = "hsm-key-not-protected"
    kind = "refused"


class PinFileNotPrivate(HsmError):
    code = "hsm-pin-file-not-private"
    kind = "not-configured"


class KeyNotOwned(HsmError):
    """The station refuses to delete a key it did not make."""

    code = "hsm-key-not-owned"
    kind = "refused"
