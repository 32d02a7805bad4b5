"""Request and response bodies of the API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field
from pydantic_core import PydanticCustomError

from station.errors import PolicyError
from station.ledger import TOKEN_ROLES, KeyMode
from station.policy import CONTROL_CHARACTERS_PATTERN, check_printable, has_control_characters

# Text fields: a control character is refused with the error type ``bad_text``,
# which the problem handler answers as 422 ``bad-text`` (see api/problems.py).


def _no_control_characters(value: str) -> str:
    if has_control_characters(value):
        raise PydanticCustomError(
            "bad_text", "control characters (U+0000 to U+001F, U+007F) are not accepted"
        )
    return value


def _printable(value: str) -> str:
    try:
        check_printable(value, "the text")
    except PolicyError as exc:
        raise PydanticCustomError("bad_text", exc.message) from None
    return value


_NO_CONTROL_SCHEMA = Field(json_schema_extra={"pattern": CONTROL_CHARACTERS_PATTERN})
# No C0 control character nor DEL.
Text = Annotated[str, AfterValidator(_no_control_characters), _NO_CONTROL_SCHEMA]
# What a batch name must be (station.policy.check_printable): for names shown to people.
PrintableText = Annotated[str, AfterValidator(_printable), _NO_CONTROL_SCHEMA]


class BatchIn(BaseModel):
    name: Text = Field(min_length=1, max_length=128)
    product: PrintableText = Field(min_length=1, max_length=128)
    planned_count: int = Field(ge=1, le=2**31 - 1)  # the ledger's column is a 32-bit INTEGER
    key_mode: str = Field(default="board-ecc", json_schema_extra={"enum": list(KeyMode)})
    subject_template: Text = Field(
        min_length=1,
        max_length=1024,
        description="e.g. /O=company/OU=team/CN={device_id}/C=US, or * as presented",
    )
    days: int = Field(default=3650, ge=1, le=36500)
    crl_url: PrintableText | None = Field(
        default=None, max_length=512, description="CRL distribution point in its certificates"
    )
    ocsp_url: PrintableText | None = Field(
        default=None, max_length=512, description="OCSP responder (AIA) in its certificates"
    )


class BatchOut(BaseModel):
    name: str
    product: str
    planned_count: int
    key_mode: str
    subject_template: str
    days: int
    state: str
    operator: str | None
    station_id: str
    device_count: int
    created_at: datetime
    closed_at: datetime | None
    crl_url: str | None = None
    ocsp_url: str | None = None


class CertificateIn(BaseModel):
    batch: Text = Field(min_length=1, max_length=128)
    device_id: Text = Field(min_length=1, max_length=128)
    # PEM has line breaks; it is parsed (malformed-csr) and kept as DER, never as text.
    csr: str = Field(min_length=1, description="PKCS#10 CSR, PEM")
    reprovision: bool = False
    reason: PrintableText | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="why a board is re-provisioned; required to bring back a revoked board",
    )
    renews: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{1,40}$",
        description="Field renewal: the serial (lowercase hex) of the device's live "
        "certificate this one succeeds. Over HTTPS, with that certificate as the TLS "
        "client certificate; a new key.",
    )


class CertificateOut(BaseModel):
    device_id: str
    batch: str
    serial: str = Field(description="lowercase hex")
    fingerprint: str = Field(description="SHA-256 of the certificate DER, lowercase hex")
    chain: str = Field(description="device certificate then the CA chain, PEM")
    reused: bool


class DeviceOut(BaseModel):
    device_id: str
    batch: str
    state: str
    failure_code: str | None
    failure_message: str | None
    attempts: int
    station_id: str
    chain_sha256: str | None
    serial: str | None
    created_at: datetime
    updated_at: datetime
    key_ready_at: datetime | None
    issued_at: datetime | None
    installed_at: datetime | None
    verified_at: datetime | None
    failed_at: datetime | None
    revoked_at: datetime | None


class ChallengeOut(BaseModel):
    device_id: str
    nonce: str = Field(description="base64, the 32-byte challenge; send it back with the proof")
    message: str = Field(
        description="base64; sign these bytes with the device key: the proof message "
        "(context, device id, nonce; docs/serial-protocol.md section 'Proof message')"
    )


class ProofIn(BaseModel):
    nonce: Text = Field(min_length=1, max_length=256, description="base64, from the challenge")
    signature: Text = Field(
        min_length=1, max_length=4096, description="base64; ECDSA-SHA256 (DER) or RSA PKCS#1 v1.5"
    )


class RevokeIn(BaseModel):
    reason: PrintableText = Field(min_length=1, max_length=256)


class TokenIn(BaseModel):
    # Printed by `station token list` and in logs: no control characters (log injection).
    name: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")
    role: str = Field(json_schema_extra={"enum": list(TOKEN_ROLES)})
    expires_in: Text | None = Field(
        default=None, max_length=32, description="lifetime, e.g. 12h, 30d, 2w; none: until revoked"
    )


class TokenOut(BaseModel):
    name: str
    role: str
    token: str = Field(description="shown once; only its SHA-256 is stored")
    expires_at: datetime | None


class TokenInfo(BaseModel):
    """A token's record: never the token nor its hash."""

    name: str
    role: str
    created_at: datetime
    last_used_at: datetime | None = Field(description="to the minute")
    expires_at: datetime | None
    revoked_at: datetime | None


class BatchPage(BaseModel):
    """One page of batches: ``items`` from ``offset``, at most ``limit``, of ``total``."""

    items: list[BatchOut]
    total: int
    limit: int
    offset: int


class DevicePage(BaseModel):
    """One page of boards in enrolment order: ``items`` from ``offset`` of ``total``."""

    items: list[DeviceOut]
    total: int
    limit: int
    offset: int
