"""API tokens (admin)."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.auth import Admin, Role
from api.context import ContextDep
from api.schemas import TokenIn, TokenOut
from station.errors import PolicyError

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TokenOut)
def create_token(body: TokenIn, station: ContextDep, _: Admin) -> TokenOut:
    if body.role not in {r.value for r in Role}:
        roles = ", ".join(r.value for r in Role)
        raise PolicyError(f"role {body.role!r} is not one of {roles}", code="bad-role")
    token = station.ledger.create_token(body.name, body.role)
    return TokenOut(name=body.name, role=body.role, token=token)
