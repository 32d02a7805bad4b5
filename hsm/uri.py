"""RFC 7512 ``pkcs11:`` URIs: which module, token and object hold a key, and where its PIN is.

Every attribute of RFC 7512 that names a module, library, slot, token or object
is kept and honoured when the token is selected (``manufacturer``, ``model``,
``slot-description``, ``library-version``, ``module-name``...); an unknown path
or query attribute is refused rather than ignored, so a typo cannot silently
select the wrong token. ``str()`` of a URI never shows ``pin-value``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from hsm.errors import PinFileNotPrivate, PinUnavailable, UriError

# Path attributes kept as text, in the order str() writes them.
_TEXT_PATH_ATTRS = (
    "token",
    "manufacturer",
    "model",
    "serial",
    "object",
    "type",
    "slot-description",
    "slot-manufacturer",
    "library-manufacturer",
    "library-description",
    "library-version",
)
_PATH_ATTRS = {*_TEXT_PATH_ATTRS, "id", "slot-id"}
_QUERY_ATTRS = {"module-path", "module-name", "pin-source", "pin-value"}
# Where a module-name is looked for (RFC 7512 leaves it to the platform; these are
# Debian's and the vendors' usual places).
MODULE_DIRS = (
    "/usr/lib/x86_64-linux-gnu/pkcs11",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/pkcs11",
    "/usr/lib/softhsm",
    "/usr/lib",
    "/usr/local/lib/pkcs11",
    "/usr/local/lib",
)
_OBJECT_TYPES = {"private", "public", "cert", "secret-key", "data"}
# RFC 7512 "pk11-pchar" unreserved plus the sub-delims it allows unescaped.
_SAFE = "-._~:[]@!$'()*+,="


def _pct(value: str | bytes, extra: str = "") -> str:
    return quote(value, safe=_SAFE + extra)


@dataclass(frozen=True)
class Pkcs11Uri:
    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    serial: str | None = None
    slot_id: int | None = None
    type: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    slot_description: str | None = None
    slot_manufacturer: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: str | None = None
    module_path: str | None = None
    module_name: str | None = None
    pin_source: str | None = None
    pin_value: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        if not text.startswith("pkcs11:"):
            raise UriError("a key URI must start with 'pkcs11:' (RFC 7512)")
        body = text[len("pkcs11:") :]
        path, _, query = body.partition("?")
        values: dict[str, str | bytes] = {}
        for part, allowed, sep in ((path, _PATH_ATTRS, ";"), (query, _QUERY_ATTRS, "&")):
            for item in filter(None, part.split(sep)):
                name, eq, raw = item.partition("=")
                if not eq:
                    raise UriError(f"attribute {name!r} in the key URI has no '=value'")
                if name not in allowed:
                    raise UriError(f"unsupported attribute {name!r} in the key URI")
                if name in values:
                    raise UriError(f"attribute {name!r} appears twice in the key URI")
                decoded = unquote_to_bytes(raw)
                if name == "id":
                    values[name] = decoded
                else:
                    try:
                        values[name] = decoded.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise UriError(f"attribute {name!r} is not UTF-8") from exc
        slot_id: int | None = None
        if "slot-id" in values:
            try:
                slot_id = int(str(values["slot-id"]))
            except ValueError as exc:
                raise UriError("slot-id must be a decimal number") from exc
        obj_type = values.get("type")
        if obj_type is not None and obj_type not in _OBJECT_TYPES:
            raise UriError(f"type must be one of {sorted(_OBJECT_TYPES)}")
        if "pin-source" in values and "pin-value" in values:
            raise UriError("give either pin-source or pin-value, not both")
        version = values.get("library-version")
        if version is not None and not _is_version(str(version)):
            raise UriError("library-version must be MAJOR or MAJOR.MINOR (RFC 7512)")

        def s(key: str) -> str | None:
            v = values.get(key)
            return None if v is None else str(v)

        key_id = values.get("id")
        return cls(
            token=s("token"),
            object=s("object"),
            id=key_id if isinstance(key_id, bytes) else None,
            serial=s("serial"),
            slot_id=slot_id,
            type=s("type"),
            manufacturer=s("manufacturer"),
            model=s("model"),
            slot_description=s("slot-description"),
            slot_manufacturer=s("slot-manufacturer"),
            library_manufacturer=s("library-manufacturer"),
            library_description=s("library-description"),
            library_version=s("library-version"),
            module_path=s("module-path"),
            module_name=s("module-name"),
            pin_source=s("pin-source"),
            pin_value=s("pin-value"),
        )

    def to_string(self, *, include_pin: bool = False) -> str:
        path: list[str] = []
        for name in _TEXT_PATH_ATTRS:
            value = getattr(self, name.replace("-", "_"))
            if value is not None:
                path.append(f"{name}={_pct(value)}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        if self.slot_id is not None:
            path.append(f"slot-id={self.slot_id}")
        query: list[str] = []
        if self.module_path is not None:
            query.append(f"module-path={_pct(self.module_path, '/')}")
        if self.module_name is not None:
            query.append(f"module-name={_pct(self.module_name)}")
        if self.pin_source is not None:
            query.append(f"pin-source={_pct(self.pin_source, '/')}")
        if self.pin_value is not None and include_pin:
            query.append(f"pin-value={_pct(self.pin_value)}")
        text = "pkcs11:" + ";".join(path)
        return text + ("?" + "&".join(query) if query else "")

    def __str__(self) -> str:
        return self.to_string(include_pin=False)

    def with_object(self, label: str | None, key_id: bytes | None = None) -> Pkcs11Uri:
        return replace(self, object=label, id=key_id)

    def read_pin(self) -> str | None:
        """The user PIN, from pin-value or from the file pin-source names (``file:`` or a path)."""
        if self.pin_value is not None:
            return self.pin_value
        if self.pin_source is None:
            return None
        source = self.pin_source
        if source.startswith("file:"):
            source = source[len("file:") :]
            if source.startswith("//"):
                source = source[2:]
        path = Path(source)
        try:
            private = pin_file_is_private(path)
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PinUnavailable(
                f"cannot read the PIN file named by pin-source ({path}): {exc.strerror}; "
                "check the path and that the station's user may read it"
            ) from None
        if not private:
            raise PinFileNotPrivate(
                f"the PIN file {path} may be read by its group or by others; "
                f"make it private: chmod 600 {path}"
            )
        pin = text.rstrip("\r\n")
        if not pin:
            raise PinUnavailable(f"the PIN file {path} is empty")
        return pin


def pin_file_is_private(path: str | os.PathLike[str]) -> bool:
    """True when nobody but the owner can read the PIN file."""
    return (os.stat(path).st_mode & 0o077) == 0


def _is_version(text: str) -> bool:
    major, _, minor = text.partition(".")
    return major.isdigit() and (minor == "" or minor.isdigit()) and not text.endswith(".")


def resolve_module(uri: Pkcs11Uri, default_module: str) -> str:
    """The module file the URI names: module-path, else module-name looked up, else default."""
    if uri.module_name is not None and (
        "/" in uri.module_name or uri.module_name in ("", ".", "..")
    ):
        raise UriError("module-name is a module's name, not a path: use module-path for a path")
    if uri.module_path is not None:
        if uri.module_name is not None:
            base = Path(uri.module_path).name
            stem = base.removeprefix("lib").split(".so")[0]
            if uri.module_name not in (base, stem, base.split(".so")[0]):
                raise UriError(
                    f"module-name={uri.module_name} and module-path={uri.module_path} name "
                    "different modules; give one of them"
                )
        return uri.module_path
    if uri.module_name is None:
        return default_module
    name = uri.module_name
    candidates = [name, f"{name}.so", f"lib{name}.so", f"{name}-pkcs11.so", f"lib{name}_pkcs11.so"]
    for directory in MODULE_DIRS:
        for candidate in candidates:
            path = Path(directory) / candidate
            if path.is_file():
                return str(path)
    raise UriError(
        f"no PKCS#11 module called {name!r} in {', '.join(MODULE_DIRS)}; "
        "install the vendor's module or give module-path"
    )
