"""Lightweight CMP (RFC 9483) under /.well-known/cmp/p/{batch}/[{operation}].

* ``ir``, ``cr``, ``p10cr`` protected by a password-based MAC: first enrolment. The MAC secret is
  a board token, its name the senderKID; the station reads the token from the
  ``STATION_CMP_SECRETS`` file (the ledger keeps only token hashes) and checks it
  is a live token of the ledger (role board and up). The device id is the subject's CN.
* ``kur``, ``cr``, ``p10cr`` protected by a signature with the device's current
  certificate (sent first in extraCerts): renewal, a succession in the ledger.
  ir/cr/kur carry CRMF (station/enroll/crmf.py), p10cr a PKCS#10; both go to the
  one issuance path.
* ``certConf``: the device confirms (the certificate's SHA-256 hash) and is
  ``verified``; a rejection revokes the certificate. A renewal's certConf
  supersedes the old certificate (a rejection revokes the new one and the old
  stays live: station.ledger.renewals). Asked for implicit confirmation, the
  station grants it and the device is verified (a renewal superseded) at once.
  Only the transaction's own certificate moves: a certConf for one no longer
  waiting (its renewal restarted or abandoned, superseded or revoked meanwhile)
  is ``cmp-cert-not-waiting`` and never touches the device's live certificate;
  a superseded or revoked certificate signs no certConf.
* ``rr`` signed with the certificate it names: the device revokes its own live
  one (``renewing`` while a renewal waits: the successor is revoked with it).
* Anything else (genm, ...) gets an error message, badRequest.

Answers are protected by the station's CA key in the token (docs/enrollment.md
says why), with the CA certificate first in extraCerts. Errors are CMP error
messages with a PKIFailureInfo (HTTP 200, as RFC 6712 carries them), audited as
``cmp.refused``; nothing is issued.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api import issuance
from api.auth import BOARD_UP
from api.context import AppContext
from api.problems import http_status
from hsm.errors import HsmError
from station.cmp_responder import KEY_LABEL, open_responder
from station.enroll import cmp
from station.enroll.batch_label import renewal_batch
from station.errors import Kind, NotFoundError, StationError
from station.ledger.schema import CertState, KeyMode
from station.policy import common_name, load_csr
from station.request import CertRequest
from station.whitelist import serial_hex

log = logging.getLogger("api.cmp")

router = APIRouter(prefix="/.well-known/cmp", include_in_schema=False)

OPERATIONS = {"pkcs10", "initialization", "certification", "keyupdate", "revocation"}
_BOARD_UP = {r.value for r in BOARD_UP}
_lock = threading.Lock()
_secrets: dict[str, tuple[float, dict[str, str]]] = {}


def _secret_for(station: AppContext, kid: str) -> str | None:
    """The board token named ``kid`` in the CMP secrets file (re-read when it changes)."""
    path: Path | None = station.settings.cmp_secrets
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_mode & 0o077:
        # Secrets the station's group or others may read are not secrets: refuse, as
        # a PIN file is refused (hsm-pin-file-not-private).
        raise StationError(
            f"{path} may be read by others than its owner: chmod 600 it",
            code="cmp-secrets-not-private",
            kind=Kind.NOT_CONFIGURED,
        )
    mtime = st.st_mtime
    key = str(path)
    with _lock:
        cached = _secrets.get(key)
    if cached is None or cached[0] != mtime:
        table: dict[str, str] = {}
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#"):
                table[parts[0]] = parts[1]
        cached = (mtime, table)
        with _lock:
            _secrets[key] = cached
    return cached[1].get(kid)


_responders: weakref.WeakKeyDictionary[AppContext, cmp.Responder] = weakref.WeakKeyDictionary()


def _responder(station: AppContext) -> cmp.Responder:
    """The key in the token that signs CMP answers (station/cmp_responder.py), per worker."""
    with _lock:
        found = _responders.get(station)
    if found is not None:
        return found
    ca = station.ca
    made, new = open_responder(station.settings, ca)
    if new:
        station.ledger.channel_audit.record(
            "cmp.responder",
            "cmp",
            {"serial": serial_hex(made.certificate.serial_number), "key": KEY_LABEL},
        )
    responder = cmp.Responder(made.key, made.certificate, (ca.certificate, *ca.parents))
    with _lock:
        _responders[station] = responder
    return responder


def _answer(der: bytes) -> Response:
    return Response(der, media_type=cmp.CONTENT_TYPE)


class _Refusal(Exception):
    def __init__(self, failure: str, exc: StationError | HsmError) -> None:
        super().__init__(str(exc))
        self.failure = failure
        self.exc = exc


# Which PKIFailureInfo a station refusal maps to, by kind (the code says more).
_FAILURE_OF_KIND = {
    Kind.UNAUTHENTICATED: "badMessageCheck",
    Kind.FORBIDDEN: "notAuthorized",
    Kind.NOT_FOUND: "badRequest",
    Kind.CONFLICT: "badRequest",
    Kind.UNAVAILABLE: "systemUnavail",
    Kind.NOT_CONFIGURED: "systemUnavail",
}
_FAILURE_OF_CODE = {
    "malformed-csr": "badDataFormat",
    "bad-signature": "badPOP",
    "weak-key": "badCertTemplate",
    "unsupported-key": "badCertTemplate",
    "subject-mismatch": "badCertTemplate",
    "duplicate-key": "badCertTemplate",
    "renewal-same-key": "badCertTemplate",
    "cmp-transaction-in-use": "transactionIdInUse",
}


def _failure(exc: StationError | HsmError) -> str:
    if isinstance(exc, cmp.CmpError):
        return exc.failure
    kind = getattr(exc, "kind", None)
    return _FAILURE_OF_CODE.get(exc.code) or _FAILURE_OF_KIND.get(
        Kind(kind) if kind else Kind.BAD_INPUT, "badRequest"
    )


def _error_answer(station: AppContext, body: bytes, failure: str, text: str) -> bytes:
    """The signed CMP error message (the responder's key is in the token: never on the loop)."""
    try:
        msg = cmp.decode(body)
    except cmp.CmpError:
        msg = None
    return cmp.error_message(msg, _responder(station), failure, text)


async def _refused(
    station: AppContext, body: bytes, exc: StationError | HsmError, label: str | None, entity: str
) -> Response:
    failure = _failure(exc)
    text = f"{exc.code}: {exc.message if isinstance(exc, StationError) else exc}"
    detail = {"label": label, "code": exc.code, "failure": failure}
    try:
        await run_in_threadpool(station.ledger.channel_audit.record, "cmp.refused", entity, detail)
    except Exception as audit_exc:
        log.warning("CMP refusal not audited: %s", audit_exc)
    try:
        # Looking the responder up (or making it, at a worker's first CMP request) and
        # signing are PKCS#11 calls: in a worker thread, like the rest of the route.
        der = await run_in_threadpool(_error_answer, station, body, failure, text)
    except (StationError, HsmError) as sign_exc:  # no token: no protected answer
        return Response(
            f"{sign_exc.code}: {sign_exc}\n", status_code=http_status(sign_exc),
            media_type="text/plain",
        )  # fmt: skip
    return _answer(der)


def _batch_of(station: AppContext, label: str) -> str:
    batch = station.ledger.get_batch(label)  # unknown-batch
    if batch.key_mode != KeyMode.BOARD_ECC.value:
        raise StationError(
            f"batch {label!r} is {batch.key_mode}: its keys go over the serial line",
            code="cmp-key-mode",
            kind=Kind.FORBIDDEN,
        )
    return batch.name


def _authenticate(station: AppContext, msg: Any, h: cmp.Header) -> tuple[str, Any]:
    """(sender, the current certificate's ledger record or None) of a protected request."""
    if h.protection_alg == cmp.PBM:
        kid = (h.sender_kid or b"").decode("utf-8", "replace")
        secret = _secret_for(station, kid) if kid else None
        if secret is None:
            raise cmp.CmpError(
                f"no CMP secret for senderKID {kid!r}", failure="badMessageCheck",
                code="cmp-unknown-kid", kind=Kind.UNAUTHENTICATED,
            )  # fmt: skip
        cmp.check_mac(msg, secret.encode())
        found = station.ledger.lookup_token(secret)
        if found is None or found[0] != kid or found[1] not in _BOARD_UP:
            raise cmp.CmpError(
                f"{kid!r} is not a live board token", failure="notAuthorized",
                code="cmp-not-authorized", kind=Kind.FORBIDDEN,
            )  # fmt: skip
        return kid, None
    extra = cmp.extra_certs(msg)
    if h.protection_alg is None or not extra:
        raise cmp.CmpError(
            "the request is not protected (MAC or signature with the certificate in "
            "extraCerts)", failure="badMessageCheck", code="cmp-unprotected",
            kind=Kind.UNAUTHENTICATED,
        )  # fmt: skip
    signer = extra[0]
    ca = station.ca
    try:
        signer.verify_directly_issued_by(ca.certificate)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise cmp.CmpError(
            f"the signer certificate is not the station's: {type(exc).__name__}",
            failure="signerNotTrusted", code="cmp-signer-not-trusted",
            kind=Kind.UNAUTHENTICATED,
        ) from None  # fmt: skip
    cmp.check_signature(msg, signer)
    try:
        record = station.ledger.certificate(serial_hex(signer.serial_number))
    except NotFoundError:
        record = None
    if record is None or record.fingerprint != signer.fingerprint(hashes.SHA256()).hex():
        raise cmp.CmpError(
            "the signer certificate is not in the ledger", failure="signerNotTrusted",
            code="cmp-signer-not-trusted", kind=Kind.UNAUTHENTICATED,
        )  # fmt: skip
    return f"serial:{record.serial}", record


_LIVE = (CertState.ISSUED.value, CertState.RENEWING.value)


def _not_live(record: Any, what: str) -> cmp.CmpError:
    """certRevoked says the certificate is revoked, and only then; a superseded one
    (or one that changed meanwhile) is no longer the sender's to use: notAuthorized."""
    revoked = record.state == CertState.REVOKED.value
    return cmp.CmpError(
        f"{what} {record.serial} is {record.state}, not the device's live certificate",
        failure="certRevoked" if revoked else "notAuthorized",
        code="cmp-certificate-not-live", kind=Kind.FORBIDDEN,
    )  # fmt: skip


def _signer_live(record: Any) -> None:
    """A signed request needs a live signer: issued, or renewing (live and whitelisted
    while its renewal waits)."""
    if record is not None and record.state not in _LIVE:
        raise _not_live(record, "the signer certificate")


def _not_waiting(record: Any) -> cmp.CmpError:
    """A certConf for a certificate no longer waiting for it (its renewal abandoned or
    restarted, or the certificate superseded or revoked meanwhile)."""
    return cmp.CmpError(
        f"certificate {record.serial} is {record.state}: it no longer waits for this "
        "certConf", failure="certRevoked" if record.state == CertState.REVOKED.value
        else "badRequest", code="cmp-cert-not-waiting", kind=Kind.CONFLICT,
    )  # fmt: skip


def _device_id(request: CertRequest) -> str:
    cn = common_name(request.subject)
    if cn is None:
        raise cmp.CmpError(
            "the request's subject needs exactly one CN: it names the device",
            failure="badCertTemplate", code="cmp-no-device-id", kind=Kind.INVALID,
        )  # fmt: skip
    return cn


def _enrol(station: AppContext, msg: Any, h: cmp.Header, label: str) -> tuple[bytes, str]:
    """p10cr, ir, cr (first enrolment with a MAC; renewal signed) and kur (renewal)."""
    kind = cmp.body_type(msg)
    sender, record = _authenticate(station, msg, h)
    assert h.transaction_id is not None
    station.ledger.cmp_transactions.begin(h.transaction_id, sender)
    # Parsed once: the checks below and the issuer share it.
    request: CertRequest
    if kind == "p10cr":
        request, cert_req_id = load_csr(cmp.p10cr_der(msg)), -1
    else:
        crmf = cmp.crmf_request(msg)
        request, cert_req_id = crmf, crmf.cert_req_id
    if record is None:
        if kind == "kur":
            raise cmp.CmpError(
                "a key update is signed with the certificate it updates",
                failure="notAuthorized", code="cmp-kur-unsigned", kind=Kind.FORBIDDEN,
            )  # fmt: skip
        batch = _batch_of(station, label)
        device_id = _device_id(request)
        result = issuance.issue(station, batch, device_id, request)
    else:
        # Renewing: an earlier renewal it never confirmed (the ledger abandons that one),
        # or from the successor still waiting for its certConf (the ledger confirms it).
        _signer_live(record)
        # A board renews in its own batch, which must take CMP (batch_label.py).
        _batch_of(station, renewal_batch(label, record.batch, record.device_id))
        current = x509.load_pem_x509_certificate((record.pem or "").encode())
        if request.subject != current.subject:
            raise cmp.CmpError(
                "a renewal CSR must carry the current certificate's subject",
                failure="badCertTemplate", code="cmp-subject-mismatch", kind=Kind.CONFLICT,
            )  # fmt: skip
        device_id = record.device_id
        # Verified on first authenticated contact (station/ledger/contact.py): the
        # request's signature with the certificate proves the board holds its key.
        station.ledger.contact.authenticated(device_id, record.serial, proof="cmp-signature")
        # CMP's confirmation is the certConf: the old certificate is superseded then.
        result = issuance.issue(
            station, record.batch, device_id, request, renews=record.serial,
            confirm_later=not h.implicit_confirm,
        )  # fmt: skip
    der, nonce = cmp.certificate_response(
        msg, _responder(station), result.certificate, cert_req_id, h.implicit_confirm
    )
    if h.implicit_confirm:
        station.ledger.mark_verified(device_id)
        state = "confirmed"
    else:
        state = "waiting"
    station.ledger.cmp_transactions.issued(
        h.transaction_id, serial_hex(result.serial), device_id, nonce, state
    )
    return der, device_id


def _cert_conf(station: AppContext, msg: Any, h: cmp.Header) -> tuple[bytes, str]:
    sender, signer = _authenticate(station, msg, h)
    _signer_live(signer)  # a superseded certificate confirms nothing
    assert h.transaction_id is not None
    try:
        tx = station.ledger.cmp_transactions.get(h.transaction_id)
    except NotFoundError:
        raise cmp.CmpError(
            "certConf for an unknown transaction", failure="badRequest",
            code="cmp-unknown-transaction",
        ) from None  # fmt: skip
    if tx.state != "waiting" or tx.serial is None or tx.device_id is None:
        raise cmp.CmpError(
            f"the transaction is {tx.state}, not waiting for a confirmation",
            failure="transactionIdInUse", code="cmp-transaction-in-use", kind=Kind.CONFLICT,
        )  # fmt: skip
    if tx.sender_kid != sender:
        raise cmp.CmpError(
            "certConf from another sender", failure="notAuthorized", code="cmp-not-authorized",
            kind=Kind.FORBIDDEN,
        )  # fmt: skip
    if h.recip_nonce is None or h.recip_nonce.hex() != tx.our_nonce:
        raise cmp.CmpError(
            "recipNonce is not the nonce of the station's answer",
            failure="badRecipientNonce", code="cmp-bad-nonce",
        )  # fmt: skip
    statuses = cmp.cert_status(msg)
    record = station.ledger.certificate(tx.serial)
    if len(statuses) != 1 or statuses[0][0].hex() != record.fingerprint:
        raise cmp.CmpError(
            "certHash does not match the certificate of this transaction",
            failure="badCertId", code="cmp-bad-cert-hash",
        )  # fmt: skip
    rejected = statuses[0][2] not in (None, 0, 1)
    if not station.ledger.cmp_transactions.close(
        h.transaction_id, "rejected" if rejected else "confirmed"
    ):
        raise cmp.CmpError(
            "the transaction was confirmed meanwhile", failure="transactionIdInUse",
            code="cmp-transaction-in-use", kind=Kind.CONFLICT,
        )  # fmt: skip
    renewals, revoked = station.ledger.renewals, record.state == CertState.REVOKED.value
    if record.renews is not None:
        # A renewal: only the one waiting for this certificate's confirmation moves.
        # Nothing waiting (abandoned, restarted, revoked): a rejection agrees with a
        # revoked certificate; an accept is an error. Never the device's live one.
        if rejected:
            abandoned = renewals.abandon(tx.device_id, "cmp-cert-rejected", serial=tx.serial)
            if not abandoned and not revoked:
                raise _not_waiting(station.ledger.certificate(tx.serial))
        elif not renewals.confirm(tx.device_id, tx.serial):
            raise _not_waiting(station.ledger.certificate(tx.serial))
    elif rejected:
        # A first enrolment: revoked only while it is still the device's live certificate.
        if not revoked:
            try:
                station.ledger.revoke(
                    tx.device_id, "rejected by the device in CMP certConf", serial=tx.serial
                )
            except StationError as exc:
                if exc.code not in ("certificate-not-live", "no-certificate"):
                    raise
                raise _not_waiting(station.ledger.certificate(tx.serial)) from None
    else:
        try:
            station.ledger.mark_verified(tx.device_id, serial=tx.serial)
        except StationError as exc:
            if exc.code not in ("certificate-not-live", "bad-state"):
                raise
            raise _not_waiting(station.ledger.certificate(tx.serial)) from None
    return cmp.pki_conf(msg, _responder(station)), tx.device_id


def _revoke(station: AppContext, msg: Any, h: cmp.Header, label: str) -> tuple[bytes, str]:
    """rr: a device revokes its own live certificate, signing with it (a lost or
    compromised key), under its own batch's label. A MAC (a board token) revokes nothing."""
    sender, record = _authenticate(station, msg, h)
    if record is None:
        raise cmp.CmpError(
            "a revocation is signed with the certificate it revokes", failure="notAuthorized",
            code="cmp-rr-unsigned", kind=Kind.FORBIDDEN,
        )  # fmt: skip
    renewal_batch(label, record.batch, record.device_id)
    assert h.transaction_id is not None
    station.ledger.cmp_transactions.begin(h.transaction_id, sender)
    if serial_hex(cmp.revocation_serial(msg)) != record.serial:
        raise cmp.CmpError(
            "a device revokes only the certificate it signs with", failure="notAuthorized",
            code="cmp-rr-other-certificate", kind=Kind.FORBIDDEN,
        )  # fmt: skip
    # Live: issued, or renewing (still whitelisted while its successor waits for its
    # confirmation; the revocation takes the successor with it: ledger/revocation.py).
    # The ledger checks again, in its transaction, that it is the device's live one.
    _signer_live(record)
    try:
        station.ledger.revoke(
            record.device_id, "revoked by the device over CMP (rr)", serial=record.serial
        )
    except StationError as exc:
        if exc.code not in ("certificate-not-live", "no-certificate"):
            raise
        raise _not_live(station.ledger.certificate(record.serial), "certificate") from None
    return cmp.revocation_response(msg, _responder(station)), record.device_id


def _handle(station: AppContext, body: bytes, label: str) -> tuple[bytes, str]:
    try:
        msg = cmp.decode(body)
        h = cmp.header(msg)
        if h.pvno not in (2, 3):
            raise cmp.CmpError(
                f"pvno {h.pvno} is not supported", failure="unsupportedVersion",
                code="cmp-version",
            )  # fmt: skip
        if h.transaction_id is None or not 1 <= len(h.transaction_id) <= 32:
            raise cmp.CmpError(
                "a transactionID of 1-32 bytes is required", failure="badDataFormat",
                code="cmp-bad-header",
            )  # fmt: skip
        if h.sender_nonce is None or len(h.sender_nonce) < 16:
            raise cmp.CmpError(
                "a senderNonce of at least 16 bytes is required", failure="badSenderNonce",
                code="cmp-bad-header",
            )  # fmt: skip
        kind = cmp.body_type(msg)
        if kind in cmp.ANSWER:
            return _enrol(station, msg, h, label)
        if kind == "certConf":
            return _cert_conf(station, msg, h)
        if kind == "rr":
            return _revoke(station, msg, h, label)
        raise cmp.CmpError(
            f"{kind} is not supported here (ir, cr, kur, p10cr, certConf, rr)",
            failure="badRequest", code="cmp-unsupported-body",
        )  # fmt: skip
    except (StationError, HsmError) as exc:
        raise _Refusal(_failure(exc), exc) from exc


async def _cmp(request: Request, label: str, operation: str | None) -> Response:
    station: AppContext = request.app.state.station
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if ctype != cmp.CONTENT_TYPE:
        return Response(
            f"cmp-media-type: send {cmp.CONTENT_TYPE}\n", status_code=415,
            media_type="text/plain",
        )  # fmt: skip
    if operation is not None and operation not in OPERATIONS:
        return Response(
            f"cmp-unknown-operation: {operation!r} is not one of {sorted(OPERATIONS)}\n",
            status_code=404, media_type="text/plain",
        )  # fmt: skip
    handle = functools.partial(_handle, station, body, label)
    try:
        der, _ = await asyncio.get_running_loop().run_in_executor(station.issue_executor, handle)
    except _Refusal as refusal:
        return await _refused(station, body, refusal.exc, label, "cmp")
    return _answer(der)


@router.post("/p/{label}")
async def cmp_label(request: Request, label: str) -> Response:
    return await _cmp(request, label, None)


@router.post("/p/{label}/{operation}")
async def cmp_operation(request: Request, label: str, operation: str) -> Response:
    return await _cmp(request, label, operation)
