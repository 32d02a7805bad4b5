"""The station's side of AWS IoT: CA registration, the JITR whitelist table, the Lambda zip.

Functions take plain inputs (a boto3 client, a certificate, a path) so the CLI and
the API can wire them. Region, credentials and endpoint come from boto3's standard
chain only (``AWS_REGION``/``AWS_DEFAULT_REGION``, profiles, instance roles,
``AWS_ENDPOINT_URL``); nothing AWS-specific is hard-coded here.

CA registration follows the manual steps of the ARTIK tutorial: get a registration
code, make a verification certificate whose CN is the code and which the CA signs,
register the CA with it, then activate it and enable auto-registration. The
verification certificate is checked here before it is sent, because AWS's answer to a
bad one is terse and moto does not check it at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from station.errors import ConfigurationError, Kind, StationError
from station.files import atomic_writer, write_atomically
from station.timefmt import rfc3339, utc_now

CA_STATUSES = ("ACTIVE", "INACTIVE")
AUTO_REGISTRATION_STATUSES = ("ENABLE", "DISABLE")

_HEX = re.compile(r"^[0-9a-f]+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- errors


class VerificationCertificateError(StationError):
    """The verification certificate the CA signed is not one AWS IoT would accept."""

    code = "verification-certificate-invalid"
    kind = Kind.INVALID

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason


class AwsError(StationError):
    """AWS refused or failed a call; the message carries AWS's error code."""

    code = "aws-error"
    kind = Kind.UPSTREAM


_ACCESS_DENIED = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnauthorizedException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
    }
)
_THROTTLED = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
    }
)


def aws_refusal(action: str, exc: ClientError) -> AwsError:
    """AWS's refusal as one AwsError whose code says what to do about it."""
    error = exc.response.get("Error", {})
    aws_code = str(error.get("Code", "?"))
    message = " ".join(str(error.get("Message", "")).split())[:400]  # one line
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    text = f"{action} failed: {aws_code}: {message}"
    if aws_code in _ACCESS_DENIED or status == 403:
        return AwsError(
            f"{text} (the station's AWS identity lacks the right, or its keys are wrong: "
            "attach the stack's StationPolicy, see docs/aws.md)",
            code="aws-access-denied",
            kind=Kind.NOT_CONFIGURED,
        )
    if aws_code in _THROTTLED:
        return AwsError(f"{text} (retry later)", code="aws-throttled", kind=Kind.UPSTREAM)
    return AwsError(text)


def aws_error(exc: BaseException, action: str = "AWS") -> AwsError | None:
    """Any error boto3 raises as one AwsError with a reason code; None for other errors.

    Codes: aws-no-region, aws-no-credentials, aws-unreachable, aws-access-denied,
    aws-throttled, aws-error (anything else AWS answered).
    """
    if isinstance(exc, AwsError):
        return exc
    if isinstance(exc, ClientError):
        return aws_refusal(action, exc)
    if isinstance(exc, NoRegionError):
        return AwsError(
            "no AWS region: export AWS_DEFAULT_REGION (boto3 reads it; AWS_REGION is honoured "
            "by the station too), or set region in the AWS profile",
            code="aws-no-region",
            kind=Kind.NOT_CONFIGURED,
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return AwsError(
            f"no usable AWS credentials ({exc}): export AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role",
            code="aws-no-credentials",
            kind=Kind.NOT_CONFIGURED,
        )
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
        return AwsError(
            f"AWS is unreachable: {exc} (check the network, AWS_ENDPOINT_URL and the region)",
            code="aws-unreachable",
            kind=Kind.UNAVAILABLE,
        )
    if isinstance(exc, BotoCoreError):
        return AwsError(f"{action} failed: {exc}")
    return None


@contextlib.contextmanager
def aws_errors(action: str = "AWS") -> Iterator[None]:
    """Raise whatever boto3 raises inside as an AwsError with a reason code."""
    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        translated = aws_error(exc, action)
        assert translated is not None
        raise translated from exc


def client(service: str) -> Any:
    """A boto3 client from the standard chain; AWS_REGION counts when AWS_DEFAULT_REGION is
    unset (this boto3 reads only the latter). Raises AwsError (aws-no-region...)."""
    import boto3

    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None
    with aws_errors(f"creating the {service} client"):
        return boto3.client(service, region_name=region)


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


# --------------------------------------------------------------------------- CA registration


@dataclass(frozen=True, slots=True)
class CaRegistration:
    certificate_id: str
    certificate_arn: str
    status: str  # ACTIVE | INACTIVE | ...
    auto_registration: str | None  # ENABLE | DISABLE | None when unknown
    already_registered: bool = False  # True when register_ca found an existing registration


def ca_certificate_id(ca_cert: x509.Certificate) -> str:
    """AWS's certificateId for a certificate: SHA-256 of its DER, lowercase hex."""
    return hashlib.sha256(ca_cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _read_state(state_path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(state_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"AWS state file {state_path} is unreadable: {exc}", code="aws-state-unreadable"
        ) from exc
    return data if isinstance(data, dict) else None


def _write_state(state_path: Path, registration: CaRegistration, **extra: Any) -> None:
    state_path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "certificateId": registration.certificate_id,
        "certificateArn": registration.certificate_arn,
        "status": registration.status,
        "autoRegistrationStatus": registration.auto_registration,
        "updatedAt": rfc3339(utc_now(), timespec="seconds"),
        **extra,
    }
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_atomically(state_path, text.encode(), mode=0o600)


def described(
    describe: Callable[..., Any], api: str, name: str, *, key: str = "certificateId"
) -> dict[str, Any] | None:
    """``describe(certificateId=...)``'s certificateDescription (the whole answer for
    another ``key``), or None when AWS does not know it; any other refusal is an
    AwsError naming ``api``."""
    try:
        response = describe(**{key: name})
    except ClientError as exc:
        if error_code(exc) == "ResourceNotFoundException":
            return None
        raise aws_refusal(api, exc) from exc
    description: dict[str, Any] = response.get("certificateDescription", response)
    return description


def _describe_ca(iot: Any, certificate_id: str) -> dict[str, Any] | None:
    """The CA's certificateDescription, or None when AWS does not know it."""
    return described(iot.describe_ca_certificate, "DescribeCACertificate", certificate_id)


def _registration_from(
    description: dict[str, Any],
    fallback_auto_registration: str | None,
    *,
    already_registered: bool = False,
) -> CaRegistration:
    # moto (and older API versions) leave autoRegistrationStatus out: keep what we asked for.
    auto = description.get("autoRegistrationStatus") or fallback_auto_registration
    return CaRegistration(
        certificate_id=str(description["certificateId"]),
        certificate_arn=str(description["certificateArn"]),
        status=str(description.get("status", "")),
        auto_registration=str(auto) if auto else None,
        already_registered=already_registered,
    )


def _check_ca_certificate(ca_cert: x509.Certificate, now: datetime) -> None:
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise StationError(
            "the certificate to register is not a CA (basicConstraints CA:TRUE missing)",
            code="ca-certificate-invalid",
            kind=Kind.INVALID,
        )
    if not ca_cert.not_valid_before_utc <= now <= ca_cert.not_valid_after_utc:
        raise StationError(
            "the CA certificate is not currently valid", code="ca-certificate-invalid"
        )


def check_verification_certificate(
    verification: x509.Certificate,
    ca_cert: x509.Certificate,
    registration_code: str,
    public_key: ec.EllipticCurvePublicKey | None = None,
    *,
    now: datetime | None = None,
) -> None:
    """Refuse a verification certificate AWS IoT would refuse (or should).

    Rules: CN is the registration code; issuer is the CA's subject; the signature
    verifies with the CA's public key; it is valid now; and, when ``public_key`` is
    given, it certifies that key (the one whose CSR we sent to be signed).
    """
    now = now or datetime.now(UTC)
    cns = verification.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != registration_code:
        raise VerificationCertificateError(
            "the verification certificate's CN is not the registration code",
            reason="cn-mismatch",
        )
    if verification.issuer != ca_cert.subject:
        raise VerificationCertificateError(
            "the verification certificate was not issued by the CA "
            f"(issuer {verification.issuer.rfc4514_string()!r}, "
            f"CA {ca_cert.subject.rfc4514_string()!r})",
            reason="issuer-mismatch",
        )
    try:
        verification.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise VerificationCertificateError(
            "the verification certificate's signature does not verify with the CA's key",
            reason="bad-signature",
        ) from exc
    if not verification.not_valid_before_utc <= now <= verification.not_valid_after_utc:
        raise VerificationCertificateError(
            "the verification certificate is not currently valid", reason="not-valid-now"
        )
    if public_key is not None and verification.public_key() != public_key:
        raise VerificationCertificateError(
            "the verification certificate does not certify the verification key",
            reason="key-mismatch",
        )


def _existing(iot: Any, certificate_id: str, state: dict[str, Any] | None) -> CaRegistration | None:
    description = _describe_ca(iot, certificate_id)
    if description is None:
        return None
    fallback = None
    if state and state.get("certificateId") == certificate_id:
        fallback = state.get("autoRegistrationStatus")
    return _registration_from(description, fallback, already_registered=True)


def register_ca(
    iot: Any,
    ca_cert: x509.Certificate,
    sign_verification: Callable[[x509.CertificateSigningRequest], x509.Certificate],
    state_path: Path,
    *,
    activate: bool = True,
    auto_registration: bool = True,
) -> CaRegistration:
    """Register the station's CA with AWS IoT; report the existing registration if any.

    ``sign_verification`` signs the verification CSR with the CA key (the HSM); the
    verification key itself is a fresh P-256 key that lives only in memory.
    """
    now = datetime.now(UTC)
    _check_ca_certificate(ca_cert, now)
    certificate_id = ca_certificate_id(ca_cert)
    state = _read_state(state_path)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    # AWS has no "get CA by PEM" and moto lacks ListCACertificates: the id is ours to compute.
    found = _existing(iot, certificate_id, state)
    if found is not None:
        _write_state(state_path, found, caSubject=ca_cert.subject.rfc4514_string())
        return found

    try:
        code = str(iot.get_registration_code()["registrationCode"])
    except ClientError as exc:
        raise aws_refusal("GetRegistrationCode", exc) from exc

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, code)]))
        .sign(key, hashes.SHA256())
    )
    public_key = key.public_key()
    del key  # the private key is not needed again: the CA signs, AWS checks the CA's signature
    verification = sign_verification(csr)
    check_verification_certificate(verification, ca_cert, code, public_key, now=now)
    verification_pem = verification.public_bytes(serialization.Encoding.PEM).decode("ascii")

    auto = "ENABLE" if auto_registration else "DISABLE"
    try:
        iot.register_ca_certificate(
            caCertificate=ca_pem,
            verificationCertificate=verification_pem,
            setAsActive=activate,
            allowAutoRegistration=auto_registration,
        )
    except ClientError as exc:
        if error_code(exc) != "ResourceAlreadyExistsException":
            raise aws_refusal("RegisterCACertificate", exc) from exc
        found = _existing(iot, certificate_id, state)
        if found is None:
            raise aws_refusal("RegisterCACertificate", exc) from exc
        _write_state(state_path, found, caSubject=ca_cert.subject.rfc4514_string())
        return found

    description = _describe_ca(iot, certificate_id)
    if description is None:
        raise AwsError(
            f"CA {certificate_id} was registered but DescribeCACertificate does not find it",
            code="aws-inconsistent",
        )
    registration = _registration_from(description, auto)
    _write_state(state_path, registration, caSubject=ca_cert.subject.rfc4514_string())
    return registration


def _stored_id(state_path: Path) -> tuple[str, dict[str, Any]]:
    state = _read_state(state_path)
    if not state or not _HEX64.match(str(state.get("certificateId", ""))):
        raise ConfigurationError(
            f"no CA registration recorded in {state_path}: run `station aws register-ca` first",
            code="ca-not-registered",
        )
    return str(state["certificateId"]), state


def ca_status(iot: Any, state_path: Path) -> CaRegistration:
    """The registered CA as AWS IoT reports it now (and refresh the stored state)."""
    certificate_id, state = _stored_id(state_path)
    description = _describe_ca(iot, certificate_id)
    if description is None:
        raise StationError(
            f"AWS IoT does not know the registered CA {certificate_id} (deleted?)",
            code="ca-not-found",
            kind=Kind.NOT_FOUND,
        )
    registration = _registration_from(description, state.get("autoRegistrationStatus"))
    extra = {k: v for k, v in state.items() if k == "caSubject"}
    _write_state(state_path, registration, **extra)
    return registration


def update_ca(
    iot: Any, state_path: Path, status: str | None, auto_registration: str | None
) -> CaRegistration:
    """Change the registered CA's status (ACTIVE|INACTIVE) and/or auto-registration."""
    if status is None and auto_registration is None:
        raise StationError(
            "nothing to update: give a status and/or an auto-registration setting",
            code="nothing-to-update",
        )
    if status is not None:
        status = status.upper()
        if status not in CA_STATUSES:
            raise StationError(
                f"status must be one of {', '.join(CA_STATUSES)}", code="invalid-ca-status"
            )
    if auto_registration is not None:
        auto_registration = auto_registration.upper()
        if auto_registration not in AUTO_REGISTRATION_STATUSES:
            raise StationError(
                f"auto-registration must be one of {', '.join(AUTO_REGISTRATION_STATUSES)}",
                code="invalid-auto-registration",
            )
    certificate_id, state = _stored_id(state_path)
    kwargs: dict[str, Any] = {"certificateId": certificate_id}
    if status is not None:
        kwargs["newStatus"] = status
    if auto_registration is not None:
        kwargs["newAutoRegistrationStatus"] = auto_registration
    try:
        iot.update_ca_certificate(**kwargs)
    except ClientError as exc:
        if error_code(exc) == "ResourceNotFoundException":
            raise StationError(
                f"AWS IoT does not know the registered CA {certificate_id}",
                code="ca-not-found",
                kind=Kind.NOT_FOUND,
            ) from exc
        raise aws_refusal("UpdateCACertificate", exc) from exc
    description = _describe_ca(iot, certificate_id)
    if description is None:
        raise StationError(
            f"CA {certificate_id} vanished", code="ca-not-found", kind=Kind.NOT_FOUND
        )
    # AWS reports autoRegistrationStatus; moto ignores and omits it: keep what was asked for.
    fallback = auto_registration or state.get("autoRegistrationStatus")
    registration = _registration_from(description, fallback)
    extra = {k: v for k, v in state.items() if k == "caSubject"}
    _write_state(state_path, registration, **extra)
    return registration


# --------------------------------------------------------------------------- Lambda package

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _jitr_dir() -> Path:
    spec = importlib.util.find_spec("jitr")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError("the jitr package is not installed", code="jitr-missing")
    return Path(next(iter(spec.submodule_search_locations)))


def package_lambda(out: Path) -> Path:
    """Write the deployable zip of the ``jitr`` package to ``out``; byte-for-byte reproducible.

    Handler: ``jitr.handler.lambda_handler``. boto3 comes with the Lambda runtime.
    """
    source = _jitr_dir()
    files = sorted(
        p
        for p in source.rglob("*.py")
        if "__pycache__" not in p.parts and not any(part.startswith(".") for part in p.parts)
    )
    if not any(p.name == "handler.py" for p in files):
        raise ConfigurationError(f"no handler.py in {source}", code="jitr-missing")
    out = Path(out)
    with (
        atomic_writer(out) as fh,
        zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as archive,
    ):
        for path in files:
            name = "jitr/" + path.relative_to(source).as_posix()
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            info.create_system = 3
            archive.writestr(info, path.read_bytes())
    return out
