"""What relying parties fetch without a token: the CRL and OCSP answers.

``GET /crl``: the current CRL, DER, ``application/pkix-crl``, with ETag and
Last-Modified (a conditional GET costs no signature). ``POST /ocsp`` and
``GET /ocsp/{base64 request}`` (RFC 6960 appendix A): OCSP answers signed in the
token; a request that does not parse gets OCSP's own ``malformedRequest``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from email.utils import format_datetime
from urllib.parse import unquote

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api.context import ContextDep
from station.publish import crl as crls
from station.publish.ocsp import MEDIA_RESPONSE

router = APIRouter(tags=["publishing"])

CRL_MEDIA = "application/pkix-crl"
MAX_OCSP_REQUEST = 4096  # one certificate, a nonce: a few hundred bytes


@router.get(
    "/crl",
    response_class=Response,
    responses={200: {"content": {CRL_MEDIA: {}}, "description": "the current CRL (DER)"}},
)
def get_crl(request: Request, station: ContextDep) -> Response:
    made = crls.current(station.ledger.engine, station.ca, station.settings.station_id)
    etag = f'"{made.number}-{hashlib.sha256(made.der).hexdigest()[:16]}"'
    headers = {
        "ETag": etag,
        "Last-Modified": format_datetime(made.this_update, usegmt=True),
        "Cache-Control": "public, no-cache",
    }
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(made.der, media_type=CRL_MEDIA, headers=headers)


@router.post(
    "/ocsp",
    response_class=Response,
    responses={200: {"content": {MEDIA_RESPONSE: {}}, "description": "a DER OCSPResponse"}},
)
async def post_ocsp(request: Request, station: ContextDep) -> Response:
    body = await request.body()
    responder = station.ocsp_responder()
    if len(body) > MAX_OCSP_REQUEST:
        body = b""  # answered malformedRequest
    answer = await run_in_threadpool(responder.respond, body)
    return Response(answer, media_type=MEDIA_RESPONSE)


@router.get(
    "/ocsp/{encoded:path}",
    response_class=Response,
    responses={200: {"content": {MEDIA_RESPONSE: {}}, "description": "a DER OCSPResponse"}},
)
def get_ocsp(encoded: str, station: ContextDep) -> Response:
    try:
        der = base64.b64decode(unquote(encoded), validate=True)
    except (binascii.Error, ValueError):
        der = b""
    if len(der) > MAX_OCSP_REQUEST:
        der = b""
    return Response(station.ocsp_responder().respond(der), media_type=MEDIA_RESPONSE)
