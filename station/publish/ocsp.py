"""The station's OCSP responder (RFC 6960, the RFC 5019 profile), signed in the token.

Answers for the station's CA only: good for an issued certificate, revoked (with
its time and reason code) for a revoked one, unknown for a serial the ledger never
issued (or whose issuance was abandoned). A request for another issuer gets
``unauthorized``; one that does not parse, ``malformedRequest``: the protocol's own
error answers, which every OCSP client understands.

Signed by the CA key itself, not a delegated responder key: the CA key is already
online in the token for every certificate, so a second key would add a certificate
to issue, renew and publish (and the id-pkix-ocsp-nocheck trade-off) without keeping
the CA key any safer; and a response signed by the issuer is accepted by every
client without extra configuration (``openssl ocsp`` looks for the issuer first).

A nonce in the request is copied into the response. Without a nonce the answer is
fresh anyway: it is made for each request, thisUpdate now, nextUpdate an hour on.
"""

from __future__ import annotations

import datetime as dt
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from sqlalchemy.engine import Engine

from station.ca import CertificateAuthority
from station.publish.revoked import serial_status

RESPONSE_VALIDITY = dt.timedelta(hours=1)
MEDIA_REQUEST = "application/ocsp-request"
MEDIA_RESPONSE = "application/ocsp-response"

_STATUS = {
    "good": ocsp.OCSPCertStatus.GOOD,
    "revoked": ocsp.OCSPCertStatus.REVOKED,
    "unknown": ocsp.OCSPCertStatus.UNKNOWN,
}


def _error(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )


class Responder:
    """Answers OCSP requests for one CA from one ledger."""

    def __init__(self, engine: Engine, ca: CertificateAuthority) -> None:
        self.engine = engine
        self.ca = ca
        self._lock = threading.Lock()
        self._issuer_hashes: dict[str, tuple[bytes, bytes]] = {}

    def _issuer(self, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
        """(issuerNameHash, issuerKeyHash) of the CA under ``algorithm``."""
        with self._lock:
            found = self._issuer_hashes.get(algorithm.name)
        if found is None:
            probe = (
                ocsp.OCSPRequestBuilder()
                .add_certificate(self.ca.certificate, self.ca.certificate, algorithm)
                .build()
            )
            found = (probe.issuer_name_hash, probe.issuer_key_hash)
            with self._lock:
                self._issuer_hashes[algorithm.name] = found
        return found

    def respond(self, request_der: bytes, *, now: dt.datetime | None = None) -> bytes:
        """The DER OCSPResponse for a DER OCSPRequest (never raises for bad input)."""
        try:
            request = ocsp.load_der_ocsp_request(request_der)
            algorithm = request.hash_algorithm
            serial = request.serial_number
            name_hash, key_hash = request.issuer_name_hash, request.issuer_key_hash
            extensions = list(request.extensions)
        except (ValueError, TypeError, NotImplementedError, x509.DuplicateExtension):
            # NotImplementedError: more than one certificate in one request, or an
            # unsupported hash; RFC 5019 responders answer one certificate a request.
            # DuplicateExtension (not a ValueError): the same extension twice.
            return _error(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        try:
            issuer = self._issuer(algorithm)
        except (ValueError, TypeError, NotImplementedError):
            return _error(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        if (name_hash, key_hash) != issuer:
            return _error(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        status = serial_status(self.engine, serial)
        now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                issuer_name_hash=name_hash,
                issuer_key_hash=key_hash,
                serial_number=serial,
                algorithm=algorithm,
                cert_status=_STATUS[status.status],
                this_update=now,
                next_update=now + RESPONSE_VALIDITY,
                revocation_time=(
                    status.revoked_at.replace(microsecond=0) if status.revoked_at else None
                ),
                revocation_reason=status.reason,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, self.ca.certificate)
        )
        for ext in extensions:
            if isinstance(ext.value, x509.OCSPNonce):
                builder = builder.add_extension(ext.value, critical=False)
        response = builder.sign(self.ca.key, self.ca.hash_algorithm)
        return response.public_bytes(serialization.Encoding.DER)
