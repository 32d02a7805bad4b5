"""RFC 7512 ``pkcs11:`` URIs: which module, token and object hold a key, and where its PIN is.

Only the attributes the station needs are understood; an unknown path or query
attribute is refused rather than ignored, so a typo cannot silently select the
wrong token. ``str()`` of a URI never shows ``pin-value``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from hsm.errors import PinUnavailable, UriError

_PATH_ATTRS = {"token", "object", "id", "serial", "slot-id", "type", "manufacturer", "model"}
_QUERY_ATTRS = {"module-path", "module-name", "pin-source", "pin-value"}
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
    module_path: str | None = None
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
            module_path=s("module-path"),
            pin_source=s("pin-source"),
            pin_value=s("pin-value"),
        )

    def to_string(self, *, include_pin: bool = False) -> str:
        path: list[str] = []
        for name, value in (
            ("token", self.token),
            ("object", self.object),
            ("serial", self.serial),
            ("type", self.type),
        ):
            if value is not None:
                path.append(f"{name}={_pct(value)}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        if self.slot_id is not None:
            path.append(f"slot-id={self.slot_id}")
        query: list[str] = []
        if self.module_path is not None:
            query.append(f"module-path={_pct(self.module_path, '/')}")
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
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PinUnavailable(
                f"cannot read the PIN file named by pin-source ({path}): {exc.strerror}; "
                "check the path and that the station's user may read it"
            ) from None
        pin = text.rstrip("\r\n")
        if not pin:
            raise PinUnavailable(f"the PIN file {path} is empty")
        return pin


def pin_file_is_private(path: str | os.PathLike[str]) -> bool:
    """True when nobody but the owner can read the PIN file."""
    return (os.stat(path).st_mode & 0o077) == 0
