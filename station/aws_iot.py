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
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

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

from jitr.handler import DEFAULT_POLICY_NAME, DEFAULT_TOPIC_PREFIX, default_policy_document
from station.errors import ConfigurationError, Kind, StationError
from station.files import atomic_writer, write_atomically
from station.timefmt import rfc3339, utc_now
from station.whitelist import DelistedCertificate, WhitelistEntry

CA_STATUSES = ("ACTIVE", "INACTIVE")
AUTO_REGISTRATION_STATUSES = ("ENABLE", "DISABLE")
BATCH_WRITE_LIMIT = 25  # DynamoDB BatchWriteItem maximum
BATCH_GET_LIMIT = 100  # DynamoDB BatchGetItem maximum
_MAX_ATTEMPTS = 8

_HEX = re.compile(r"^[0-9a-f]+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_THING_NAME = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")


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


def _aws_error(action: str, exc: ClientError) -> AwsError:
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
        return _aws_error(action, exc)
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


def _error_code(exc: ClientError) -> str:
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


def _described(
    describe: Callable[..., Any], api: str, name: str, *, key: str = "certificateId"
) -> dict[str, Any] | None:
    """``describe(certificateId=...)``'s certificateDescription (the whole answer for
    another ``key``), or None when AWS does not know it; any other refusal is an
    AwsError naming ``api``."""
    try:
        response = describe(**{key: name})
    except ClientError as exc:
        if _error_code(exc) == "ResourceNotFoundException":
            return None
        raise _aws_error(api, exc) from exc
    description: dict[str, Any] = response.get("certificateDescription", response)
    return description


def _describe_ca(iot: Any, certificate_id: str) -> dict[str, Any] | None:
    """The CA's certificateDescription, or None when AWS does not know it."""
    return _described(iot.describe_ca_certificate, "DescribeCACertificate", certificate_id)


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
        raise _aws_error("GetRegistrationCode", exc) from exc

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
        if _error_code(exc) != "ResourceAlreadyExistsException":
            raise _aws_error("RegisterCACertificate", exc) from exc
        found = _existing(iot, certificate_id, state)
        if found is None:
            raise _aws_error("RegisterCACertificate", exc) from exc
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
        if _error_code(exc) == "ResourceNotFoundException":
            raise StationError(
                f"AWS IoT does not know the registered CA {certificate_id}",
                code="ca-not-found",
                kind=Kind.NOT_FOUND,
            ) from exc
        raise _aws_error("UpdateCACertificate", exc) from exc
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


# --------------------------------------------------------------------------- whitelist table


@dataclass(frozen=True, slots=True)
class SkippedEntry:
    """A whitelist entry the sync could not publish, and why."""

    serial: str
    device_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class CertificateChange:
    """One AWS IoT certificate status the sync changed, and why."""

    serial: str
    before: str
    after: str
    why: str  # revoked-in-ledger | left-whitelist | whitelisted


@dataclass(frozen=True, slots=True)
class SyncWarning:
    serial: str
    code: str
    message: str


class RevokedTracker(Protocol):
    """Which revoked certificates are still to be set REVOKED in AWS IoT
    (station.publish.aws_state.RevokedInAws keeps it in the ledger)."""

    def due(self) -> Iterable[DelistedCertificate]: ...

    def record(self, seen: Mapping[str, str | None]) -> None: ...


@dataclass(frozen=True, slots=True)
class SyncReport:
    added: int
    updated: int
    unchanged: int
    removed: int
    # AWS IoT certificate status changes the sync made for the serials it moved
    revoked: int = 0  # -> REVOKED (revoked in the ledger)
    deactivated: int = 0  # -> INACTIVE (left the whitelist: failed board)
    reactivated: int = 0  # INACTIVE/PENDING_ACTIVATION -> ACTIVE (whitelisted)
    skipped: tuple[SkippedEntry, ...] = ()  # entries that could not be published
    changes: tuple[CertificateChange, ...] = ()  # every AWS IoT status the sync changed
    warnings: tuple[SyncWarning, ...] = ()  # what the sync found and cannot fix


def create_whitelist_table(dynamodb_client: Any, table_name: str) -> bool:
    """Create the whitelist table (on-demand, key ``serial``); True if it was created."""
    try:
        description = dynamodb_client.describe_table(TableName=table_name)["Table"]
    except ClientError as exc:
        if _error_code(exc) != "ResourceNotFoundException":
            raise _aws_error("DescribeTable", exc) from exc
    else:
        _check_table_key(table_name, description)
        return False
    try:
        dynamodb_client.create_table(
            TableName=table_name,
            AttributeDefinitions=[{"AttributeName": "serial", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "serial", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )
        created = True
    except ClientError as exc:
        if _error_code(exc) != "ResourceInUseException":  # created meanwhile by someone else
            raise _aws_error("CreateTable", exc) from exc
        created = False
    dynamodb_client.get_waiter("table_exists").wait(
        TableName=table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
    )
    return created


def _check_table_key(table_name: str, description: dict[str, Any]) -> None:
    keys = [(k["AttributeName"], k["KeyType"]) for k in description.get("KeySchema", [])]
    types = {
        a["AttributeName"]: a["AttributeType"] for a in description.get("AttributeDefinitions", [])
    }
    if keys != [("serial", "HASH")] or types.get("serial") != "S":
        raise ConfigurationError(
            f"table {table_name} exists but its key is not `serial` (string)",
            code="whitelist-table-mismatch",
        )


def _item(entry: WhitelistEntry) -> dict[str, str]:
    not_after = entry.not_after
    if not_after.tzinfo is None:
        not_after = not_after.replace(tzinfo=UTC)
    return {
        "serial": entry.serial,
        "device_id": entry.device_id,
        "batch": entry.batch,
        "fingerprint": entry.fingerprint,
        "not_after": not_after.astimezone(UTC).isoformat(),
    }


def _problems(entry: WhitelistEntry) -> list[str]:
    problems = []
    if not _HEX.match(entry.serial) or (len(entry.serial) > 1 and entry.serial[0] == "0"):
        problems.append("serial is not lowercase hex without padding")
    if not _HEX64.match(entry.fingerprint):
        problems.append("fingerprint is not a SHA-256 in lowercase hex")
    if not _THING_NAME.match(entry.device_id):
        problems.append("device_id is not a valid AWS IoT thing name")
    if not entry.batch:
        problems.append("batch is empty")
    return problems


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _backoff(attempt: int) -> None:
    time.sleep(min(0.05 * (2**attempt), 2.0))


def _read_existing(
    dynamodb_client: Any, table_name: str, serials: Sequence[str]
) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for chunk in _chunks(serials, BATCH_GET_LIMIT):
        request: dict[str, Any] = {
            table_name: {"Keys": [{"serial": {"S": s}} for s in chunk], "ConsistentRead": True}
        }
        for attempt in range(_MAX_ATTEMPTS):
            try:
                response = dynamodb_client.batch_get_item(RequestItems=request)
            except ClientError as exc:
                raise _aws_error("BatchGetItem", exc) from exc
            for raw in response.get("Responses", {}).get(table_name, []):
                item = {k: v["S"] for k, v in raw.items() if isinstance(v, dict) and "S" in v}
                found[item["serial"]] = item
            request = response.get("UnprocessedKeys") or {}
            if not request:
                break
            _backoff(attempt)
        else:
            raise AwsError("BatchGetItem kept returning unprocessed keys", code="aws-throttled")
    return found


def _write(dynamodb_client: Any, table_name: str, requests: Sequence[dict[str, Any]]) -> None:
    for chunk in _chunks(requests, BATCH_WRITE_LIMIT):
        pending: dict[str, Any] = {table_name: list(chunk)}
        for attempt in range(_MAX_ATTEMPTS):
            try:
                response = dynamodb_client.batch_write_item(RequestItems=pending)
            except ClientError as exc:
                raise _aws_error("BatchWriteItem", exc) from exc
            pending = response.get("UnprocessedItems") or {}
            if not pending:
                break
            _backoff(attempt)
        else:
            raise AwsError("BatchWriteItem kept returning unprocessed items", code="aws-throttled")


def _description(iot: Any, certificate_id: str) -> dict[str, Any] | None:
    """AWS IoT's description of a certificate, or None when AWS IoT does not know it."""
    return _described(iot.describe_certificate, "DescribeCertificate", certificate_id)


def _certificate_status(iot: Any, certificate_id: str) -> str | None:
    """The AWS IoT status of a certificate, or None when AWS IoT does not know it."""
    description = _description(iot, certificate_id)
    return None if description is None else str(description.get("status", ""))


def _set_certificate_status(iot: Any, certificate_id: str, status: str) -> None:
    try:
        iot.update_certificate(certificateId=certificate_id, newStatus=status)
    except ClientError as exc:
        raise _aws_error(f"UpdateCertificate {certificate_id} -> {status}", exc) from exc


def _take_out(
    iot: Any, delisted: DelistedCertificate
) -> tuple[str | None, CertificateChange | None]:
    """Stop a delisted certificate in AWS IoT: its status now (None: AWS IoT does not
    know it) and the change made, if any.

    Revoked in the ledger: REVOKED (final in AWS). Merely off the whitelist: INACTIVE
    (reversible). Never registered (never connected), or already there: nothing.
    """
    target = "REVOKED" if delisted.revoked else "INACTIVE"
    current = _certificate_status(iot, delisted.fingerprint)
    if current is None or current == target or current == "REVOKED":
        return current, None  # AWS never changes a REVOKED certificate again
    _set_certificate_status(iot, delisted.fingerprint, target)
    why = "revoked-in-ledger" if delisted.revoked else "left-whitelist"
    return target, CertificateChange(delisted.serial, current, target, why)


def _deletes(serials: Iterable[str]) -> list[dict[str, Any]]:
    """BatchWriteItem requests deleting the items of ``serials``."""
    return [{"DeleteRequest": {"Key": {"serial": {"S": serial}}}} for serial in serials]


@dataclass(frozen=True, slots=True)
class DevicePolicy:
    """The AWS IoT policy the JITR Lambda attaches (deploy/jitr.yaml's DevicePolicyName
    and TopicPrefix): the sync attaches the same one when it activates a certificate."""

    name: str = DEFAULT_POLICY_NAME
    topic_prefix: str = DEFAULT_TOPIC_PREFIX


def _call(action: str, fn: Callable[..., Any], *, tolerate: str = "", **kwargs: Any) -> bool:
    """Call an IoT API; False when it answered ``tolerate`` (already exists...)."""
    try:
        fn(**kwargs)
    except ClientError as exc:
        if tolerate and _error_code(exc) == tolerate:
            return False
        raise _aws_error(action, exc) from exc
    return True


def _activate(
    iot: Any, description: dict[str, Any], item: dict[str, str], policy: DevicePolicy
) -> None:
    """What the JITR Lambda does for a whitelisted certificate, in its order: the policy,
    attached; the thing, the certificate attached to it; only then ACTIVE."""
    arn = str(description["certificateArn"])
    _call(
        "CreatePolicy",
        iot.create_policy,
        tolerate="ResourceAlreadyExistsException",
        policyName=policy.name,
        policyDocument=default_policy_document(arn, policy.topic_prefix),
    )
    _call("AttachPolicy", iot.attach_policy, policyName=policy.name, target=arn)
    thing = item["device_id"]
    if _described(iot.describe_thing, "DescribeThing", thing, key="thingName") is None:
        _call(
            "CreateThing",
            iot.create_thing,
            tolerate="ResourceAlreadyExistsException",
            thingName=thing,
            attributePayload={"attributes": {"serial": item["serial"], "batch": item["batch"]}},
        )
    _call("AttachThingPrincipal", iot.attach_thing_principal, thingName=thing, principal=arn)
    _set_certificate_status(iot, str(description["certificateId"]), "ACTIVE")


def sync_whitelist(
    dynamodb_client: Any,
    table_name: str,
    entries: Iterable[WhitelistEntry],
    delisted: Iterable[DelistedCertificate],
    *,
    iot: Any,
    batch: str | None = None,
    revoked: RevokedTracker | None = None,
    policy: DevicePolicy | None = None,
) -> SyncReport:
    """Make the table hold ``entries`` (optionally only those of ``batch``), minus ``delisted``,
    and make AWS IoT's certificate statuses follow the ledger.

    Incremental: reads the items for the serials concerned and writes only the
    differences. Items the station does not mention are left alone (several stations
    may share one table); delisted serials are removed whatever their batch, and only
    when the item is the ledger's certificate (same fingerprint).

    1. An item leaving the table first has its AWS IoT certificate stopped (REVOKED if
       revoked in the ledger, else INACTIVE), then is deleted: the JITR Lambda only
       runs on a certificate's first connection, so removing the item alone would
       leave an ACTIVE certificate connecting. A failure in between leaves the item in
       the table, so the next sync retries.
    2. A certificate revoked in the ledger ends REVOKED in AWS IoT even without an item
       (a failed board made INACTIVE earlier, a board the Lambda left INACTIVE because
       it connected before its batch was synced). ``revoked`` says which are still to
       check (bounded); without it, every revoked certificate in ``delisted`` is.
    3. An item entering the table whose certificate AWS IoT already holds INACTIVE or
       PENDING_ACTIVATION (made INACTIVE by an earlier sync, or left so by the Lambda)
       is put, then activated as the Lambda would: policy, thing, ACTIVE. One already
       REVOKED cannot be (REVOKED is final): a warning says so.

    Only what the ledger revoked is ever set REVOKED. Every status change is reported.
    """
    policy = policy or DevicePolicy()
    out: dict[str, DelistedCertificate] = {d.serial.lower(): d for d in delisted}
    wanted: dict[str, dict[str, str]] = {}
    fingerprints: dict[str, str] = {}
    skipped: list[SkippedEntry] = []
    for entry in entries:
        if batch is not None and entry.batch != batch:
            continue
        problems = _problems(entry)
        if problems:
            skipped.append(SkippedEntry(entry.serial, entry.device_id, "; ".join(problems)))
            continue
        if entry.serial in out:
            continue
        item = _item(entry)
        previous = wanted.get(entry.serial)
        if previous is not None and previous != item:
            raise StationError(
                f"serial {entry.serial} appears twice with different content",
                code="whitelist-duplicate-serial",
                kind=Kind.CONFLICT,
            )
        wanted[entry.serial] = item
        fingerprints[entry.serial] = entry.fingerprint

    existing = _read_existing(dynamodb_client, table_name, sorted(set(wanted) | set(out)))
    changes: list[CertificateChange] = []
    warnings: list[SyncWarning] = []

    # 1. out of the table: stop the certificate in AWS IoT, then delete the item
    leaving = [
        out[serial]
        for serial in sorted(out)
        if serial in existing and existing[serial].get("fingerprint") == out[serial].fingerprint
    ]
    for chunk in _chunks(leaving, BATCH_WRITE_LIMIT):
        seen: dict[str, str | None] = {}
        for certificate in chunk:
            status, change = _take_out(iot, certificate)
            if change is not None:
                changes.append(change)
            if certificate.revoked:
                seen[certificate.serial] = status
        _write(dynamodb_client, table_name, _deletes(c.serial for c in chunk))
        if revoked is not None:
            revoked.record(seen)

    # 2. revoked in the ledger: REVOKED in AWS IoT, item or not
    handled = {c.serial for c in leaving}
    candidates = revoked.due() if revoked is not None else [d for d in out.values() if d.revoked]
    seen = {}
    try:
        for certificate in candidates:
            if certificate.serial in handled:
                continue
            current = _certificate_status(iot, certificate.fingerprint)
            if current is not None and current != "REVOKED":
                _set_certificate_status(iot, certificate.fingerprint, "REVOKED")
                changes.append(
                    CertificateChange(certificate.serial, current, "REVOKED", "revoked-in-ledger")
                )
                current = "REVOKED"
            seen[certificate.serial] = current
    finally:
        if revoked is not None:
            revoked.record(seen)

    # 3. into the table: put, then activate what AWS IoT holds INACTIVE or pending
    added = updated = unchanged = 0
    requests: list[dict[str, Any]] = []
    entering: list[str] = []
    for serial in sorted(wanted):
        item = wanted[serial]
        current_item = existing.get(serial)
        if current_item == item:
            unchanged += 1
            continue
        if current_item is None:
            added += 1
            entering.append(serial)
        else:
            updated += 1
        requests.append({"PutRequest": {"Item": {k: {"S": v} for k, v in item.items()}}})
    # Described before the put: a failure here leaves these items out, to be retried.
    waiting: list[tuple[str, dict[str, Any]]] = []
    for serial in entering:
        description = _description(iot, fingerprints[serial])
        if description is None:
            continue  # never connected: the Lambda activates it on its first connection
        status = str(description.get("status", ""))
        if status in ("INACTIVE", "PENDING_ACTIVATION"):
            waiting.append((serial, description))
        elif status == "REVOKED":
            warnings.append(
                SyncWarning(
                    serial,
                    "aws-certificate-revoked",
                    f"serial {serial} (device {wanted[serial]['device_id']}) is whitelisted but "
                    "its certificate is REVOKED in AWS IoT, which is final: the board cannot "
                    "connect until it is provisioned again",
                )
            )
    _write(dynamodb_client, table_name, requests)
    for done, (serial, description) in enumerate(waiting):
        try:
            _activate(iot, description, wanted[serial], policy)
        except AwsError:
            # Take the items still not active out again so that the next sync, finding
            # them absent, puts and activates them. Harmless: their certificates are
            # registered (no first-connect JITR event) and refused until ACTIVE.
            with contextlib.suppress(AwsError):
                _write(dynamodb_client, table_name, _deletes(s for s, _ in waiting[done:]))
            raise
        changes.append(
            CertificateChange(serial, str(description.get("status")), "ACTIVE", "whitelisted")
        )
    return SyncReport(
        added=added,
        updated=updated,
        unchanged=unchanged,
        removed=len(leaving),
        revoked=sum(c.after == "REVOKED" for c in changes),
        deactivated=sum(c.after == "INACTIVE" for c in changes),
        reactivated=sum(c.after == "ACTIVE" for c in changes),
        skipped=tuple(skipped),
        changes=tuple(changes),
        warnings=tuple(warnings),
    )


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
