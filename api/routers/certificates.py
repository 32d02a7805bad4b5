"""Certificate requests: a CSR in, the chain (device + CA) out."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from api import issuance
from api.auth import (
    BOARD_UP,
    Forbidden,
    Role,
    authenticate,
    bearer_token,
    client_address,
    permit,
)
from api.context import AppContext
from api.schemas import CertificateIn, CertificateOut, PrintableText
from api.tls import client_certificate_pem
from station.errors import Kind, StationError
from station.ledger import ADHOC_BATCH
from station.whitelist import serial_hex

router = APIRouter(prefix="/v1/certificates", tags=["certificates"])

PEM_TYPES = ("application/x-pem-file", "application/pkcs10")
_BOARD_UP = frozenset(BOARD_UP)


@dataclass(frozen=True)
class CsrRequest:
    batch: str
    device_id: str
    csr: bytes
    reprovision: bool
    as_json: bool
    reason: str | None = None
    renews: str | None = None


class CsrQuery(BaseModel):
    """The query of a raw PEM/DER CSR (JSON requests carry these in the body)."""

    batch: str | None = Field(default=None, max_length=128)
    device_id: str | None = Field(default=None, max_length=128)
    reprovision: bool = False
    reason: PrintableText | None = Field(default=None, min_length=1, max_length=256)
    renews: str | None = Field(default=None, pattern=r"^[0-9a-f]{1,40}$")


async def csr_request(request: Request) -> CsrRequest:
    """JSON {batch, device_id, csr}, or a raw PEM/DER CSR with batch and device_id in the query."""
    try:
        query = CsrQuery.model_validate(request.query_params)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False)
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in errors]) from None
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if ctype == "application/json":
        try:
            data = CertificateIn.model_validate_json(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_context=False)) from None
        return CsrRequest(
            data.batch,
            data.device_id,
            data.csr.encode(),
            data.reprovision,
            True,
            data.reason,
            data.renews,
        )
    if ctype in PEM_TYPES:
        if not query.batch or not query.device_id:
            raise StationError(
                "a raw CSR needs the batch and device_id query parameters",
                code="invalid-request",
                kind=Kind.INVALID,
            )
        return CsrRequest(
            query.batch,
            query.device_id,
            body,
            query.reprovision,
            False,
            query.reason,
            query.renews,
        )
    raise StationError(
        f"send application/json, {' or '.join(PEM_TYPES)}",
        code="unsupported-media-type",
        kind=Kind.UNSUPPORTED_MEDIA,
    )


def refuse_to_boards(req: CsrRequest) -> None:
    """What a board token may not ask for: re-provisioning, and the ``adhoc`` batch
    (its subject comes from the CSR, so a board would name itself)."""
    if req.reprovision:
        raise Forbidden("re-provisioning a board needs the operator role")
    if req.batch == ADHOC_BATCH:
        raise Forbidden(
            f"the {ADHOC_BATCH!r} batch takes its subject from the CSR: operator or admin only",
            code="adhoc-needs-operator",
        )


def _check_renewal(station: AppContext, request: Request, req: CsrRequest) -> None:
    """A renewal comes with the certificate it renews as the TLS client certificate
    (checked against the station's CA by the TLS layer, here against the ledger).

    Codes: renewal-needs-certificate, renewal-certificate-mismatch."""
    pem = client_certificate_pem(request)
    if pem is None:
        raise StationError(
            "a renewal is sent over HTTPS with the current certificate as the TLS client "
            "certificate",
            code="renewal-needs-certificate",
            kind=Kind.UNAUTHENTICATED,
        )
    cert = x509.load_pem_x509_certificate(pem.encode())
    serial = serial_hex(cert.serial_number)
    try:
        record = station.ledger.certificate(serial)
    except StationError:
        record = None
    if (
        record is None
        or serial != req.renews
        or record.device_id != req.device_id
        or record.fingerprint != cert.fingerprint(hashes.SHA256()).hex()
    ):
        raise StationError(
            f"the TLS client certificate is not certificate {req.renews} of {req.device_id!r}",
            code="renewal-certificate-mismatch",
            kind=Kind.FORBIDDEN,
        )


def _query_parameters() -> list[dict[str, object]]:
    props = CsrQuery.model_json_schema()["properties"]
    return [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in props.items()
    ]


# The route takes the bare Request (see request_certificate), so what FastAPI would
# have derived from dependencies is written here: the bearer scheme and the query.
_BODY_DOC = {
    "security": [{"HTTPBearer": []}],
    "parameters": _query_parameters(),
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": CertificateIn.model_json_schema()},
            "application/x-pem-file": {"schema": {"type": "string"}},
            "application/pkcs10": {"schema": {"type": "string", "format": "binary"}},
        },
    },
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
        422: {"description": "the request is not valid"},
    },
)
async def request_certificate(request: Request) -> Response:
    # The hot route takes no FastAPI dependencies: solving them (station, bearer,
    # role, query: seven nested solves) cost more CPU per request than the rest of
    # the HTTP layer. It calls the functions the dependencies of the other routes use.
    station: AppContext = request.app.state.station
    token = bearer_token(request.headers.get("authorization"))
    who = permit(await authenticate(station, token, client_address(request)), _BOARD_UP)
    req = await csr_request(request)
    if who.role == Role.BOARD:
        refuse_to_boards(req)
    if req.renews is not None:
        await run_in_threadpool(_check_renewal, station, request, req)
    # The event loop only parses and answers; the ledger, policy and HSM work runs in
    # the station's issue executor (see AppContext.issue_executor).
    issue = functools.partial(
        issuance.issue,
        station,
        req.batch,
        req.device_id,
        req.csr,
        reprovision=req.reprovision,
        reason=req.reason,
        renews=req.renews,
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
