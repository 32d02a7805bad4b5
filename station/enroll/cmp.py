"""CMP (RFC 4210, Lightweight CMP profile RFC 9483) messages, through pyasn1-modules.

What the station does with them is api/routers/cmp.py's; this module decodes a
PKIMessage, checks its protection (password-based MAC or a signature), and
builds the station's answers (cp, pkiConf, error) signed with a key in the token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ
from pyasn1_modules import rfc2314, rfc2459, rfc4210

from station.errors import Kind, StationError

CONTENT_TYPE = "application/pkixcmp"
PBM = "1.2.840.113533.7.66.13"
# One-way functions and MACs a password-based MAC may name (RFC 4210, RFC 9481).
OWF = {
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
}
MAC = {
    "1.3.6.1.5.5.8.1.2": "sha1",  # hmac-sha1 (RFC 4210's default; openssl cmp's too)
    "1.2.840.113549.2.7": "sha1",
    "1.2.840.113549.2.9": "sha256",
    "1.2.840.113549.2.10": "sha384",
    "1.2.840.113549.2.11": "sha512",
}
SIGNATURE = {
    "1.2.840.10045.4.3.2": ("ec", hashes.SHA256),
    "1.2.840.10045.4.3.3": ("ec", hashes.SHA384),
    "1.2.840.113549.1.1.11": ("rsa", hashes.SHA256),
    "1.2.840.113549.1.1.12": ("rsa", hashes.SHA384),
}
MAX_ITERATIONS = 100_000  # a client's iterationCount is work for the station
IMPLICIT_CONFIRM = "1.3.6.1.5.5.7.4.13"
ECDSA_SHA256 = "1.2.840.10045.4.3.2"
ECDSA_SHA384 = "1.2.840.10045.4.3.3"
RSA_SHA256 = "1.2.840.113549.1.1.11"


class CmpError(StationError):
    """A request refused with a CMP error message carrying ``failure`` (PKIFailureInfo)."""

    code = "cmp-bad-request"
    kind = Kind.BAD_INPUT

    def __init__(
        self, message: str, *, failure: str, code: str | None = None, kind: Kind | None = None
    ) -> None:
        super().__init__(message, code=code, kind=kind)
        self.failure = failure


def decode(der: bytes) -> Any:
    """A PKIMessage; DER only, nothing after it. Codes: cmp-bad-der (badDataFormat)."""
    try:
        msg, rest = der_decoder.decode(der, asn1Spec=rfc4210.PKIMessage())
    except (PyAsn1Error, ValueError, TypeError, IndexError) as exc:
        raise CmpError(
            f"not a DER PKIMessage: {type(exc).__name__}", failure="badDataFormat",
            code="cmp-bad-der",
        ) from None  # fmt: skip
    if rest:
        raise CmpError("bytes after the PKIMessage", failure="badDataFormat", code="cmp-bad-der")
    return msg


def body_type(msg: Any) -> str:
    return str(msg["body"].getName())


def octets(value: Any) -> bytes | None:
    return bytes(value) if value.isValue else None


@dataclass(frozen=True)
class Header:
    pvno: int
    transaction_id: bytes | None
    sender_nonce: bytes | None
    recip_nonce: bytes | None
    sender_kid: bytes | None
    protection_alg: str | None
    implicit_confirm: bool


def header(msg: Any) -> Header:
    h = msg["header"]
    alg = h["protectionAlg"]
    implicit = False
    if h["generalInfo"].isValue:
        implicit = any(str(i["infoType"]) == IMPLICIT_CONFIRM for i in h["generalInfo"])
    return Header(
        pvno=int(h["pvno"]),
        transaction_id=octets(h["transactionID"]),
        sender_nonce=octets(h["senderNonce"]),
        recip_nonce=octets(h["recipNonce"]),
        sender_kid=octets(h["senderKID"]),
        protection_alg=str(alg["algorithm"]) if alg.isValue else None,
        implicit_confirm=implicit,
    )


def protected_part(msg: Any) -> bytes:
    part = rfc4210.ProtectedPart()
    part["header"] = msg["header"]
    part["infoValue"] = msg["body"]
    return bytes(der_encoder.encode(part))


def check_mac(msg: Any, secret: bytes) -> None:
    """Check a password-based MAC (RFC 4210 5.1.3.1) with ``secret``.

    Codes: cmp-bad-mac (badMessageCheck), cmp-bad-alg (badAlg).
    """
    alg = msg["header"]["protectionAlg"]
    if not alg.isValue or str(alg["algorithm"]) != PBM or not msg["protection"].isValue:
        raise CmpError(
            "not protected by a password-based MAC", failure="badAlg", code="cmp-bad-alg"
        )
    try:
        params, _ = der_decoder.decode(bytes(alg["parameters"]), asn1Spec=rfc4210.PBMParameter())
    except PyAsn1Error:
        raise CmpError("bad PBMParameter", failure="badDataFormat", code="cmp-bad-der") from None
    owf = OWF.get(str(params["owf"]["algorithm"]))
    mac = MAC.get(str(params["mac"]["algorithm"]))
    iterations = int(params["iterationCount"])
    if owf is None or mac is None or not 1 <= iterations <= MAX_ITERATIONS:
        raise CmpError(
            "unsupported one-way function, MAC or iteration count", failure="badAlg",
            code="cmp-bad-alg",
        )  # fmt: skip
    key = hashlib.new(owf, secret + bytes(params["salt"])).digest()
    for _ in range(iterations - 1):
        key = hashlib.new(owf, key).digest()
    expected = hmac.new(key, protected_part(msg), mac).digest()
    got = msg["protection"].asOctets()
    if not hmac.compare_digest(expected, got):
        raise CmpError(
            "the MAC does not verify", failure="badMessageCheck", code="cmp-bad-mac",
            kind=Kind.UNAUTHENTICATED,
        )  # fmt: skip


def extra_certs(msg: Any) -> list[x509.Certificate]:
    if not msg["extraCerts"].isValue:
        return []
    out = []
    for c in msg["extraCerts"]:
        try:
            out.append(x509.load_der_x509_certificate(bytes(der_encoder.encode(c))))
        except ValueError:
            raise CmpError(
                "an extraCerts entry is not a certificate", failure="badDataFormat",
                code="cmp-bad-der",
            ) from None  # fmt: skip
    return out


def check_signature(msg: Any, signer: x509.Certificate) -> None:
    """Check a signature protection with ``signer``'s key. Codes: cmp-bad-signature."""
    alg = msg["header"]["protectionAlg"]
    found = SIGNATURE.get(str(alg["algorithm"])) if alg.isValue else None
    if found is None or not msg["protection"].isValue:
        raise CmpError("unsupported protection algorithm", failure="badAlg", code="cmp-bad-alg")
    kind, hash_cls = found
    key = signer.public_key()
    data = protected_part(msg)
    signature = msg["protection"].asOctets()
    try:
        if kind == "ec" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hash_cls()))
        elif kind == "rsa" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hash_cls())
        else:
            raise InvalidSignature
    except InvalidSignature:
        raise CmpError(
            "the signature protection does not verify", failure="badMessageCheck",
            code="cmp-bad-signature", kind=Kind.UNAUTHENTICATED,
        ) from None  # fmt: skip


def crmf_request(msg: Any) -> Any:
    """The one CertReqMsg of an ir, cr or kur (RFC 9483: exactly one).

    Codes: cmp-bad-request (badRequest)."""
    from station.enroll.crmf import CrmfRequest

    reqs = msg["body"][body_type(msg)]
    if len(reqs) != 1:
        raise CmpError(
            "exactly one CertReqMsg per request", failure="badRequest", code="cmp-bad-request"
        )
    return CrmfRequest(reqs[0])


def p10cr_der(msg: Any) -> bytes:
    """The PKCS#10 of a p10cr, DER."""
    csr = msg["body"]["p10cr"]
    plain = rfc2314.CertificationRequest()
    for name in ("certificationRequestInfo", "signatureAlgorithm", "signature"):
        plain[name] = csr[name]
    return bytes(der_encoder.encode(plain))


# ------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Responder:
    """Who signs the station's answers: a key in the token and its certificate."""

    key: Any  # a private key object of the token (cryptography's interface)
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()  # sent after it in extraCerts (the CA's)

    def algorithm(self) -> tuple[str, Any]:
        if isinstance(self.key, rsa.RSAPrivateKey):
            return RSA_SHA256, None
        curve = self.key.curve.key_size if isinstance(self.key, ec.EllipticCurvePrivateKey) else 0
        return (ECDSA_SHA384, hashes.SHA384()) if curve >= 384 else (ECDSA_SHA256, hashes.SHA256())

    def sign(self, data: bytes) -> bytes:
        oid, h = self.algorithm()
        if oid == RSA_SHA256:
            return bytes(self.key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
        return bytes(self.key.sign(data, ec.ECDSA(h)))


def _retag(value: Any, spec: Any) -> Any:
    """``value`` (a decoded constructed type) as ``spec``, the same type under a tag."""
    out = spec.clone()
    for i in range(len(value)):
        out.setComponentByPosition(i, value.getComponentByPosition(i))
    return out


def _general_name(cert_name: x509.Name) -> Any:
    gn = rfc2459.GeneralName()
    name, _ = der_decoder.decode(cert_name.public_bytes(), asn1Spec=rfc2459.Name())
    gn["directoryName"] = _retag(name, gn.componentType["directoryName"].getType())
    return gn


def _cmp_cert(cert: x509.Certificate) -> Any:
    c, _ = der_decoder.decode(
        cert.public_bytes(serialization.Encoding.DER), asn1Spec=rfc4210.CMPCertificate()
    )
    return c


def _answer_header(req: Any | None, responder: Responder, implicit: bool) -> tuple[Any, bytes]:
    h = rfc4210.PKIHeader()
    h["pvno"] = 2
    h["sender"] = _general_name(responder.certificate.subject)
    if req is not None and req["header"]["sender"].isValue:
        h["recipient"] = req["header"]["sender"]
    else:
        h["recipient"] = _general_name(x509.Name([]))
    h["messageTime"] = h["messageTime"].clone(datetime.now(UTC).strftime("%Y%m%d%H%M%SZ"))
    oid, _ = responder.algorithm()
    h["protectionAlg"]["algorithm"] = univ.ObjectIdentifier(oid)
    try:
        ski = responder.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
        h["senderKID"] = h["senderKID"].clone(ski)
    except x509.ExtensionNotFound:
        pass
    nonce = secrets.token_bytes(16)
    h["senderNonce"] = h["senderNonce"].clone(nonce)
    if req is not None:
        rh = req["header"]
        if rh["transactionID"].isValue:
            h["transactionID"] = h["transactionID"].clone(bytes(rh["transactionID"]))
        if rh["senderNonce"].isValue:
            h["recipNonce"] = h["recipNonce"].clone(bytes(rh["senderNonce"]))
    if implicit:
        info = h["generalInfo"].componentType.clone()
        info["infoType"] = univ.ObjectIdentifier(IMPLICIT_CONFIRM)
        info["infoValue"] = univ.Any(der_encoder.encode(univ.Null("")))
        h["generalInfo"].append(info)
    return h, nonce


def _finish(h: Any, body: Any, responder: Responder) -> bytes:
    msg = rfc4210.PKIMessage()
    msg["header"] = h
    msg["body"] = body
    msg["protection"] = msg["protection"].clone(
        univ.BitString.fromOctetString(responder.sign(protected_part(msg)))
    )
    for cert in (responder.certificate, *responder.chain):
        msg["extraCerts"].append(_cmp_cert(cert))
    return bytes(der_encoder.encode(msg))


# The answer to each request body.
ANSWER = {"ir": "ip", "cr": "cp", "p10cr": "cp", "kur": "kup"}


def certificate_response(
    req: Any, responder: Responder, cert: x509.Certificate, cert_req_id: int, implicit: bool
) -> tuple[bytes, bytes]:
    """The ip, cp or kup with the certificate; returns (DER, the sender nonce we sent)."""
    h, nonce = _answer_header(req, responder, implicit)
    body = rfc4210.PKIBody()
    rep = body[ANSWER[body_type(req)]]
    resp = rfc4210.CertResponse()
    resp["certReqId"] = cert_req_id
    resp["status"]["status"] = 0  # accepted
    coe = resp["certifiedKeyPair"]["certOrEncCert"]
    coe["certificate"] = _retag(_cmp_cert(cert), coe.componentType["certificate"].getType())
    rep["response"].append(resp)
    return _finish(h, body, responder), nonce


def revocation_serial(msg: Any) -> int:
    """The serial an rr asks to revoke (exactly one RevDetails with a serialNumber).

    Codes: cmp-bad-request (badRequest)."""
    details = msg["body"]["rr"]
    if len(details) != 1 or not details[0]["certDetails"]["serialNumber"].isValue:
        raise CmpError(
            "exactly one RevDetails naming a serialNumber", failure="badRequest",
            code="cmp-bad-request",
        )  # fmt: skip
    return int(details[0]["certDetails"]["serialNumber"])


def revocation_response(req: Any, responder: Responder) -> bytes:
    """An rp: the revocation was accepted."""
    h, _ = _answer_header(req, responder, False)
    body = rfc4210.PKIBody()
    status = rfc4210.PKIStatusInfo()
    status["status"] = 0
    body["rp"]["status"].append(status)
    return _finish(h, body, responder)


def pki_conf(req: Any, responder: Responder) -> bytes:
    h, _ = _answer_header(req, responder, False)
    body = rfc4210.PKIBody()
    body["pkiconf"] = body["pkiconf"].clone("")
    return _finish(h, body, responder)


def error_message(req: Any | None, responder: Responder, failure: str, text: str) -> bytes:
    """An error message: status rejection with ``failure`` and ``text``."""
    h, _ = _answer_header(req, responder, False)
    body = rfc4210.PKIBody()
    err = body["error"]
    err["pKIStatusInfo"]["status"] = 2  # rejection
    err["pKIStatusInfo"]["failInfo"] = err["pKIStatusInfo"]["failInfo"].clone(failure)
    err["pKIStatusInfo"]["statusString"].append(text[:512])
    return _finish(h, body, responder)


# --- for tests and clients: reading the station's answers ---------------------


def cert_status(msg: Any) -> list[tuple[bytes, int, int | None]]:
    """(certHash, certReqId, status) of each CertStatus in a certConf."""
    out = []
    for cs in msg["body"]["certConf"]:
        status = int(cs["statusInfo"]["status"]) if cs["statusInfo"].isValue else None
        out.append((bytes(cs["certHash"]), int(cs["certReqId"]), status))
    return out
