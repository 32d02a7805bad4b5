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
A refusal (a template, mechanism or key type the token will not take) is not an
outage: it is raised at once as TemplateRefused or MechanismUnsupported naming the
module's CKR code, never retried. Tested on SoftHSM2, tpm2-pkcs11 and opencryptoki
(docs/hsm.md).
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
from pkcs11.constants import DEFAULT
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
from pkcs11.util.rsa import encode_rsa_public_key

from hsm.errors import (
    HsmError,
    KeyExists,
    KeyNotFound,
    KeyNotProtected,
    MechanismNotSupported,
    MechanismUnsupported,
    ModuleLoadError,
    PinLocked,
    TemplateRefused,
    TokenNotFound,
    TokenUnavailable,
    WrongPin,
)
from hsm.info import (
    KeyInfo,
    TokenInfo,
    _key_info,
    _library_matches,
    _matches,
    _text,
    _token_info,
    ckr_name,
)
from hsm.signer import HsmEcPrivateKey, HsmPrivateKey, HsmRsaPrivateKey
from hsm.uri import Pkcs11Uri, resolve_module

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
# The token said no to what was asked: deterministic, so never retried, and not
# an outage (a retry would get the same answer and could leave objects behind).
_TEMPLATE_REFUSALS = (
    p11e.AttributeTypeInvalid,
    p11e.AttributeValueInvalid,
    p11e.AttributeReadOnly,
    p11e.AttributeSensitive,
    p11e.TemplateIncomplete,
    p11e.TemplateInconsistent,
)
_MECHANISM_REFUSALS = (
    p11e.MechanismInvalid,
    p11e.MechanismParamInvalid,
    p11e.KeyTypeInconsistent,
    p11e.KeySizeRange,
    p11e.DomainParamsInvalid,
    p11e.FunctionNotSupported,
)
# Mechanism lists, probed once per process and token.
_MECHANISMS: dict[tuple[str, str], frozenset[Mechanism]] = {}
# Digests of user PINs a token refused, per token (see KeyStore._login).
_PIN_KEY = os.urandom(32)
_REFUSED_PINS: dict[str, bytes] = {}
_OPEN_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.2)


class KeyType(StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @property
    def is_ec(self) -> bool:
        return self in (KeyType.EC_P256, KeyType.EC_P384)


_CURVE_NAMES = {KeyType.EC_P256: "secp256r1", KeyType.EC_P384: "secp384r1"}


_RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072, KeyType.RSA_4096: 4096}


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
        self.module = resolve_module(self.uri, default_module)
        self._handles: dict[tuple[str | None, bytes | None, ObjectClass], Any] = {}
        # Registry key of this store's token once found: the hot path then skips
        # the slot scan (C_GetSlotList + C_GetTokenInfo per slot) on every call.
        self._session_key: tuple[str, str] | None = None

    def __repr__(self) -> str:
        return f"KeyStore({self.uri})"

    # -- sessions -------------------------------------------------------------
    def _select_token(self, lib: Any) -> Any:
        u = self.uri
        wanted = [
            f"{name}={value}"
            for name, value in (
                ("token", u.token),
                ("manufacturer", u.manufacturer),
                ("model", u.model),
                ("serial", u.serial),
                ("slot-id", u.slot_id),
                ("slot-description", u.slot_description),
                ("slot-manufacturer", u.slot_manufacturer),
                ("library-manufacturer", u.library_manufacturer),
                ("library-description", u.library_description),
                ("library-version", u.library_version),
            )
            if value is not None
        ]
        found = []
        if _library_matches(lib, u):
            for slot in lib.get_slots(token_present=True):
                if u.slot_id is not None and slot.slot_id != u.slot_id:
                    continue
                if not _matches(u.slot_description, slot.slot_description):
                    continue
                if not _matches(u.slot_manufacturer, slot.manufacturer_id):
                    continue
                try:
                    token = slot.get_token()
                except (p11e.TokenNotPresent, p11e.TokenNotRecognised):
                    continue
                if not _matches(u.token, token.label) or not _matches(u.serial, token.serial):
                    continue
                if not _matches(u.manufacturer, token.manufacturer_id):
                    continue
                if not _matches(u.model, token.model):
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
                except _MECHANISM_REFUSALS as exc:
                    raise MechanismUnsupported(
                        f"the token in {self.module} refused the mechanism or key type asked "
                        f"for ({ckr_name(exc)}); `station hsm check` lists what it offers"
                    ) from None
                except _TEMPLATE_REFUSALS as exc:
                    raise TemplateRefused(
                        f"the token in {self.module} refused an attribute asked for "
                        f"({ckr_name(exc)})"
                    ) from None
                except p11e.NoSuchKey:
                    raise KeyNotFound(f"no such key in the token named by {self.uri}") from None
                except p11e.PKCS11Error as exc:
                    broken = isinstance(exc, (*_BROKEN_SESSION, p11e.GeneralError)) or (
                        _CRYPTOKI_NOT_INITIALIZED in getattr(exc, "args", ())
                    )
                    if not broken:
                        raise HsmError(f"PKCS#11 call failed: {ckr_name(exc)}") from None
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
                            f"the token stopped answering ({ckr_name(exc)}) after "
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
        """Generate a sign-only, sensitive, non-extractable key pair inside the token.

        Asked first with every attribute the station's policy names (private key
        sign-only: no decrypt, unwrap or derive; public key verify-only); a token
        that refuses one of the optional ones (a TPM sets the public key's usage
        itself and refuses CKA_VERIFY or CKA_ENCRYPT given explicitly) is asked
        again without the public key's, then with only what the standard needs:
        token, private, sensitive, not extractable, sign (opencryptoki then makes
        a key that may decrypt too, which is why the full template comes first).
        The new key's flags are read back: a key that could leave the token is
        deleted and refused. A failed generation leaves no object behind.
        """
        label, key_id = self._names(label, key_id)
        if self.has_key(label, key_id):
            raise KeyExists(f"the token already holds a key named by {self.uri}")
        # A fresh id: whatever carries it after a failure is this call's half pair.
        new_id = key_id if key_id is not None else os.urandom(8)
        gen_mech = Mechanism.EC_KEY_PAIR_GEN if key_type.is_ec else Mechanism.RSA_PKCS_KEY_PAIR_GEN
        offered = self.mechanisms()
        if offered and gen_mech not in offered:
            raise MechanismUnsupported(
                f"the token in {self.module} cannot generate {key_type.value} keys "
                f"({gen_mech.name} is not in its mechanism list)"
            )
        if not key_type.is_ec:
            low, high = self._key_sizes(gen_mech)
            bits = _RSA_BITS[key_type]
            if high and not (low or 0) <= bits <= high:
                raise MechanismUnsupported(
                    f"the token in {self.module} makes RSA keys of {low} to {high} bits, "
                    f"not {bits} ({gen_mech.name}'s key sizes)"
                )
        required = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
        }
        full_private = {
            **required,
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
        }
        full_public = {
            Attribute.TOKEN: True,
            Attribute.VERIFY: True,
            Attribute.ENCRYPT: False,
            Attribute.WRAP: False,
        }
        # DEFAULT leaves an attribute out of the template (python-pkcs11 would
        # otherwise set every capability flag explicitly).
        min_private = {
            **required,
            Attribute.DECRYPT: DEFAULT,
            Attribute.UNWRAP: DEFAULT,
            Attribute.DERIVE: DEFAULT,
        }
        min_public = {
            Attribute.TOKEN: True,
            Attribute.VERIFY: DEFAULT,
            Attribute.ENCRYPT: DEFAULT,
            Attribute.WRAP: DEFAULT,
        }

        def attempt(session: Any, private: dict[Any, Any], public: dict[Any, Any]) -> None:
            common: dict[str, Any] = {
                "store": True,
                "label": label,
                "id": new_id,
                "capabilities": MechanismFlag.SIGN | MechanismFlag.VERIFY,
                "private_template": private,
                "public_template": public,
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

        def generate(session: Any) -> None:
            self._destroy_id(session, new_id)
            refusal: BaseException | None = None
            for private, public in (
                (full_private, full_public),
                (full_private, min_public),  # a TPM sets the public key's usage itself
                (min_private, min_public),
            ):
                try:
                    attempt(session, private, public)
                except (*_TEMPLATE_REFUSALS, p11e.GeneralError, p11e.FunctionFailed) as exc:
                    # CKR_GENERAL_ERROR is what tpm2-pkcs11 answers for a template it
                    # will not honour; it is a refusal if the session still answers.
                    if not self._alive(session):
                        raise
                    self._destroy_id(session, new_id)
                    refusal = exc
                    continue
                except _MECHANISM_REFUSALS as exc:
                    self._destroy_id(session, new_id)
                    raise MechanismUnsupported(
                        f"the token in {self.module} cannot generate a {key_type.value} key "
                        f"({ckr_name(exc)})"
                    ) from None
                except p11e.PKCS11Error:
                    with contextlib.suppress(p11e.PKCS11Error):
                        self._destroy_id(session, new_id)
                    raise
                self._handles.clear()
                return
            assert refusal is not None
            raise TemplateRefused(
                f"the token in {self.module} refused to generate a {key_type.value} key even "
                f"with the minimal template ({ckr_name(refusal)}); see its log"
            )

        self.call(generate)
        info = self.key_info(label, new_id)
        if info.could_leave_the_token:
            self.call(lambda s: self._destroy_id(s, new_id))
            self._handles.clear()
            raise KeyNotProtected(
                f"the token in {self.module} made a key that could leave it "
                f"(sensitive={info.attributes.get('SENSITIVE')}, "
                f"extractable={info.attributes.get('EXTRACTABLE')}); the station deleted it"
            )
        return self.private_key(label, new_id)

    def _key_sizes(self, mechanism: Mechanism) -> tuple[int | None, int | None]:
        """The key sizes the token says a mechanism takes (None when it will not say)."""

        def read(session: Any) -> tuple[int | None, int | None]:
            try:
                info = session.token.slot.get_mechanism_info(mechanism)
            except (p11e.PKCS11Error, ValueError):
                return None, None
            return info.min_key_length, info.max_key_length

        return self.call(read)

    def _alive(self, session: Any) -> bool:
        try:
            list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: b""}))
        except p11e.PKCS11Error:
            return False
        return True

    def _destroy_id(self, session: Any, key_id: bytes) -> None:
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            for obj in list(session.get_objects({Attribute.CLASS: cls, Attribute.ID: key_id})):
                obj.destroy()
        self._handles.clear()

    def delete_key(self, label: str | None = None, key_id: bytes | None = None) -> None:
        """Destroy the key pair. Callers decide whether the station may (it made the key)."""
        label, key_id = self._names(label, key_id)

        def delete(session: Any) -> None:
            priv = self._find(session, label, key_id, ObjectClass.PRIVATE_KEY)
            pub_id = key_id if key_id is not None else bytes(priv[Attribute.ID])
            with contextlib.suppress(KeyNotFound):
                self._find(session, label, pub_id or None, ObjectClass.PUBLIC_KEY).destroy()
            priv.destroy()
            self._handles.clear()

        self.call(delete)

    def key_info(self, label: str | None = None, key_id: bytes | None = None) -> KeyInfo:
        """Label, id, type and protection flags of the private key."""
        label, key_id = self._names(label, key_id)

        def read(session: Any) -> KeyInfo:
            priv = self._find(session, label, key_id, ObjectClass.PRIVATE_KEY)
            return _key_info(priv)

        return self.call(read)

    def mechanisms(self) -> frozenset[Mechanism]:
        """The token's mechanism list, asked once per process (empty if it will not say)."""
        if self._session_key is not None and self._session_key in _MECHANISMS:
            return _MECHANISMS[self._session_key]

        def read(session: Any) -> frozenset[Mechanism]:
            try:
                return frozenset(session.token.slot.get_mechanisms())
            except (p11e.PKCS11Error, ValueError):
                return frozenset()

        found = self.call(read)
        if self._session_key is not None:
            _MECHANISMS[self._session_key] = found
        return found

    def private_keys(self) -> list[KeyInfo]:
        """Every private key the logged-in user can see."""

        def read(session: Any) -> list[KeyInfo]:
            objs = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
            return [_key_info(o) for o in objs]

        return self.call(read)

    def private_key(self, label: str | None = None, key_id: bytes | None = None) -> HsmPrivateKey:
        """The key as an object pyca/cryptography's builders can sign with."""
        label, key_id = self._names(label, key_id)

        def describe(session: Any) -> tuple[P11KeyType, bytes]:
            priv = self._find(session, label, key_id, ObjectClass.PRIVATE_KEY)
            # The public key by the private key's id too: a stray public key with the
            # same label (another tool's failed generation) does not make it ambiguous.
            pub_id = key_id if key_id is not None else bytes(priv[Attribute.ID]) or None
            pub = self._find(session, label, pub_id, ObjectClass.PUBLIC_KEY)
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
            return _token_info(_load_lib(self.module), session.token)

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
        self,
        label: str | None,
        key_id: bytes | None,
        data: bytes,
        mechanism: Mechanism,
        mechanism_param: Any = None,
    ) -> bytes:
        def sign(session: Any) -> bytes:
            key = self._find(session, label, key_id, ObjectClass.PRIVATE_KEY)
            return bytes(key.sign(data, mechanism=mechanism, mechanism_param=mechanism_param))

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

    def sign(self, data: bytes, mechanism: Mechanism, mechanism_param: Any = None) -> bytes:
        return self.store.raw_sign(self.label, self.key_id, data, mechanism, mechanism_param)

    def mechanisms(self) -> frozenset[Mechanism]:
        return self.store.mechanisms()


def _open_with_pin(token: Any, pin: str | None) -> Any:
    """C_OpenSession + C_Login as user: the one place a PIN reaches the token."""
    return token.open(rw=True, user_pin=pin)


def list_tokens(module: str) -> list[TokenInfo]:
    """Every initialised token the module shows (no login)."""
    with _LOCK:
        lib = _load_lib(module)
        out = []
        for slot in lib.get_slots(token_present=True):
            try:
                token = slot.get_token()
            except p11e.PKCS11Error:
                continue
            if not token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
                continue  # a free slot (SoftHSM always shows one)
            out.append(_token_info(lib, token))
        return out
