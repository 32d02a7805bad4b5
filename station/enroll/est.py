"""EST (RFC 7030) message formats: base64 PKCS#10 in, base64 PKCS#7 certs-only out, csrattrs.

Section 4 of RFC 7030: requests are ``application/pkcs10`` with a base64 body
(Content-Transfer-Encoding: base64, line breaks allowed), answers
``application/pkcs7-mime; smime-type=certs-only`` base64 and ``csrattrs``
``application/csrattrs`` base64.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets

from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from station.errors import Kind, StationError
from station.policy import load_csr, parse_subject
from station.request import CertRequest

PKCS10 = "application/pkcs10"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
CACERTS = "application/pkcs7-mime"
CSRATTRS = "application/csrattrs"

_B64 = re.compile(rb"\A[A-Za-z0-9+/=\s]*\Z")


class EstError(StationError):
    code = "est-malformed"
    kind = Kind.BAD_INPUT


def read_pkcs10(body: bytes, content_type: str | None) -> bytes:
    """The DER CSR of a simpleenroll/simplereenroll body.

    Codes: est-media-type (not application/pkcs10), est-malformed (not base64).
    The CSR itself is checked by the station's policy, as on every channel.
    """
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype != PKCS10:
        raise EstError(
            f"send the CSR as {PKCS10} (base64 DER), not {ctype or 'no content type'}",
            code="est-media-type",
            kind=Kind.UNSUPPORTED_MEDIA,
        )
    if not _B64.match(body):
        raise EstError("the body is not base64 (RFC 7030 section 4.2.1)")
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EstError(f"the body is not base64: {exc}") from None
    if not der:
        raise EstError("the body is empty")
    return der


def _b64(der: bytes) -> bytes:
    # One line: strongSwan's `pki --est` 5.9 decodes MIME line breaks into garbage
    # (its PKCS#7 parser then fails on signerInfos); RFC 7030 clients accept either.
    return base64.b64encode(der) + b"\n"


def certs_only(certs: list[x509.Certificate]) -> bytes:
    """A degenerate PKCS#7 SignedData holding ``certs`` (no signers), base64."""
    return _b64(pkcs7.serialize_certificates(certs, serialization.Encoding.DER))


# --- csrattrs (RFC 7030 section 4.5.2) ------------------------------------------


class _AttrValues(core.SetOf):
    _child_spec = core.Any


class _Attribute(core.Sequence):
    _fields = [("type", core.ObjectIdentifier), ("values", _AttrValues)]


class _AttrOrOID(core.Choice):
    _alternatives = [("oid", core.ObjectIdentifier), ("attribute", _Attribute)]


class CsrAttrs(core.SequenceOf):
    _child_spec = _AttrOrOID


ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"
EC_PUBLIC_KEY = "1.2.840.10045.2.1"
SECP256R1 = "1.2.840.10045.3.1.7"
RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
SHA256_WITH_RSA = "1.2.840.113549.1.1.11"


def csr_attributes(subject_template: str, key_mode: str) -> bytes:
    """What a board's CSR must carry, base64: the signature algorithm, the key type
    (with its curve) and the subject attribute types of the batch's template."""
    items: list[_AttrOrOID] = []
    if key_mode == "see-rsa":
        items.append(_AttrOrOID(name="oid", value=SHA256_WITH_RSA))
        items.append(_AttrOrOID(name="oid", value=RSA_ENCRYPTION))
    else:
        items.append(_AttrOrOID(name="oid", value=ECDSA_WITH_SHA256))
        curve = core.Any.load(core.ObjectIdentifier(SECP256R1).dump())
        attr = _Attribute({"type": EC_PUBLIC_KEY, "values": [curve]})
        items.append(_AttrOrOID(name="attribute", value=attr))
    if subject_template != "*":
        for rdn in parse_subject(subject_template.replace("{device_id}", "x")).rdns:
            for attribute in rdn:
                items.append(_AttrOrOID(name="oid", value=attribute.oid.dotted_string))
    return _b64(CsrAttrs(items).dump())


def parse_csr_attributes(der: bytes) -> list[str]:
    """The OIDs a csrattrs answer names (attribute types, and attribute values that
    are OIDs), for tests and clients."""
    out: list[str] = []
    for item in CsrAttrs.load(der):
        if item.name == "oid":
            out.append(item.chosen.dotted)
        else:
            out.append(item.chosen["type"].dotted)
            for value in item.chosen["values"]:
                out.append(core.ObjectIdentifier.load(value.dump()).dotted)
    return out


def read_request(body: bytes, content_type: str | None) -> x509.CertificateSigningRequest:
    """The CSR of a simpleenroll/simplereenroll body, parsed once: the route's checks
    and the issuer share it. Codes: those of :func:`read_pkcs10`, malformed-csr (policy)."""
    return load_csr(read_pkcs10(body, content_type))


def device_id_of(csr: CertRequest) -> str:
    """The device id an EST CSR names: its subject's CN (RFC 7030 has no other field).

    Codes: est-no-device-id.
    """
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise EstError(
            "the CSR's subject needs exactly one CN: EST takes the device id from it",
            code="est-no-device-id",
            kind=Kind.INVALID,
        )
    return cns[0].value


# --- serverkeygen (RFC 7030 section 4.4.2) -------------------------------------

PKCS8 = "application/pkcs8"


_LINE = 48  # bytes per base64 line: 64 characters


def _b64_size(n: int) -> int:
    """Length of :func:`_b64_into`'s output for ``n`` bytes (64-character lines, CRLF)."""
    full, rest = divmod(n, _LINE)
    return full * (64 + 2) + (4 * -(-rest // 3) + 2 if rest else 0)


def _b64_into(out: memoryview, at: int, der: bytes | bytearray) -> int:
    """Base64 of ``der`` written into ``out`` from ``at`` in 64-character lines; returns
    the position after it. ``der`` is read through a view (its slices are not copies)
    and ``out`` is pre-sized, so no buffer holding the key's bytes is left behind,
    except one Python cannot wipe: the immutable 64-character ``bytes`` of each line
    that ``base64.b64encode`` returns, freed (not cleared) once copied into ``out``."""
    with memoryview(der) as src:
        for start in range(0, len(src), _LINE):
            line = base64.b64encode(src[start : start + _LINE])
            out[at : at + len(line)] = line
            out[at + len(line) : at + len(line) + 2] = b"\r\n"
            at += len(line) + 2
            del line
    return at


def serverkeygen_body(key_pkcs8: bytearray, cert: x509.Certificate) -> tuple[bytearray, str]:
    """(body, content type) of a serverkeygen answer: ``multipart/mixed``, the private
    key first (``application/pkcs8``, base64 PrivateKeyInfo), then the certificate as
    simpleenroll answers it (``application/pkcs7-mime; smime-type=certs-only``, base64).

    The body is one bytearray allocated at its final size (growing it would leave the
    superseded buffers, the key's base64 in them, unwiped): the caller wipes it once it
    is handed to the server.
    """
    boundary = "est-" + secrets.token_hex(16)
    key_head = (
        f"--{boundary}\r\nContent-Type: {PKCS8}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    cert_head = (
        f"--{boundary}\r\nContent-Type: {CERTS_ONLY}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    # MIME lines here (unlike certs_only's one line for strongSwan's simpleenroll).
    p7 = pkcs7.serialize_certificates([cert], serialization.Encoding.DER)
    tail = f"--{boundary}--\r\n".encode()
    size = len(key_head) + _b64_size(len(key_pkcs8)) + len(cert_head)
    size += _b64_size(len(p7)) + len(tail)
    out = bytearray(size)
    with memoryview(out) as view:
        view[: len(key_head)] = key_head
        at = _b64_into(view, len(key_head), key_pkcs8)
        view[at : at + len(cert_head)] = cert_head
        at = _b64_into(view, at + len(cert_head), p7)
        view[at:] = tail
    assert at + len(tail) == size
    return out, f'multipart/mixed; boundary="{boundary}"'
