"""Boards: read, list, proof of possession, revoke."""

from __future__ import annotations

import base64
import binascii
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query

from api.auth import Admin, BoardUp, Reader
from api.context import ContextDep
from api.schemas import ChallengeOut, DeviceOut, DevicePage, ProofIn, RevokeIn
from station.errors import StationError
from station.ledger import DeviceState
from station.ledger.proof import signed_message

router = APIRouter(prefix="/v1/devices", tags=["devices"])

INT64_MAX = 2**63 - 1  # the largest OFFSET SQLite and PostgreSQL take


def _b64(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise StationError(f"{field} is not valid base64", code="bad-base64") from None


@router.get("", response_model=DevicePage)
def list_devices(
    station: ContextDep,
    _: Reader,
    batch: str | None = None,
    state: Annotated[str | None, Query(json_schema_extra={"enum": list(DeviceState)})] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
) -> DevicePage:
    devices = station.ledger.list_devices(batch, state, limit=limit, offset=offset)
    # The total from the ledger's per-batch, per-state counts (one grouped query).
    counts = station.ledger.counts(batch)
    total = sum(n for states in counts.values() for s, n in states.items() if state in (None, s))
    return DevicePage(
        items=[DeviceOut(**asdict(d)) for d in devices], total=total, limit=limit, offset=offset
    )


@router.get("/{device_id}", response_model=DeviceOut)
def get_device(device_id: str, station: ContextDep, _: Reader) -> DeviceOut:
    return DeviceOut(**asdict(station.ledger.get_device(device_id)))


@router.post("/{device_id}/challenge", response_model=ChallengeOut)
def challenge(device_id: str, station: ContextDep, _: BoardUp) -> ChallengeOut:
    nonce = station.ledger.create_challenge(device_id)
    return ChallengeOut(
        device_id=device_id,
        nonce=base64.b64encode(nonce).decode(),
        message=base64.b64encode(signed_message(device_id, nonce)).decode(),
    )


@router.post("/{device_id}/proof", response_model=DeviceOut)
def proof(device_id: str, body: ProofIn, station: ContextDep, _: BoardUp) -> DeviceOut:
    nonce = _b64(body.nonce, "nonce")
    signature = _b64(body.signature, "signature")
    try:
        device = station.ledger.verify_proof(device_id, nonce, signature)
    except StationError as exc:
        station.activity.failed(device_id, None, exc.code, exc.message)
        raise
    return DeviceOut(**asdict(device))


@router.post("/{device_id}/revoke", response_model=DeviceOut)
def revoke(device_id: str, body: RevokeIn, station: ContextDep, _: Admin) -> DeviceOut:
    return DeviceOut(**asdict(station.ledger.revoke(device_id, body.reason)))
