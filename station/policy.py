"""The CSR policy: what a board may ask for, one rule at a time.

Every rule raises a PolicyError with its own stable reason code. Nothing from a
CSR reaches a certificate except its public key and, after check_subject(), a
subject equal to the one the station built itself.
"""

from __future__ import annotations

import functools
import hashlib
import re

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from station.errors import PolicyError
from station.request import CertRequest

# A batch name (station/ledger/textrules.py says why): here so that settings,
# which may not import the ledger, check STATION_EST_DEFAULT_BATCH by it too.
BATCH_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")

MAX_CSR_BYTES = 16 * 1024
MAX_CSR_EXTENSIONS = 16
# No extension is ever copied from a CSR; a board has no reason to send kilobytes of them
# (the ledger keeps every CSR).
MAX_CSR_EXTENSION_BYTES = 2048
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 4096
ALLOWED_CURVES = {"secp256r1", "secp384r1"}
WEAK_CURVES = {"secp192r1", "secp224r1", "sect163k1", "sect163r2", "sect233k1", "sect233r1"}
ALLOWED_CSR_HASHES = {"sha256", "sha384", "sha512"}
MAX_ATTRIBUTE_CHARS = 64

# \A ... \Z, and fullmatch below: "$" with match() let a trailing newline through.
DEVICE_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")

_PEM_CSR = re.compile(
    rb"-----BEGIN (NEW )?CERTIFICATE REQUEST-----.*?-----END (NEW )?CERTIFICATE REQUEST-----",
    re.S,
)

# The only attribute types a subject the station signs may hold (from a template or,
# in the `adhoc` batch, from the CSR): a board that could name its own UID, role,
# e-mail address or any other OID would get a certificate a relying party reads as
# something the station never meant to say.
SUBJECT_ATTRS = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
    "serialNumber": NameOID.SERIAL_NUMBER,
}
_ATTR_NAMES = {oid: name for name, oid in SUBJECT_ATTRS.items()}
_ALLOWED_ATTR_OIDS = frozenset(SUBJECT_ATTRS.values())
# Named curves in an EC key's AlgorithmIdentifier: an OID. Explicit parameters are a
# SEQUENCE (and NULL is implicitlyCA); both refused (explicit-curve-params).
_DER_OID = 0x06


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse one CSR, PEM or DER. Several PEM blocks or trailing garbage are refused."""
    if not data or not data.strip():
        raise PolicyError("the CSR is empty", code="malformed-csr")
    if len(data) > MAX_CSR_BYTES:
        raise PolicyError(
            f"the CSR is {len(data)} bytes; at most {MAX_CSR_BYTES} are accepted",
            code="csr-too-large",
        )
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        # fullmatch: bytes after the END line are refused like trailing bytes after DER.
        if stripped.count(b"-----BEGIN") != 1 or _PEM_CSR.fullmatch(stripped) is None:
            raise PolicyError(
                "the PEM must hold exactly one CERTIFICATE REQUEST block and nothing after it",
                code="malformed-csr",
            )
        try:
            csr = x509.load_pem_x509_csr(stripped)
        except (ValueError, x509.InvalidVersion):
            raise PolicyError("the PEM CSR cannot be parsed", code="malformed-csr") from None
    else:
        try:
            csr = x509.load_der_x509_csr(data)
        except (ValueError, x509.InvalidVersion):
            raise PolicyError(
                "the CSR is neither PEM nor valid DER (or has trailing bytes)",
                code="malformed-csr",
            ) from None
        if csr.public_bytes(serialization.Encoding.DER) != data:
            raise PolicyError(
                "the DER CSR has trailing or non-canonical bytes", code="malformed-csr"
            )
    try:
        csr.subject  # noqa: B018 - parsed lazily: a bad string (e.g. invalid UTF-8) raises here
    except (ValueError, TypeError):  # TypeError: a BIT STRING value under another attribute
        raise PolicyError("the CSR's subject cannot be parsed", code="malformed-csr") from None
    return csr


def check_csr(csr: CertRequest) -> None:
    """Signature, signature hash, key type and size, extensions, subject characters."""
    try:
        key = csr.public_key()
    except (ValueError, TypeError, NotImplementedError, UnsupportedAlgorithm):
        raise PolicyError("the CSR's public key cannot be read", code="unsupported-key") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        # A CRMF request checks its template's key when it is parsed (station/enroll/crmf.py).
        if isinstance(csr, x509.CertificateSigningRequest):
            check_named_curve(csr)
        if key.curve.name in WEAK_CURVES:
            raise PolicyError(
                f"EC curve {key.curve.name} is too weak; use P-256 or P-384", code="weak-key"
            )
        if key.curve.name not in ALLOWED_CURVES:
            raise PolicyError(
                f"EC curve {key.curve.name} is not accepted; use P-256 or P-384",
                code="unsupported-key",
            )
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise PolicyError(
                f"RSA-{key.key_size} is too weak; at least RSA-{MIN_RSA_BITS} is required",
                code="weak-key",
            )
        if key.key_size > MAX_RSA_BITS:
            raise PolicyError(
                f"RSA-{key.key_size} is larger than the {MAX_RSA_BITS} bits accepted",
                code="unsupported-key",
            )
    else:
        raise PolicyError(
            f"{type(key).__name__.removeprefix('_')} keys are not accepted; "
            "use EC P-256, EC P-384 or RSA >= 2048",
            code="unsupported-key",
        )
    try:
        hash_alg = csr.signature_hash_algorithm
    except (UnsupportedAlgorithm, ValueError):
        hash_alg = None
    if hash_alg is None or hash_alg.name not in ALLOWED_CSR_HASHES:
        name = hash_alg.name if hash_alg is not None else "an unknown algorithm"
        raise PolicyError(
            f"the CSR is signed with {name}; SHA-256 or stronger is required",
            code="weak-signature",
        )
    if not csr.is_signature_valid:
        raise PolicyError("the CSR's signature does not verify", code="bad-signature")
    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise PolicyError("the CSR's extensions cannot be parsed", code="malformed-csr") from None
    if len(extensions) > MAX_CSR_EXTENSIONS:
        raise PolicyError(
            f"the CSR requests {len(extensions)} extensions; at most {MAX_CSR_EXTENSIONS}",
            code="malformed-csr",
        )
    for ext in extensions:
        size = len(ext.value.public_bytes())
        if size > MAX_CSR_EXTENSION_BYTES:
            raise PolicyError(
                f"the CSR's extension {ext.oid.dotted_string} is {size} bytes; "
                f"at most {MAX_CSR_EXTENSION_BYTES} are accepted",
                code="extension-too-large",
            )
        if ext.oid == ExtensionOID.BASIC_CONSTRAINTS and getattr(ext.value, "ca", False):
            raise PolicyError("the CSR asks to be a CA (CA:TRUE)", code="ca-requested")
    check_name_characters(csr.subject)


def check_named_curve(csr: x509.CertificateSigningRequest) -> None:
    """An EC key must name its curve: cryptography maps explicit parameters that
    match a named curve onto that curve, and the certificate would then carry a key
    encoding the board never sent. Code: explicit-curve-params."""
    try:
        params_tag = _spki_parameters_tag(csr.tbs_certrequest_bytes)
    except (IndexError, ValueError):
        raise PolicyError("the CSR's public key cannot be read", code="malformed-csr") from None
    if params_tag != _DER_OID:
        raise PolicyError(
            "the EC key carries explicit curve parameters; name the curve (P-256 or P-384)",
            code="explicit-curve-params",
        )


def _der_item(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the content, end of the content) of the DER item at ``pos``."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("DER item runs past its parent")
    return tag, pos, pos + length


def _spki_parameters_tag(tbs: bytes) -> int:
    """The DER tag of the algorithm parameters in a CertificationRequestInfo's SPKI."""
    _, pos, _ = _der_item(tbs, 0)  # CertificationRequestInfo SEQUENCE
    _, _, pos = _der_item(tbs, pos)  # version, skipped
    _, _, pos = _der_item(tbs, pos)  # subject, skipped
    _, pos, _ = _der_item(tbs, pos)  # subjectPKInfo SEQUENCE
    _, pos, alg_end = _der_item(tbs, pos)  # AlgorithmIdentifier SEQUENCE
    _, _, pos = _der_item(tbs, pos)  # algorithm OID, skipped
    if pos >= alg_end:
        return -1  # no parameters at all
    return tbs[pos]


def check_name_characters(name: x509.Name) -> None:
    """Every rule a subject the station signs must follow (from a CSR or a template)."""
    for rdn in name.rdns:
        check_single_valued(rdn)
    for attr in name:
        _check_attribute(attr)


def check_single_valued(rdn: x509.RelativeDistinguishedName) -> None:
    """Code: bad-subject."""
    if len(rdn) != 1:
        raise PolicyError("multi-valued subject RDNs are not accepted", code="bad-subject")


def check_attribute_type(attr: x509.NameAttribute) -> None:
    """Only the allow-listed types (SUBJECT_ATTRS). Code: subject-attribute-not-allowed."""
    if attr.oid not in _ALLOWED_ATTR_OIDS:
        raise PolicyError(
            f"subject attribute {attr.oid.dotted_string} ({attr.oid._name}) is not one of "
            f"{', '.join(SUBJECT_ATTRS)}",
            code="subject-attribute-not-allowed",
        )


def check_attribute_length(attr: x509.NameAttribute) -> None:
    """Text of 1 to MAX_ATTRIBUTE_CHARS characters. Code: bad-subject."""
    value = attr.value
    if not isinstance(value, str):
        raise PolicyError("subject attributes must be text", code="bad-subject")
    if len(value) == 0 or len(value) > MAX_ATTRIBUTE_CHARS:
        raise PolicyError(
            f"subject attribute {attr.oid._name} must be 1 to {MAX_ATTRIBUTE_CHARS} chars",
            code="bad-subject",
        )


def check_attribute_text(attr: x509.NameAttribute) -> None:
    """Printable text only: no control characters, no bidi controls (U+202E turns
    "Amazon Web Services<RLO>evil" around on screen), no zero-width or other
    invisible characters. Code: bad-subject."""
    value = attr.value
    if not isinstance(value, str):
        raise PolicyError("subject attributes must be text", code="bad-subject")
    if has_control_characters(value):
        raise PolicyError(
            f"subject attribute {attr.oid._name} contains control characters",
            code="bad-subject",
        )
    if has_invisible_characters(value) or not value.isprintable():
        raise PolicyError(
            f"subject attribute {attr.oid._name} holds a bidi control, an invisible or "
            "another non-printable character",
            code="bad-subject",
        )


def _check_attribute(attr: x509.NameAttribute) -> None:
    check_attribute_type(attr)
    check_attribute_length(attr)
    check_attribute_text(attr)


def public_key_sha256(obj: CertRequest | x509.Certificate) -> str:
    """Hex SHA-256 of the SubjectPublicKeyInfo DER: the identity of a key across the ledger."""
    spki = obj.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the certificate DER (AWS IoT's certificateId)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def check_device_id(device_id: str) -> None:
    if not DEVICE_ID_RE.fullmatch(device_id or ""):
        raise PolicyError(
            "a device id is 1-64 characters of letters, digits and . _ : - "
            "and starts with a letter or digit",
            code="bad-device-id",
        )


def parse_subject(text: str) -> x509.Name:
    """Parse an OpenSSL-style subject, "/O=company/OU=team/CN=dev-1/C=US", order preserved."""
    if not text.startswith("/"):
        raise PolicyError(
            "a subject starts with '/', as in /O=company/CN=name", code="bad-template"
        )
    return x509.Name([_parse_rdn(part) for part in text[1:].split("/")])


def _parse_rdn(part: str) -> x509.RelativeDistinguishedName:
    """One ``KEY=value`` part of a subject, checked."""
    key, eq, value = part.partition("=")
    if not eq or not value:
        raise PolicyError(f"subject part {part!r} is not KEY=value", code="bad-template")
    oid = SUBJECT_ATTRS.get(key)
    if oid is None:
        raise PolicyError(
            f"subject attribute {key!r} is not one of {', '.join(SUBJECT_ATTRS)}",
            code="bad-template",
        )
    if oid == NameOID.COUNTRY_NAME and len(value) != 2:
        raise PolicyError("C= takes a two-letter country code", code="bad-template")
    attr = x509.NameAttribute(oid, value)
    _check_attribute(attr)
    return x509.RelativeDistinguishedName([attr])


@functools.lru_cache(maxsize=128)
def _template_parts(template: str) -> tuple[tuple[x509.RelativeDistinguishedName | None, str], ...]:
    """A template parsed once: its fixed parts as checked RDNs, the device's parts as text.

    Issuance fills a template per certificate; only the parts naming the
    device are parsed again (``None`` in the first slot).
    """
    if not template.startswith("/"):
        raise PolicyError(
            "a subject starts with '/', as in /O=company/CN=name", code="bad-template"
        )
    return tuple(
        (None, part) if "{device_id}" in part else (_parse_rdn(part), part)
        for part in template[1:].split("/")
    )


def format_subject(name: x509.Name) -> str:
    """The inverse of parse_subject, for names it can spell."""
    parts = []
    for attr in name:
        key = _ATTR_NAMES.get(attr.oid, attr.oid.dotted_string)
        value = attr.value if isinstance(attr.value, str) else attr.value.hex()
        parts.append(f"/{key}={value}")
    return "".join(parts)


def validate_template(template: str) -> None:
    """A subject template must parse and must name the device exactly once."""
    if template.count("{device_id}") != 1:
        raise PolicyError("a subject template must contain {device_id} once", code="bad-template")
    subject_from_template(template, "device-0")


def subject_from_template(template: str, device_id: str) -> x509.Name:
    """The subject a device of a batch must have: the template with its device id filled in."""
    check_device_id(device_id)
    if "/" in device_id:  # pragma: no cover - excluded by DEVICE_ID_RE, kept as a guard
        raise PolicyError("a device id may not contain '/'", code="bad-device-id")
    return x509.Name(
        [
            rdn if rdn is not None else _parse_rdn(part.replace("{device_id}", device_id))
            for rdn, part in _template_parts(template)
        ]
    )


def check_subject(csr: x509.CertificateSigningRequest | x509.Name, expected: x509.Name) -> None:
    """Refuse a CSR (or the subject already taken from it) that is not ``expected``."""
    presented = csr if isinstance(csr, x509.Name) else csr.subject
    if presented != expected:
        raise PolicyError(
            f"CSR subject {format_subject(presented)!r} does not match "
            f"the batch's {format_subject(expected)!r}",
            code="subject-mismatch",
        )


def common_name(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1:
        return None
    value = values[0].value
    return value if isinstance(value, str) else None


# -- text from users and boards ------------------------------------------------------

# C0 controls and DEL: no field of the station takes them (PostgreSQL text cannot
# even hold NUL), and in a name they would forge log or report lines.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
CONTROL_CHARACTERS_PATTERN = r"^[^\x00-\x1f\x7f]*$"  # the same, for JSON Schema


def has_control_characters(text: str) -> bool:
    return CONTROL_CHARACTERS.search(text) is not None


# Bidi controls (embeddings, overrides, isolates, marks) and zero-width characters:
# all of Unicode's Cf category that people mistake for nothing (str.isprintable
# refuses them too; named here so the rule reads as what it is for).
INVISIBLE_CHARACTERS = re.compile(
    "[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff]"
)


def has_invisible_characters(text: str) -> bool:
    return INVISIBLE_CHARACTERS.search(text) is not None


def check_printable(value: str, what: str) -> None:
    """Refuse text for the ledger that a batch name would not pass (``str.isprintable``:
    no control, format or separator characters but the space). Code: bad-text."""
    if not value.isprintable():
        raise PolicyError(f"{what} must be printable text", code="bad-text")
