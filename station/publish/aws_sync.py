"""The whitelist in AWS: the DynamoDB table the JITR Lambda reads, and AWS IoT
certificate statuses that follow the station's ledger.

``sync_whitelist`` makes the table hold the ledger's whitelist and AWS IoT's
certificate statuses agree with the ledger (see its docstring); ``create_whitelist_table``
makes the table for setups without the CloudFormation stack. The sync activates a
certificate as the Lambda would (policy, thing, ACTIVE), with the same device policy
document: ``device_policy_document`` is jitr.handler's ``default_policy_document``,
written again here because the station may not import the Lambda's package
(tests/test_aws_states.py holds the two equal).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Protocol

from botocore.exceptions import ClientError

from station.aws_iot import AwsError, aws_refusal, described, error_code
from station.errors import ConfigurationError, Kind, StationError
from station.whitelist import DelistedCertificate, WhitelistEntry

BATCH_WRITE_LIMIT = 25  # DynamoDB BatchWriteItem maximum
BATCH_GET_LIMIT = 100  # DynamoDB BatchGetItem maximum
_MAX_ATTEMPTS = 8

_HEX = re.compile(r"^[0-9a-f]+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_THING_NAME = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")

DEFAULT_POLICY_NAME = "station-device"  # deploy/jitr.yaml's DevicePolicyName default
DEFAULT_TOPIC_PREFIX = "things"  # and TopicPrefix's


def device_policy_document(certificate_arn: str, topic_prefix: str = DEFAULT_TOPIC_PREFIX) -> str:
    """The device policy the JITR Lambda creates (jitr.handler.default_policy_document):
    connect as its own thing, talk under its own prefix."""
    parts = certificate_arn.split(":")
    if len(parts) < 6 or parts[0] != "arn" or parts[2] != "iot":
        raise ValueError(f"not an IoT certificate ARN: {certificate_arn}")
    base = f"arn:{parts[1]}:iot:{parts[3]}:{parts[4]}"
    thing = "${iot:Connection.Thing.ThingName}"
    prefix = topic_prefix.strip("/")
    document = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "iot:Connect",
                "Resource": f"{base}:client/{thing}",
                "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}},
            },
            {
                "Effect": "Allow",
                "Action": ["iot:Publish", "iot:Receive"],
                "Resource": f"{base}:topic/{prefix}/{thing}/*",
            },
            {
                "Effect": "Allow",
                "Action": "iot:Subscribe",
                "Resource": f"{base}:topicfilter/{prefix}/{thing}/*",
            },
        ],
    }
    return json.dumps(document, separators=(",", ":"))


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
        if error_code(exc) != "ResourceNotFoundException":
            raise aws_refusal("DescribeTable", exc) from exc
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
        if error_code(exc) != "ResourceInUseException":  # created meanwhile by someone else
            raise aws_refusal("CreateTable", exc) from exc
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
                raise aws_refusal("BatchGetItem", exc) from exc
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
                raise aws_refusal("BatchWriteItem", exc) from exc
            pending = response.get("UnprocessedItems") or {}
            if not pending:
                break
            _backoff(attempt)
        else:
            raise AwsError("BatchWriteItem kept returning unprocessed items", code="aws-throttled")


def _description(iot: Any, certificate_id: str) -> dict[str, Any] | None:
    """AWS IoT's description of a certificate, or None when AWS IoT does not know it."""
    return described(iot.describe_certificate, "DescribeCertificate", certificate_id)


def _certificate_status(iot: Any, certificate_id: str) -> str | None:
    """The AWS IoT status of a certificate, or None when AWS IoT does not know it."""
    description = _description(iot, certificate_id)
    return None if description is None else str(description.get("status", ""))


def _set_certificate_status(iot: Any, certificate_id: str, status: str) -> None:
    try:
        iot.update_certificate(certificateId=certificate_id, newStatus=status)
    except ClientError as exc:
        raise aws_refusal(f"UpdateCertificate {certificate_id} -> {status}", exc) from exc


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
        if tolerate and error_code(exc) == tolerate:
            return False
        raise aws_refusal(action, exc) from exc
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
        policyDocument=device_policy_document(arn, policy.topic_prefix),
    )
    _call("AttachPolicy", iot.attach_policy, policyName=policy.name, target=arn)
    thing = item["device_id"]
    if described(iot.describe_thing, "DescribeThing", thing, key="thingName") is None:
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
