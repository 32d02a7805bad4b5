"""Certificate requests: a CSR in, the chain (device + CA) out."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api import provision
from api.auth import BoardUp, Forbidden, Role
from api.context import StationDep
from api.schemas import CertificateIn, CertificateOut
from station.errors import StationError
from station.whitelist import serial_hex

router = APIRouter(prefix="/v1/certificates", tags=["certificates"])

PEM_TYPES = ("application/x-pem-file", "application/pkcs10")


@dataclass(frozen=True)
class CsrRequest:
    batch: str
    device_id: str
    csr: bytes
    reprovision: bool
    as_json: bool


async def csr_request(
    request: Request,
    batch: Annotated[str | None, Query(max_length=128)] = None,
    device_id: Annotated[str | None, Query(max_length=128)] = None,
    reprovision: bool = False,
) -> CsrRequest:
    """JSON {batch, device_id, csr}, or a raw PEM/DER CSR with batch and device_id in the query."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if ctype == "application/json":
        try:
            data = CertificateIn.model_validate_json(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_context=False)) from None
        return CsrRequest(data.batch, data.device_id, data.csr.encode(), data.reprovision, True)
    if ctype in PEM_TYPES:
        if not batch or not device_id:
            raise StationError(
                "a raw CSR needs the batch and device_id query parameters",
                code="invalid-request",
                http_status=422,
            )
        return CsrRequest(batch, device_id, body, reprovision, False)
    raise StationError(
        f"send application/json, {' or '.join(PEM_TYPES)}",
        code="unsupported-media-type",
        http_status=415,
    )


_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": CertificateIn.model_json_schema()},
            "application/x-pem-file": {"schema": {"type": "string"}},
            "application/pkcs10": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "",
    openapi_extra=_BODY_DOC,
    responses={
        200: {"description": "the certificate this device already had (same key)"},
        201: {
            "description": "a new certificate",
            "content": {
                "application/json": {"schema": CertificateOut.model_json_schema()},
                "application/x-pem-file": {"schema": {"type": "string"}},
            },
        },
    },
)
async def request_certificate(
    station: StationDep, who: BoardUp, req: Annotated[CsrRequest, Depends(csr_request)]
) -> Response:
    if req.reprovision and who.role == Role.BOARD:
        raise Forbidden("re-provisioning a board needs the operator role")
    # The event loop only parses and answers; the ledger, policy and HSM work runs in
    # the station's issue executor (see Station.issue_executor).
    issue = functools.partial(
        provision.issue, station, req.batch, req.device_id, req.csr, reprovision=req.reprovision
    )
    result = await asyncio.get_running_loop().run_in_executor(station.issue_executor, issue)
    status = 200 if result.reused else 201
    serial = serial_hex(result.serial)
    if req.as_json:
        out = CertificateOut(
            device_id=req.device_id,
            batch=req.batch,
            serial=serial,
            fingerprint=result.fingerprint,
            chain=result.chain_pem.decode(),
            reused=result.reused,
        )
        return Response(out.model_dump_json(), status_code=status, media_type="application/json")
    return Response(
        result.chain_pem,
        status_code=status,
        media_type="application/x-pem-file",
        headers={"X-Certificate-Serial": serial, "X-Certificate-Fingerprint": result.fingerprint},
    )
