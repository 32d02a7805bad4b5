"""The station's CA chain."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from api.auth import AnyRole
from api.context import ContextDep

router = APIRouter(prefix="/v1/ca", tags=["ca"])


@router.get(
    "",
    responses={
        200: {
            "content": {"application/x-pem-file": {}, "application/json": {}},
            "description": "the CA chain (PEM), or its description with Accept: application/json",
        }
    },
)
def get_ca(request: Request, station: ContextDep, _: AnyRole) -> Any:
    ca = station.ca
    if "application/json" in request.headers.get("accept", ""):
        return {**ca.describe(), "chain": ca.chain_pem.decode()}
    return Response(ca.chain_pem, media_type="application/x-pem-file")
