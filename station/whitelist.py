"""What the station publishes about a verified board: one whitelist entry."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


def serial_hex(serial: int) -> str:
    """The whitelist's spelling of a certificate serial: lowercase hex, no prefix, no padding."""
    return format(serial, "x")


@dataclass(frozen=True, slots=True)
class WhitelistEntry:
    serial: str  # lowercase hex, as serial_hex() spells it
    device_id: str
    batch: str
    fingerprint: str  # SHA-256 of the certificate DER, lowercase hex (= AWS certificateId)
    not_after: datetime  # timezone-aware UTC


@dataclass(frozen=True, slots=True)
class DelistedCertificate:
    """A certificate the ledger issued that must not be in the whitelist (any more)."""

    serial: str  # lowercase hex, as serial_hex() spells it
    fingerprint: str  # SHA-256 of the certificate DER, lowercase hex (= AWS certificateId)
    revoked: bool  # True: revoked in the ledger (final); False: the board left the whitelist
