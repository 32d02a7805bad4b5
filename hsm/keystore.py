"""The key store: one PKCS#11 token, one logged-in session per process, keys by URI.

python-pkcs11 initialises the module with ``C_Initialize(NULL)``, so SoftHSM
runs without mutexes while the GIL is released during every call: two threads
signing at once can crash the process. Every PKCS#11 call in this process goes
through one lock. A single thread still signs 12,000-17,000 EC P-256 digests a
second, well above what the certificate builder around it can use; for more
throughput run more processes (each logs in once).

A broken session (token removed, session closed, module re-initialised) is
detected on the next call: the store drops its handles, logs in again (starting
the module anew if a fresh session fails too) and retries with a short backoff
(about half a second in all), so the station recovers without a restart when the
token returns. A PIN the token refused is never offered again (see _login).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
from pkcs11.util.rsa import encode_rsa_public_key

from hsm.errors import (
    HsmError,
    KeyExists,
    KeyNotFound,
    MechanismNotSupported,
    ModuleLoadError,
    PinLocked,
    TokenNotFound,
    TokenUnavailable,
    WrongPin,
)
from hsm.signer import HsmEcPrivateKey, HsmPrivateKey, HsmRsaPrivateKey
from hsm.uri import Pkcs11Uri

T = TypeVar("T")

# One lock for every PKCS#11 call in the process (see the module docstring).
_LOCK = threading.RLock()
# Logged-in sessions shared by every KeyStore of this process: PKCS#11 login is
# per application, a second login raises UserAlreadyLoggedIn.
_SESSIONS: dict[tuple[str, str], Any] = {}
# Set in a forked child (as station/ledger/db.py notices forks: a callback, not a
# getpid() per call): the sessions and handles it inherited are not valid in it.
_FORKED = False


def _after_fork_in_child() -> None:
    global _FORKED
    _FORKED = True


os.register_at_fork(after_in_child=_after_fork_in_child)

_BROKEN_SESSION = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.UserNotLoggedIn,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.DeviceError,
)
_CRYPTOKI_NOT_INITIALIZED = 0x190
# Digests of user PINs a token refused, per token (see KeyStore._login).
_PIN_KEY = os.urandom(32)
_REFUSED_PINS: dict[str, bytes] = {}
_OPEN_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.2)


class KeyType(StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"

    @property
    def is_ec(self) -> bool:
        return self in (KeyType.EC_P256, KeyType.EC_P384)


_CURVE_NAMES = {KeyType.EC_P256: "secp256r1", KeyType.EC_P384: "secp384r1"}
_RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072}


@dataclass(frozen=True)
class TokenInfo:
    label: str
    serial: str
    manufacturer: str
    model: str
    slot_id: int


def _load_lib(module: str) -> Any:
    try:
        return pkcs11.lib(module)
    except (OSError, RuntimeError, p11e.PKCS11Error) as exc:
        raise ModuleLoadError(
            f"cannot load the PKCS#11 module {module!r} ({exc.__class__.__name__}); "
            "install the HSM vendor's module or correct module-path in STATION_CA_KEY_URI"
        ) from None


def reset_module(module: str) -> None:
    """Re-initialise a module so that tokens created since it was loaded become visible.

    Every session of this process on that module is invalidated; key stores log
    in again on their next call.
    """
    with _LOCK:
        lib = _load_lib(module)
        for key in [k for k in _SESSIONS if k[0] == module]:
            _SESSIONS.pop(key, None)
        lib.reinitialize()


class KeyStore:
    """A PKCS#11 token named by an RFC 7512 URI, and the keys in it."""

    def __init__(self, uri: Pkcs11Uri | str, *, default_module: str) -> None:
        self.uri = Pkcs11Uri.parse(uri) if isinstance(uri, str) else uri
        self.module = self.uri.module_path or default_module
        self._handles: dict[tuple[str | None, bytes | None, ObjectClass], Any] = {}
        # Registry key of this store's token once found: the hot path then skips
        # the slot scan (C_GetSlotList + C_GetTokenInfo per slot) on every call.
        self._session_key: tuple[str, str] | None = None

    def __repr__(self) -> str:
        return f"KeyStore({self.uri})"

    # -- sessions -------------------------------------------------------------
    def _select_token(self, lib: Any) -> Any:
        wanted = []
        for name, value in (
            ("token", self.uri.token),
            ("serial", self.uri.serial),
            ("slot-id", self.uri.slot_id),
        ):
            if value is not None:
                wanted.append(f"{name}={value}")
        found = []
        for slot in lib.get_slots(token_present=True):
            if self.uri.slot_id is not None and slot.slot_id != self.uri.slot_id:
                continue
            try:
                token = slot.get_token()
            except (p11e.TokenNotPresent, p11e.TokenNotRecognised):
                continue
            if self.uri.token is not None and token.label != self.uri.token:
                continue
            if self.uri.serial is not None and _text(token.serial) != self.uri.serial:
                continue
            found.append(token)
        if not found:
            raise TokenNotFound(
                f"no token matching {' '.join(wanted) or 'the key URI'} in {self.module}; "
                f"list tokens with `pkcs11-tool --module {self.module} -L`"
            )
        if len(found) > 1:
            raise TokenNotFound(
                f"{len(found)} tokens match {' '.join(wanted) or 'the key URI'}; "
                "add serial= or slot-id= to the key URI"
            )
        return found[0]

    def _session(self) -> Any:
        """The logged-in session, opened on first use.

        SoftHSM's file store is not safe against another process opening the
        same token at the same instant (seen here: 5 of 60 simultaneous starts
        failed to find or open it), and a factory HSM can be slow to show a
        token after a restart; so a token that is missing or refuses a session
        is looked for again, after re-initialising the module, a few times over
        about half a second before the error is final.
        """
        for delay in _OPEN_RETRY_DELAYS:
            try:
                return self._open_session()
            except (TokenNotFound, TokenUnavailable):
                time.sleep(delay)
                with contextlib.suppress(p11e.PKCS11Error, ModuleLoadError):
                    reset_module(self.module)
        return self._open_session()

    def _open_session(self) -> Any:
        global _FORKED
        if _FORKED:
            _SESSIONS.clear()
            self._handles.clear()
            _FORKED = False
            with contextlib.suppress(p11e.PKCS11Error):
                _load_lib(self.module).reinitialize()
        if self._session_key is not None:
            session = _SESSIONS.get(self._session_key)
            if session is not None:
                return session
        lib = _load_lib(self.module)
        token = self._select_token(lib)
        key = (self.module, f"{token.label}|{_text(token.serial)}")
        self._session_key = key
        session = _SESSIONS.get(key)
        if session is not None:
            return session
        session = self._login(token, self.uri.read_pin())
        _SESSIONS[key] = session
        return session

    def _login(self, token: Any, pin: str | None) -> Any:
        """Open the logged-in session; a PIN the token refused is never offered again.

        Real HSMs lock the user PIN after a few failures, and the station retries
        on every request and health probe: it would lock the PIN within a minute.
        Only a digest of the refused PIN is kept, keyed per process.
        """
        who = f"{self.module}|{token.label}|{_text(token.serial)}"
        digest = hmac.new(_PIN_KEY, (pin or "").encode(), hashlib.sha256).digest()
        if _REFUSED_PINS.get(who) == digest:
            raise WrongPin(
                f"token {token.label!r} refused this user PIN before; the station will not "
                "offer it again (repeated failures lock the PIN): correct the file pin-source "
                "names"
            )
        try:
            session = _open_with_pin(token, pin)
        except p11e.PinIncorrect:
            _REFUSED_PINS[who] = digest
            raise WrongPin(
                f"token {token.label!r} refused the user PIN; check pin-source in the key URI "
                "(repeated failures lock the PIN)"
            ) from None
        except (p11e.PinLocked, p11e.UserPinNotInitialized) as exc:
            state = "locked" if isinstance(exc, p11e.PinLocked) else "not initialised"
            raise PinLocked(
                f"the user PIN of token {token.label!r} is {state}; the security officer must "
                "set it with the token's tools before the station can sign"
            ) from None
        except p11e.UserAlreadyLoggedIn:
            # Another part of this process logged in outside the registry.
            session = token.open(rw=True)
        except p11e.PKCS11Error as exc:
            raise TokenUnavailable(
                f"cannot open a session on token {token.label!r}: {exc.__class__.__name__}"
            ) from None
        finally:
            pin = None
        _REFUSED_PINS.pop(who, None)
        return session

    def _drop_session(self) -> None:
        for key in [k for k in _SESSIONS if k[0] == self.module]:
            _SESSIONS.pop(key, None)
        self._handles.clear()

    def call(self, fn: Callable[[Any], T]) -> T:
        """Run fn(session) under the process lock, translating PKCS#11 errors.

        A broken session (or a module error, which SoftHSM gives when another
        process holds its files) is dropped, and the call retried with a short
        backoff before TokenUnavailable is final.
        """
        with _LOCK:
            for attempt, delay in enumerate((*_OPEN_RETRY_DELAYS, None)):
                try:
                    return fn(self._session())
                except HsmError:
                    raise
                except p11e.MechanismInvalid:
                    raise MechanismNotSupported(
                        f"the token in {self.module} does not support the mechanism asked for"
                    ) from None
                except p11e.NoSuchKey:
                    raise KeyNotFound(f"no such key in the token named by {self.uri}") from None
                except p11e.PKCS11Error as exc:
                    broken = isinstance(exc, (*_BROKEN_SESSION, p11e.GeneralError)) or (
                        _CRYPTOKI_NOT_INITIALIZED in getattr(exc, "args", ())
                    )
                    if not broken:
                        raise HsmError(f"PKCS#11 call failed: {exc.__class__.__name__}") from None
                    self._drop_session()
                    if attempt >= 1:
                        # A fresh session failed too: the module's own view of the token
                        # is stale (SoftHSM answers CKR_GENERAL_ERROR for good once the
                        # token's storage went away under a session, even after it is
                        # back); starting the module again lets it find the token anew.
                        with contextlib.suppress(p11e.PKCS11Error, ModuleLoadError):
                            reset_module(self.module)
                    if delay is None:
                        raise TokenUnavailable(
                            f"the token stopped answering ({exc.__class__.__name__}) after "
                            f"{attempt + 1} attempts; check that it is connected"
                        ) from None
                    time.sleep(delay)
        raise AssertionError("unreachable")

    # -- keys -----------------------------------------------------------------
    def _find(self, session: Any, label: str | None, key_id: bytes | None, cls: ObjectClass) -> Any:
        cache_key = (label, key_id, cls)
        handle = self._handles.get(cache_key)
        if handle is not None:
            return handle
        attrs: dict[Attribute, Any] = {Attribute.CLASS: cls}
        if label is not None:
            attrs[Attribute.LABEL] = label
        if key_id is not None:
            attrs[Attribute.ID] = key_id
        objects = list(session.get_objects(attrs))
        if not objects:
            raise KeyNotFound(
                f"no {cls.name.lower().replace('_', ' ')} with "
                f"{'object=' + label if label else ''}{' id set' if key_id else ''} "
                f"in the token named by {self.uri}; run `station init` or fix the key URI"
            )
        if len(objects) > 1:
            raise KeyNotFound(f"{len(objects)} objects match {self.uri}; add id= to the key URI")
        self._handles[cache_key] = objects[0]
        return objects[0]

    def has_key(self, label: str | None = None, key_id: bytes | None = None) -> bool:
        label, key_id = self._names(label, key_id)
        try:
            self.call(lambda s: self._find(s, label, key_id, ObjectClass.PRIVATE_KEY))
        except KeyNotFound:
            return False
        return True

    def _names(self, label: str | None, key_id: bytes | None) -> tuple[str | None, bytes | None]:
        if label is None and key_id is None:
            label, key_id = self.uri.object, self.uri.id
        if label is None and key_id is None:
            raise KeyNotFound("the key URI names no object: add object=LABEL or id=%XX")
        return label, key_id

    def generate_key(
        self, key_type: KeyType, label: str | None = None, key_id: bytes | None = None
    ) -> HsmPrivateKey:
        """Generate a sign-only, sensitive, non-extractable key pair inside the token."""
        label, key_id = self._names(label, key_id)
        if self.has_key(label, key_id):
            raise KeyExists(f"the token already holds a key named by {self.uri}")
        key_id = key_id if key_id is not None else os.urandom(8)
        private_template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
        }
        public_template = {Attribute.TOKEN: True, Attribute.VERIFY: True}

        def generate(session: Any) -> None:
            common: dict[str, Any] = {
                "store": True,
                "label": label,
                "id": key_id,
                "capabilities": MechanismFlag.SIGN | MechanismFlag.VERIFY,
                "private_template": private_template,
                "public_template": public_template,
            }
            if key_type.is_ec:
                params = session.create_domain_parameters(
                    P11KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVE_NAMES[key_type])},
                    local=True,
                )
                params.generate_keypair(**common)
            else:
                session.generate_keypair(P11KeyType.RSA, _RSA_BITS[key_type], **common)

        self.call(generate)
        return self.private_key(label, key_id)

    def delete_key(self, label: str | None = None, key_id: bytes | None = None) -> None:
        label, key_id = self._names(label, key_id)

        def delete(session: Any) -> None:
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                with contextlib.suppress(KeyNotFound):
                    self._find(session, label, key_id, cls).destroy()
            self._handles.clear()

        self.call(delete)

    def private_key(self, label: str | None = None, key_id: bytes | None = None) -> HsmPrivateKey:
        """The key as an object pyca/cryptography's builders can sign with."""
        label, key_id = self._names(label, key_id)

        def describe(session: Any) -> tuple[P11KeyType, bytes]:
            priv = self._find(session, label, key_id, ObjectClass.PRIVATE_KEY)
            pub = self._find(session, label, key_id, ObjectClass.PUBLIC_KEY)
            kt = priv[Attribute.KEY_TYPE]
            spki = encode_ec_public_key(pub) if kt == P11KeyType.EC else encode_rsa_public_key(pub)
            return kt, spki

        kt, spki = self.call(describe)
        public = serialization.load_der_public_key(spki)
        ref = _KeyRef(self, label, key_id)
        if kt == P11KeyType.EC:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            return HsmEcPrivateKey(ref, public)
        if kt == P11KeyType.RSA:
            assert isinstance(public, rsa.RSAPublicKey)
            return HsmRsaPrivateKey(ref, public)
        raise MechanismNotSupported(f"key type {kt!r} is not supported for signing")

    def private_key_attributes(
        self, label: str | None = None, key_id: bytes | None = None
    ) -> dict[str, bool]:
        """The protection flags of the private key, as the token reports them."""
        label, key_id = self._names(label, key_id)

        def read(session: Any) -> dict[str, bool]:
            priv = self._find(session, label, key_id, ObjectClass.PRIVATE_KEY)
            names = "TOKEN SENSITIVE EXTRACTABLE NEVER_EXTRACTABLE SIGN DERIVE DECRYPT UNWRAP"

            return {n: bool(priv[getattr(Attribute, n)]) for n in names.split()}

        return self.call(read)

    def token_info(self) -> TokenInfo:
        def read(session: Any) -> TokenInfo:
            token = session.token
            return TokenInfo(
                label=token.label,
                serial=_text(token.serial),
                manufacturer=token.manufacturer_id,
                model=token.model,
                slot_id=token.slot.slot_id,
            )

        return self.call(read)

    def health(self) -> None:
        """Raise an HsmError naming the cause unless the token answers and the key is there."""
        label, key_id = self._names(None, None)

        def probe(session: Any) -> None:
            # Bypass the handle cache: a deleted key must show up here.
            attrs: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
            if label is not None:
                attrs[Attribute.LABEL] = label
            if key_id is not None:
                attrs[Attribute.ID] = key_id
            if not list(session.get_objects(attrs)):
                self._handles.clear()
                raise KeyNotFound(f"the CA key named by {self.uri} is no longer in the token")

        self.call(probe)

    def raw_sign(
        self, label: str | None, key_id: bytes | None, data: bytes, mechanism: Mechanism
    ) -> bytes:
        def sign(session: Any) -> bytes:
            key = self._find(session, label, key_id, ObjectClass.PRIVATE_KEY)
            return bytes(key.sign(data, mechanism=mechanism))

        return self.call(sign)

    def iter_objects(self) -> Iterator[tuple[str, str]]:
        """(class, label) of every object visible to the logged-in user."""

        def read(session: Any) -> list[tuple[str, str]]:
            return [
                (obj[Attribute.CLASS].name, obj[Attribute.LABEL]) for obj in session.get_objects({})
            ]

        yield from self.call(read)


@dataclass(frozen=True)
class _KeyRef:
    store: KeyStore
    label: str | None
    key_id: bytes | None

    def sign(self, data: bytes, mechanism: Mechanism) -> bytes:
        return self.store.raw_sign(self.label, self.key_id, data, mechanism)


def _open_with_pin(token: Any, pin: str | None) -> Any:
    """C_OpenSession + C_Login as user: the one place a PIN reaches the token."""
    return token.open(rw=True, user_pin=pin)


def _text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip()
    return value.strip()
