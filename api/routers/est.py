"""EST (RFC 7030) under /.well-known/est/[{batch}/]: cacerts, csrattrs, simple(re)enroll,
serverkeygen.

The label is a batch name; requests without one go to ``STATION_EST_DEFAULT_BATCH``.
Every certificate comes from the station's one issuance path (api/issuance.py,
then ``Ledger.issue``): CSR policy, intent, HSM signature, ledger, audit.

* ``simpleenroll``: a board token (role board and up) as the HTTP Basic password,
  any user name (strongSwan's ``pki --est`` and curl only do Basic); the device id
  is the CSR's CN. The board is ``issued``.
* The board is ``verified`` (and whitelisted) once it presents its new certificate
  as a TLS client certificate on any EST request (``cacerts`` is the cheapest):
  its handshake signature proves it holds the key and installed the certificate,
  which is what the serial line's proof of possession proves.
* ``simplereenroll``: the device's current certificate as the TLS client
  certificate; a new key is required; the old certificate is superseded, the
  whitelist follows the new serial (station/ledger/succession.py). Under the
  device's own batch's label or none (station/enroll/batch_label.py).
* ``serverkeygen``: as simpleenroll, for boards that cannot make keys, in batches
  whose keys the station makes (station/enroll/serverkeygen.py) and that the operator
  named in ``STATION_EST_SERVERKEYGEN_BATCHES``; HTTPS only.

Errors are RFC 7030's: a 4xx/5xx status and a one-line ``text/plain`` body
``code: message``; each refusal is audited (``est.refused``) and nothing is issued.
simple(re)enroll take ``board-ecc`` batches, serverkeygen ``see-rsa`` ones (whose keys
the station makes); the other combination is refused (``est-key-mode``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import threading
import weakref

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api import issuance
from api.auth import BOARD_UP, authenticate, client_address, permit
from api.context import AppContext
from api.problems import http_status
from api.tls import client_certificate_pem
from hsm.errors import HsmError
from station import policy
from station.enroll import est, serverkeygen
from station.enroll.batch_label import renewal_batch
from station.errors import ConflictError, Kind, NotFoundError, StationError
from station.ledger import CertificateRecord
from station.ledger.schema import CertState, KeyMode
from station.whitelist import serial_hex

log = logging.getLogger("api.est")

# Not in the OpenAPI document: EST is specified by RFC 7030 (docs/enrollment.md), not JSON.
router = APIRouter(prefix="/.well-known/est", tags=["est"], include_in_schema=False)

_BOARD_UP = frozenset(BOARD_UP)
_CACHE_LOCK = threading.Lock()
# Per app: batch -> key mode (a batch's key mode never changes once it is created).
_KEY_MODES: weakref.WeakKeyDictionary[AppContext, dict[str, str]] = weakref.WeakKeyDictionary()


class EstRefused(StationError):
    code = "est-refused"
    kind = Kind.FORBIDDEN


def _basic_password(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, param = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return param.strip() or None
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(param.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    _, sep, password = decoded.partition(":")
    return password if sep and password else None


_ENROL = frozenset({KeyMode.BOARD_ECC.value})  # the board makes its key: (re)enrol
_ANY_MODE = frozenset(m.value for m in KeyMode)  # cacerts, csrattrs: no key involved


def _batch_of(station: AppContext, label: str | None, takes: frozenset[str] = _ENROL) -> str:
    """The batch a label names (or the default), checked to exist and to take the
    operation (``takes``: the key modes it serves)."""
    batch = label if label is not None else station.settings.est_default_batch
    if not batch:
        raise NotFoundError(
            "no EST label and no default batch (STATION_EST_DEFAULT_BATCH)",
            code="est-no-default-batch",
        )
    with _CACHE_LOCK:
        modes = _KEY_MODES.setdefault(station, {})
        mode = modes.get(batch)
    if mode is None:
        mode = station.ledger.get_batch(batch).key_mode  # unknown-batch
        with _CACHE_LOCK:
            modes[batch] = mode
    if mode not in takes:
        if mode in serverkeygen.STATION_MADE:
            says = "its keys are made by the station: serverkeygen (or the serial line)"
        else:
            says = "its boards make their own keys: simpleenroll, not serverkeygen"
        raise EstRefused(f"batch {batch!r} is {mode}: {says}", code="est-key-mode")
    return batch


def _answer(exc: StationError | HsmError) -> Response:
    status = http_status(exc)
    message = exc.message if isinstance(exc, StationError) else str(exc)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="station EST"'
    body = f"{exc.code}: {message}\n".encode("utf-8", "replace")
    return Response(body, status_code=status, media_type="text/plain", headers=headers)


async def _refused(
    station: AppContext, exc: StationError | HsmError, op: str, label: str | None, entity: str
) -> Response:
    if _unavailable(exc):
        log.warning("EST %s: %s", op, exc)
    else:
        detail = {"op": op, "label": label, "code": exc.code}
        try:
            await run_in_threadpool(
                station.ledger.channel_audit.record, "est.refused", entity, detail
            )
        except Exception as audit_exc:  # the refusal is still answered
            log.warning("EST refusal not audited: %s", audit_exc)
    return _answer(exc)


def _unavailable(exc: StationError | HsmError) -> bool:
    return str(getattr(exc, "kind", "")) in (Kind.UNAVAILABLE, Kind.NOT_CONFIGURED)


def _client_record(
    station: AppContext, pem: str, *, renewing: bool = False
) -> tuple[x509.Certificate, CertificateRecord]:
    """The ledger's record of a TLS client certificate (the TLS layer checked its chain).

    A board's first request with its new certificate makes it verified. ``renewing``
    (simplereenroll) also takes a certificate whose renewal was never confirmed: the
    board never got the new one (a renewal intent a crash left, recovered unconfirmed)
    and still works with this one, so it may renew again from it.
    Codes: est-unknown-certificate, est-certificate-not-live.
    """
    cert = x509.load_pem_x509_certificate(pem.encode())
    try:
        record = station.ledger.certificate(serial_hex(cert.serial_number))
    except NotFoundError:
        raise EstRefused(
            "the client certificate is not in the station's ledger",
            code="est-unknown-certificate",
            kind=Kind.UNAUTHENTICATED,
        ) from None
    if record.fingerprint != cert.fingerprint(hashes.SHA256()).hex():
        raise EstRefused(
            "the client certificate differs from the ledger's", code="est-unknown-certificate"
        )
    live = {CertState.ISSUED.value} | ({CertState.RENEWING.value} if renewing else set())
    if record.state not in live:
        raise EstRefused(
            f"the client certificate is {record.state}, not live",
            code="est-certificate-not-live",
        )
    # Verified on first authenticated contact (station/ledger/contact.py).
    station.ledger.contact.authenticated(
        record.device_id, record.serial, proof="est-tls-client-certificate"
    )
    return cert, record


async def _tls_client(
    station: AppContext, request: Request, *, renewing: bool = False
) -> tuple[x509.Certificate, CertificateRecord] | None:
    pem = client_certificate_pem(request)
    if pem is None:
        return None
    return await run_in_threadpool(
        functools.partial(_client_record, station, pem, renewing=renewing)
    )


def _station(request: Request) -> AppContext:
    station: AppContext = request.app.state.station
    return station


# ------------------------------------------------------------------ cacerts


async def _cacerts(request: Request, label: str | None) -> Response:
    station = _station(request)
    try:
        await run_in_threadpool(_batch_of, station, label, _ANY_MODE)
        await _tls_client(station, request)
        ca = await run_in_threadpool(lambda: station.ca)
        chain = [ca.certificate, *ca.parents]
    except (StationError, HsmError) as exc:
        return await _refused(station, exc, "cacerts", label, "est")
    return Response(
        est.certs_only(chain),
        media_type=est.CACERTS,
        headers={"Content-Transfer-Encoding": "base64"},
    )


@router.get("/cacerts", summary="EST cacerts (default batch)")
async def cacerts_default(request: Request) -> Response:
    return await _cacerts(request, None)


@router.get("/{label}/cacerts", summary="EST cacerts: the CA chain, PKCS#7 certs-only")
async def cacerts(request: Request, label: str) -> Response:
    return await _cacerts(request, label)


# ----------------------------------------------------------------- csrattrs


async def _csrattrs(request: Request, label: str | None) -> Response:
    station = _station(request)
    try:
        batch = await run_in_threadpool(_batch_of, station, label, _ANY_MODE)
        await _tls_client(station, request)
        b = await run_in_threadpool(station.ledger.get_batch, batch)
    except (StationError, HsmError) as exc:
        return await _refused(station, exc, "csrattrs", label, "est")
    return Response(
        est.csr_attributes(b.subject_template, b.key_mode),
        media_type=est.CSRATTRS,
        headers={"Content-Transfer-Encoding": "base64"},
    )


@router.get("/csrattrs", summary="EST csrattrs (default batch)")
async def csrattrs_default(request: Request) -> Response:
    return await _csrattrs(request, None)


@router.get("/{label}/csrattrs", summary="EST csrattrs: key type and subject attributes")
async def csrattrs(request: Request, label: str) -> Response:
    return await _csrattrs(request, label)


# ------------------------------------------------------------- simpleenroll


def _issued(cert: x509.Certificate) -> Response:
    return Response(
        est.certs_only([cert]),
        media_type=est.CERTS_ONLY,
        headers={
            "Content-Transfer-Encoding": "base64",
            "X-Certificate-Serial": serial_hex(cert.serial_number),
        },
    )


async def _simpleenroll(request: Request, label: str | None) -> Response:
    station = _station(request)
    entity = "est"
    try:
        token = _basic_password(request.headers.get("authorization"))
        permit(await authenticate(station, token, client_address(request)), _BOARD_UP)
        batch = await run_in_threadpool(_batch_of, station, label)
        body = await request.body()
        csr = est.read_request(body, request.headers.get("content-type"))
        device_id = est.device_id_of(csr)
        entity = device_id
        issue = functools.partial(issuance.issue, station, batch, device_id, csr)
        result = await asyncio.get_running_loop().run_in_executor(station.issue_executor, issue)
    except (StationError, HsmError) as exc:
        return await _refused(station, exc, "simpleenroll", label, entity)
    return _issued(result.certificate)


@router.post("/simpleenroll", summary="EST simpleenroll (default batch)")
async def simpleenroll_default(request: Request) -> Response:
    return await _simpleenroll(request, None)


@router.post("/{label}/simpleenroll", summary="EST simpleenroll: a board token as Basic password")
async def simpleenroll(request: Request, label: str) -> Response:
    return await _simpleenroll(request, label)


# ----------------------------------------------------------- simplereenroll


async def _simplereenroll(request: Request, label: str | None) -> Response:
    station = _station(request)
    entity = "est"
    try:
        # Authentication first: an unknown client learns nothing about batches.
        client = await _tls_client(station, request, renewing=True)
        if client is None:
            raise EstRefused(
                "re-enrolment is authenticated by the device's current certificate as the "
                "TLS client certificate (over HTTPS)",
                code="est-no-client-certificate",
                kind=Kind.UNAUTHENTICATED,
            )
        current, record = client
        entity = record.device_id
        # The device's own batch (an unlabelled path included), and one that takes EST.
        batch = renewal_batch(label, record.batch, record.device_id)
        await run_in_threadpool(_batch_of, station, batch)
        body = await request.body()
        csr = est.read_request(body, request.headers.get("content-type"))
        if csr.subject != current.subject:
            # RFC 7030 4.2.2: the subject must be the current certificate's.
            raise ConflictError(
                "a re-enrolment CSR must carry the current certificate's subject",
                code="est-subject-mismatch",
            )
        issue = functools.partial(
            issuance.issue,
            station,
            batch,
            record.device_id,
            csr,
            renews=record.serial,
        )
        result = await asyncio.get_running_loop().run_in_executor(station.issue_executor, issue)
    except (StationError, HsmError) as exc:
        return await _refused(station, exc, "simplereenroll", label, entity)
    return _issued(result.certificate)


@router.post("/simplereenroll", summary="EST simplereenroll (default batch)")
async def simplereenroll_default(request: Request) -> Response:
    return await _simplereenroll(request, None)


@router.post(
    "/{label}/simplereenroll", summary="EST simplereenroll: the current certificate over TLS"
)
async def simplereenroll(request: Request, label: str) -> Response:
    return await _simplereenroll(request, label)


# ---------------------------------------------------------------- serverkeygen


def _made_and_issued(
    station: AppContext, batch: str, device_id: str, subject: x509.Name
) -> tuple[bytes, str, str]:
    """Make the board's key, issue its certificate, build the answer; wipe the
    station's copies (station/enroll/serverkeygen.py says which)."""
    made = serverkeygen.make_key(subject)
    body = bytearray()
    try:
        # Marked in the intent: a crash before the answer loses the key, and recovery
        # must then abandon the intent (serverkeygen-key-lost), not certify it.
        result = issuance.issue(station, batch, device_id, made.csr, station_made_key=True)
        serial = serial_hex(result.serial)
        station.ledger.channel_audit.record(
            "est.serverkeygen",
            device_id,
            {
                "serial": serial,
                "public_key_sha256": policy.public_key_sha256(made.csr),
                "key": f"rsa-{serverkeygen.RSA_BITS}, made in software, handed out, wiped",
            },
        )
        body, content_type = est.serverkeygen_body(made.pkcs8, result.certificate)
        return bytes(body), content_type, serial
    finally:
        serverkeygen.wipe(made.pkcs8, body)


async def _serverkeygen(request: Request, label: str | None) -> Response:
    station = _station(request)
    entity = "est"
    try:
        if request.url.scheme != "https":
            # RFC 7030 4.4: the key travels unencrypted inside TLS; never in the clear.
            raise EstRefused(
                "serverkeygen answers a private key: only over the station's HTTPS",
                code="est-serverkeygen-needs-tls",
            )
        token = _basic_password(request.headers.get("authorization"))
        permit(await authenticate(station, token, client_address(request)), _BOARD_UP)
        batch = await run_in_threadpool(_batch_of, station, label, serverkeygen.STATION_MADE)
        serverkeygen.check_enabled(batch, station.settings.est_serverkeygen_batches)
        body = await request.body()
        # RFC 7030 4.4.1: the CSR is a template; its key and signature are ignored
        # (parsed, never checked: a board that cannot make keys signs it with any).
        template = est.read_request(body, request.headers.get("content-type"))
        device_id = est.device_id_of(template)
        entity = device_id
        # The issuer's cheap refusals before the key's tens of milliseconds in the
        # issue executor; the issuer still judges in its transaction.
        await run_in_threadpool(station.ledger.prechecks.new_key, batch, device_id, template)
        make = functools.partial(_made_and_issued, station, batch, device_id, template.subject)
        answer, content_type, serial = await asyncio.get_running_loop().run_in_executor(
            station.issue_executor, make
        )
    except (StationError, HsmError) as exc:
        return await _refused(station, exc, "serverkeygen", label, entity)
    return Response(
        answer,
        media_type=content_type,
        headers={"X-Certificate-Serial": serial, "Cache-Control": "no-store"},
    )


@router.post("/serverkeygen", summary="EST serverkeygen (default batch)")
async def serverkeygen_default(request: Request) -> Response:
    return await _serverkeygen(request, None)


@router.post("/{label}/serverkeygen", summary="EST serverkeygen: the station makes the key")
async def serverkeygen_labelled(request: Request, label: str) -> Response:
    return await _serverkeygen(request, label)
