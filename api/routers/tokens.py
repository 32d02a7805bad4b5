"""API tokens (admin): create, list, revoke."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, status

from api.auth import Admin, Role
from api.context import ContextDep
from api.schemas import TokenIn, TokenInfo, TokenOut
from station.durations import parse_duration
from station.errors import PolicyError

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TokenOut)
def create_token(body: TokenIn, station: ContextDep, _: Admin) -> TokenOut:
    if body.role not in {r.value for r in Role}:
        roles = ", ".join(r.value for r in Role)
        raise PolicyError(f"role {body.role!r} is not one of {roles}", code="bad-role")
    lifetime = None if body.expires_in is None else parse_duration(body.expires_in)
    ledger = station.ledger
    token = ledger.create_token(body.name, body.role, expires_in=lifetime)
    made = next(t for t in ledger.list_tokens() if t.name == body.name)
    return TokenOut(name=body.name, role=body.role, token=token, expires_at=made.expires_at)


@router.get("", response_model=list[TokenInfo])
def list_tokens(station: ContextDep, _: Admin) -> list[TokenInfo]:
    return [TokenInfo(**asdict(t)) for t in station.ledger.list_tokens()]


@router.delete("/{name}", response_model=TokenInfo)
def revoke_token(name: str, station: ContextDep, _: Admin) -> TokenInfo:
    revoked = station.ledger.revoke_token(name)
    # This worker forgets it at once; the others within the cache's 5 seconds.
    station.token_cache.clear()
    return TokenInfo(**asdict(revoked))
