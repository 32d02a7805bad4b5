"""The keys this station generated in its token, so that it never deletes anyone else's.

A key ceremony's key, or a key another application keeps in the same token, is
not the station's to delete: `station hsm delete-key` deletes only a key listed
here (by the SHA-256 of its public key), and `station init --force` makes its new
key beside the old one instead of deleting it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from station.files import write_atomically
from station.settings import Settings


def _path(settings: Settings) -> Path:
    return settings.data_dir / "keys-made.json"


def public_key_sha256(key: Any) -> str:
    """SHA-256 (hex) of the SubjectPublicKeyInfo of a key, certificate or CSR."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _load(settings: Settings) -> list[dict[str, str]]:
    try:
        data = json.loads(_path(settings).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        return []
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


def _store(settings: Settings, entries: list[dict[str, str]]) -> None:
    write_atomically(_path(settings), (json.dumps(entries, indent=2) + "\n").encode())


def record(settings: Settings, uri: str, key: Any) -> None:
    """Remember that the station generated key (named by uri, shown without any PIN)."""
    entries = _load(settings)
    entries.append(
        {
            "uri": uri,
            "public_key_sha256": public_key_sha256(key),
            "made_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
    )
    _store(settings, entries)


def made_by_station(settings: Settings, key: Any) -> bool:
    digest = public_key_sha256(key)
    return any(e.get("public_key_sha256") == digest for e in _load(settings))


def forget(settings: Settings, key: Any) -> None:
    digest = public_key_sha256(key)
    _store(settings, [e for e in _load(settings) if e.get("public_key_sha256") != digest])
