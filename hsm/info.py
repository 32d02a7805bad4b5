"""What a token and its keys say about themselves: PKCS#11 info, flags, CKR names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pkcs11.exceptions as p11e
from pkcs11 import Attribute
from pkcs11 import KeyType as P11KeyType

from hsm.uri import Pkcs11Uri


def ckr_name(exc: BaseException) -> str:
    """CKR_* name of a python-pkcs11 exception (its class name, upper snake case)."""
    name = exc.__class__.__name__
    snake = "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper()
    return f"CKR_{snake}"


@dataclass(frozen=True)
class KeyInfo:
    """A private key in the token, its protection flags as the token reports them."""

    label: str
    id: bytes
    key_type: str
    attributes: dict[str, bool | None]

    @property
    def could_leave_the_token(self) -> bool:
        a = self.attributes
        return a.get("EXTRACTABLE") is not False or a.get("SENSITIVE") is not True

    @property
    def sign_only(self) -> bool:
        a = self.attributes
        return bool(a.get("SIGN")) and not any(a.get(n) for n in ("DECRYPT", "UNWRAP", "DERIVE"))


@dataclass(frozen=True)
class TokenInfo:
    label: str
    serial: str
    manufacturer: str
    model: str
    slot_id: int
    slot_description: str = ""
    library: str = ""
    library_version: str = ""


def _text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip()
    return value.strip()


def _matches(wanted: str | None, value: bytes | str) -> bool:
    return wanted is None or _text(value) == wanted


def _library_matches(lib: Any, uri: Pkcs11Uri) -> bool:
    if not _matches(uri.library_manufacturer, lib.manufacturer_id):
        return False
    if not _matches(uri.library_description, lib.library_description):
        return False
    if uri.library_version is not None:
        major, _, minor = uri.library_version.partition(".")
        have = tuple(lib.library_version)
        if int(major) != have[0] or (minor and int(minor) != have[1]):
            return False
    return True


def _version(value: Any) -> str:
    try:
        return ".".join(str(int(v)) for v in value)
    except (TypeError, ValueError):
        return str(value)


def _token_info(lib: Any, token: Any) -> TokenInfo:
    slot = token.slot
    return TokenInfo(
        label=_text(token.label),
        serial=_text(token.serial),
        manufacturer=_text(token.manufacturer_id),
        model=_text(token.model),
        slot_id=slot.slot_id,
        slot_description=_text(slot.slot_description),
        library=f"{_text(lib.manufacturer_id)} {_text(lib.library_description)}".strip(),
        library_version=_version(lib.library_version),
    )


_KEY_FLAGS = (
    "TOKEN",
    "PRIVATE",
    "SENSITIVE",
    "ALWAYS_SENSITIVE",
    "EXTRACTABLE",
    "NEVER_EXTRACTABLE",
    "SIGN",
    "DECRYPT",
    "UNWRAP",
    "DERIVE",
)


def _key_info(priv: Any) -> KeyInfo:
    attrs: dict[str, bool | None] = {}
    for name in _KEY_FLAGS:
        try:
            attrs[name] = bool(priv[getattr(Attribute, name)])
        except p11e.PKCS11Error:
            attrs[name] = None  # the token does not say
    try:
        kt = P11KeyType(priv[Attribute.KEY_TYPE]).name
    except (p11e.PKCS11Error, ValueError):
        kt = "unknown"
    try:
        label = _text(priv[Attribute.LABEL])
    except p11e.PKCS11Error:
        label = ""
    try:
        key_id = bytes(priv[Attribute.ID])
    except p11e.PKCS11Error:
        key_id = b""
    return KeyInfo(label=label, id=key_id, key_type=kt, attributes=attrs)
