"""AWS IoT Just-In-Time Registration: activate whitelisted device certificates, hold the rest.

AWS IoT publishes an event on ``$aws/events/certificates/registered/<caCertificateId>``
when a device presents a certificate issued by a registered CA for the first time; a
topic rule invokes this function with that event. AWS IoT checks the certificate's
signature against the registered CA before it registers it, so a forged certificate
never reaches this function. The function:

1. reads the certificate (DescribeCertificate) and takes its serial number from the DER;
2. looks the serial up in the whitelist table (DynamoDB, env ``WHITELIST_TABLE``) and
   checks that the stored fingerprint equals the certificateId (SHA-256 of the DER);
3. whitelisted: creates the device policy if missing, attaches it to the certificate,
   creates the thing named after the device id if missing, attaches the certificate to
   the thing and only then sets the certificate ACTIVE — one step after the other, so a
   device never connects with a half-made identity;
4. otherwise: sets the certificate INACTIVE, never REVOKED. A certificate of the
   station's CA that is not (yet) whitelisted may belong to a board whose batch is
   not synced yet, or to a failed board that may be verified again: INACTIVE refuses
   it and can be undone, and the station's whitelist sync activates it (with thing
   and policy) once whitelisted. REVOKED is final on AWS IoT and is set only by the
   sync, for what the station's ledger revoked; one found REVOKED is left as it is.

Every step is idempotent: a replayed event changes nothing. Infrastructure failures
(table missing, throttling) raise, so Lambda retries; they never stop a device.

This module is deployed on its own: it imports only the standard library and boto3.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.exceptions import ClientError

DEFAULT_POLICY_NAME = "station-device"
DEFAULT_TOPIC_PREFIX = "things"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_THING_NAME = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")
_ATTRIBUTE_VALUE = re.compile(r"^[a-zA-Z0-9_.,@/:#-]{0,800}$")
_PEM_BODY = re.compile(
    r"-----BEGIN CERTIFICATE-----(?P<body>[A-Za-z0-9+/=\s]+)-----END CERTIFICATE-----"
)


class CertificateParseError(ValueError):
    """The certificate is not the DER structure an X.509 certificate must have."""


# --------------------------------------------------------------------------- DER


def _read_tlv(data: bytes, offset: int) -> tuple[int, int, int]:
    """Read one DER TLV at offset: (tag, start of value, end of value)."""
    if offset + 2 > len(data):
        raise CertificateParseError("truncated DER")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise CertificateParseError("high tag numbers are not used in certificates")
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise CertificateParseError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise CertificateParseError("non-minimal DER length")
        pos += count
    end = pos + length
    if end > len(data):
        raise CertificateParseError("DER value runs past the end")
    return tag, pos, end


def serial_from_der(der: bytes) -> int:
    """The serial number of an X.509 certificate given as DER."""
    tag, start, end = _read_tlv(der, 0)  # Certificate ::= SEQUENCE
    if tag != 0x30 or end != len(der):
        raise CertificateParseError("not a certificate SEQUENCE")
    tag, start, end = _read_tlv(der, start)  # TBSCertificate ::= SEQUENCE
    if tag != 0x30:
        raise CertificateParseError("no TBSCertificate")
    tag, vstart, vend = _read_tlv(der, start)
    if tag == 0xA0:  # [0] EXPLICIT Version
        tag, vstart, vend = _read_tlv(der, vend)
    if tag != 0x02:  # CertificateSerialNumber ::= INTEGER
        raise CertificateParseError("no serial number INTEGER")
    if vend == vstart:
        raise CertificateParseError("empty serial number")
    return int.from_bytes(der[vstart:vend], "big", signed=True)


def der_from_pem(pem: str) -> bytes:
    match = _PEM_BODY.search(pem)
    if match is None:
        raise CertificateParseError("no PEM certificate block")
    try:
        return base64.b64decode("".join(match.group("body").split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CertificateParseError("bad base64 in PEM") from exc


def serial_hex(serial: int) -> str:
    """Same spelling as the station's whitelist: lowercase hex, no prefix, no padding."""
    return format(serial, "x")


# --------------------------------------------------------------------------- helpers


def _log(**fields: Any) -> None:
    """One JSON object per line on stdout (CloudWatch Logs). Never secrets."""
    fields.setdefault("component", "jitr")
    print(json.dumps(fields, sort_keys=True, default=str), file=sys.stdout, flush=True)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _arn_parts(certificate_arn: str) -> tuple[str, str, str]:
    """(partition, region, account) of an IoT certificate ARN."""
    parts = certificate_arn.split(":")
    if len(parts) < 6 or parts[0] != "arn" or parts[2] != "iot":
        raise ValueError(f"not an IoT certificate ARN: {certificate_arn}")
    return parts[1], parts[3], parts[4]


def default_policy_document(certificate_arn: str, topic_prefix: str = DEFAULT_TOPIC_PREFIX) -> str:
    """Least privilege for one device: connect as its own thing, talk under its own prefix.

    One policy serves every device: the policy variable ``iot:Connection.Thing.ThingName``
    resolves to the thing the connecting certificate is attached to.
    """
    partition, region, account = _arn_parts(certificate_arn)
    base = f"arn:{partition}:iot:{region}:{account}"
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


def _not_after_passed(value: str | None, now: datetime) -> bool:
    if not value:
        return False
    try:
        not_after = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return True  # an unreadable expiry is not a valid whitelist entry
    if not_after.tzinfo is None:
        not_after = not_after.replace(tzinfo=UTC)
    return not_after <= now


def _attr(item: dict[str, Any], name: str) -> str | None:
    value = item.get(name)
    if isinstance(value, dict) and "S" in value:
        return str(value["S"])
    return None


# --------------------------------------------------------------------------- steps


def _hold(iot: Any, certificate_id: str, status: str, base: dict[str, Any]) -> dict[str, Any]:
    """Not whitelisted: INACTIVE (reversible), never REVOKED (final; the station's call)."""
    changed: list[str] = []
    if status not in ("INACTIVE", "REVOKED"):
        iot.update_certificate(certificateId=certificate_id, newStatus="INACTIVE")
        changed.append("update-certificate:INACTIVE")
    after = "REVOKED" if status == "REVOKED" else "INACTIVE"
    result = {**base, "decision": "hold", "status": after, "changed": changed}
    _log(step="decision", **result)
    return result


def _activate(
    iot: Any,
    certificate_id: str,
    certificate_arn: str,
    status: str,
    thing_name: str,
    attributes: dict[str, str],
    base: dict[str, Any],
) -> dict[str, Any]:
    changed: list[str] = []
    policy_name = os.environ.get("POLICY_NAME") or DEFAULT_POLICY_NAME
    document = os.environ.get("POLICY_DOCUMENT") or default_policy_document(
        certificate_arn, os.environ.get("TOPIC_PREFIX") or DEFAULT_TOPIC_PREFIX
    )

    # 1. the policy (shared by every device; created once)
    try:
        iot.create_policy(policyName=policy_name, policyDocument=document)
        changed.append("create-policy")
    except ClientError as exc:
        if _error_code(exc) != "ResourceAlreadyExistsException":
            raise
    _log(step="policy", certificateId=certificate_id, policyName=policy_name)

    # 2. the policy on the certificate (AttachPolicy is idempotent)
    iot.attach_policy(policyName=policy_name, target=certificate_arn)
    _log(step="attach-policy", certificateId=certificate_id, policyName=policy_name)

    # 3. the thing, named after the device id
    try:
        iot.describe_thing(thingName=thing_name)
    except ClientError as exc:
        if _error_code(exc) != "ResourceNotFoundException":
            raise
        try:
            iot.create_thing(thingName=thing_name, attributePayload={"attributes": attributes})
            changed.append("create-thing")
        except ClientError as exc2:
            if _error_code(exc2) != "ResourceAlreadyExistsException":
                raise
    _log(step="thing", certificateId=certificate_id, thingName=thing_name)

    # 4. the certificate on the thing (AttachThingPrincipal is idempotent)
    iot.attach_thing_principal(thingName=thing_name, principal=certificate_arn)
    _log(step="attach-thing-principal", certificateId=certificate_id, thingName=thing_name)

    # 5. only now may the device connect
    if status != "ACTIVE":
        iot.update_certificate(certificateId=certificate_id, newStatus="ACTIVE")
        changed.append("update-certificate:ACTIVE")
    result = {
        **base,
        "decision": "activate",
        "status": "ACTIVE",
        "thingName": thing_name,
        "policyName": policy_name,
        "changed": changed,
    }
    _log(step="decision", **result)
    return result


# --------------------------------------------------------------------------- entry point


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Handle one JITR event; returns the decision taken."""
    certificate_id = str(event.get("certificateId", "")).lower()
    ca_certificate_id = str(event.get("caCertificateId", "")).lower()
    if not _HEX64.match(certificate_id) or not _HEX64.match(ca_certificate_id):
        result: dict[str, Any] = {"decision": "ignore", "reason": "bad-event"}
        _log(step="decision", **result)
        return result
    base: dict[str, Any] = {"certificateId": certificate_id, "caCertificateId": ca_certificate_id}

    expected_ca = (os.environ.get("CA_CERTIFICATE_ID") or "").lower()
    if expected_ca and expected_ca != ca_certificate_id:
        result = {**base, "decision": "ignore", "reason": "unexpected-ca"}
        _log(step="decision", **result)
        return result

    table = os.environ.get("WHITELIST_TABLE")
    if not table:
        _log(step="error", reason="not-configured", detail="WHITELIST_TABLE is not set", **base)
        raise RuntimeError("WHITELIST_TABLE is not set")

    iot = boto3.client("iot")
    dynamodb = boto3.client("dynamodb")

    description = iot.describe_certificate(certificateId=certificate_id)["certificateDescription"]
    certificate_arn = str(description["certificateArn"])
    status = str(description.get("status", ""))
    base["statusBefore"] = status
    if status == "REVOKED":
        # Final on AWS IoT: UpdateCertificate refuses to change a REVOKED certificate
        # (moto allows it). Nothing to decide: do not build a thing or policy for it.
        return _hold(iot, certificate_id, status, {**base, "reason": "already-revoked"})
    described_ca = description.get("caCertificateId")
    if described_ca and str(described_ca).lower() != ca_certificate_id:
        return _hold(iot, certificate_id, status, {**base, "reason": "ca-mismatch"})

    try:
        der = der_from_pem(str(description.get("certificatePem", "")))
        serial = serial_hex(serial_from_der(der))
    except CertificateParseError as exc:
        return _hold(iot, certificate_id, status, {**base, "reason": f"unparsable: {exc}"})
    base["serial"] = serial
    if hashlib.sha256(der).hexdigest() != certificate_id:
        return _hold(iot, certificate_id, status, {**base, "reason": "certificate-id-mismatch"})
    _log(step="certificate", **base)

    try:
        item = dynamodb.get_item(
            TableName=table, Key={"serial": {"S": serial}}, ConsistentRead=True
        ).get("Item")
    except ClientError as exc:
        # Never revoke because the whitelist could not be read: fail, Lambda retries.
        _log(step="error", reason="whitelist-unreadable", code=_error_code(exc), **base)
        raise
    if not item:
        return _hold(iot, certificate_id, status, {**base, "reason": "not-whitelisted"})
    fingerprint = (_attr(item, "fingerprint") or "").lower()
    if fingerprint != certificate_id:
        return _hold(iot, certificate_id, status, {**base, "reason": "fingerprint-mismatch"})
    if _not_after_passed(_attr(item, "not_after"), datetime.now(UTC)):
        return _hold(iot, certificate_id, status, {**base, "reason": "expired"})
    thing_name = _attr(item, "device_id") or ""
    if not _THING_NAME.match(thing_name):
        # A station-side data error: do not revoke a genuine device for it, leave it pending.
        result = {**base, "decision": "error", "reason": "invalid-device-id"}
        _log(step="decision", **result)
        return result

    attributes = {"serial": serial}
    batch = _attr(item, "batch")
    if batch and _ATTRIBUTE_VALUE.match(batch):
        attributes["batch"] = batch
    return _activate(
        iot,
        certificate_id,
        certificate_arn,
        status,
        thing_name,
        attributes,
        {**base, "reason": "whitelisted"},
    )
