"""The JITR Lambda handler, driven with the event AWS IoT publishes, against moto over HTTP.

moto emits no JITR events (and its Lambda needs Docker), so each test registers a
device certificate under the CA the way AWS IoT does on first connect
(RegisterCertificate, PENDING_ACTIVATION, with the CA's PEM) and calls
``lambda_handler`` with the event of ``$aws/events/certificates/registered/<caId>``.
The CA is a throwaway software CA (the HSM-backed CA is written elsewhere).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from jitr import handler
from jitr.handler import CertificateParseError, lambda_handler, serial_from_der
from station.aws_iot import register_ca
from station.publish.aws_sync import create_whitelist_table, sync_whitelist
from station.whitelist import DelistedCertificate, WhitelistEntry, serial_hex
from tests.fixtures.aws import SoftwareCa

TABLE = "jitr-whitelist"


class Line:
    """A registered CA, a whitelist table and helpers to make devices connect."""

    def __init__(self, ca: SoftwareCa, tmp_path: Path) -> None:
        self.ca = ca
        self.iot = boto3.client("iot")
        self.ddb = boto3.client("dynamodb")
        self.ca_id = register_ca(
            self.iot, ca.cert, ca.sign_csr, tmp_path / "ca.json"
        ).certificate_id
        create_whitelist_table(self.ddb, TABLE)
        self.whitelisted: list[WhitelistEntry] = []

    def device(self, device_id: str, serial: int | None = None) -> x509.Certificate:
        cert, _key = self.ca.issue_device(device_id, serial)
        return cert

    def whitelist(
        self, *certs: tuple[x509.Certificate, str], revoked: tuple[x509.Certificate, ...] = ()
    ) -> None:
        gone = {serial_hex(c.serial_number) for c in revoked}
        self.whitelisted = [e for e in self.whitelisted if e.serial not in gone]
        for cert, device_id in certs:
            self.whitelisted.append(entry_for(cert, device_id))
        delisted = [
            DelistedCertificate(
                serial_hex(c.serial_number), c.fingerprint(hashes.SHA256()).hex(), revoked=True
            )
            for c in revoked
        ]
        sync_whitelist(self.ddb, TABLE, self.whitelisted, delisted, iot=self.iot)

    def first_connect(self, cert: x509.Certificate) -> dict[str, Any]:
        """What AWS IoT does when the device first presents cert + CA: register and publish."""
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        ca_pem = self.ca.cert.public_bytes(serialization.Encoding.PEM).decode()
        registered = self.iot.register_certificate(
            certificatePem=pem, caCertificatePem=ca_pem, status="PENDING_ACTIVATION"
        )
        now_ms = int(time.time() * 1000)
        return {
            "certificateId": registered["certificateId"],
            "caCertificateId": self.ca_id,
            "timestamp": now_ms,
            "certificateStatus": "PENDING_ACTIVATION",
            "awsAccountId": "123456789012",
            "certificateRegistrationTimestamp": str(now_ms),
        }

    def status(self, event: dict[str, Any]) -> str:
        description = self.iot.describe_certificate(certificateId=event["certificateId"])
        return str(description["certificateDescription"]["status"])

    def arn(self, event: dict[str, Any]) -> str:
        description = self.iot.describe_certificate(certificateId=event["certificateId"])
        return str(description["certificateDescription"]["certificateArn"])

    def snapshot(self) -> dict[str, Any]:
        """Everything the handler could change, to compare before/after a replay."""
        things = self.iot.list_things()["things"]
        certs = self.iot.list_certificates()["certificates"]
        return {
            "things": sorted(
                (t["thingName"], t.get("version"), json.dumps(t.get("attributes"), sort_keys=True))
                for t in things
            ),
            "policies": sorted(p["policyName"] for p in self.iot.list_policies()["policies"]),
            "certs": sorted((c["certificateId"], c["status"]) for c in certs),
            "attached": sorted(
                (c["certificateArn"], p["policyName"])
                for c in certs
                for p in self.iot.list_attached_policies(target=c["certificateArn"])["policies"]
            ),
            "principals": sorted(
                (t["thingName"], p)
                for t in things
                for p in self.iot.list_thing_principals(thingName=t["thingName"])["principals"]
            ),
        }


def entry_for(cert: x509.Certificate, device_id: str, batch: str = "B1") -> WhitelistEntry:
    return WhitelistEntry(
        serial=serial_hex(cert.serial_number),
        device_id=device_id,
        batch=batch,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        not_after=cert.not_valid_after_utc,
    )


@pytest.fixture
def line(aws_env: str, aws_software_ca: SoftwareCa, tmp_path: Path, monkeypatch: Any) -> Line:
    monkeypatch.setenv("WHITELIST_TABLE", TABLE)
    for name in ("POLICY_NAME", "POLICY_DOCUMENT", "TOPIC_PREFIX", "CA_CERTIFICATE_ID"):
        monkeypatch.delenv(name, raising=False)
    return Line(aws_software_ca, tmp_path)


# --------------------------------------------------------------------------- decisions


def test_whitelisted_device_is_activated_with_thing_policy_and_principal(line: Line) -> None:
    cert = line.device("board-0001")
    line.whitelist((cert, "board-0001"))
    event = line.first_connect(cert)
    assert line.status(event) == "PENDING_ACTIVATION"

    result = lambda_handler(event, None)

    assert result["decision"] == "activate"
    assert result["thingName"] == "board-0001"
    assert result["serial"] == serial_hex(cert.serial_number)
    assert result["changed"] == ["create-policy", "create-thing", "update-certificate:ACTIVE"]
    assert line.status(event) == "ACTIVE"
    arn = line.arn(event)
    attached = line.iot.list_attached_policies(target=arn)["policies"]
    assert [p["policyName"] for p in attached] == ["station-device"]
    assert line.iot.list_thing_principals(thingName="board-0001")["principals"] == [arn]
    thing = line.iot.describe_thing(thingName="board-0001")
    assert thing["attributes"] == {"serial": serial_hex(cert.serial_number), "batch": "B1"}

    policy = json.loads(line.iot.get_policy(policyName="station-device")["policyDocument"])
    connect, pubrecv, subscribe = policy["Statement"]
    assert connect["Action"] == "iot:Connect"
    assert connect["Resource"].endswith(":client/${iot:Connection.Thing.ThingName}")
    assert ":123456789012:" in connect["Resource"] and ":us-east-1:" in connect["Resource"]
    assert pubrecv["Resource"].endswith(":topic/things/${iot:Connection.Thing.ThingName}/*")
    assert subscribe["Resource"].endswith(":topicfilter/things/${iot:Connection.Thing.ThingName}/*")
    assert "*" not in {connect["Action"], subscribe["Action"]}


def test_unknown_serial_is_held_inactive_never_revoked(line: Line) -> None:
    line.whitelist((line.device("board-0001"), "board-0001"))
    stranger = line.device("board-9999")
    event = line.first_connect(stranger)

    result = lambda_handler(event, None)

    # not (yet) whitelisted: INACTIVE, which the sync can undo; REVOKED is the ledger's call
    assert result["decision"] == "hold"
    assert result["reason"] == "not-whitelisted"
    assert line.status(event) == "INACTIVE"
    assert line.iot.list_things()["things"] == []
    assert line.iot.list_attached_policies(target=line.arn(event))["policies"] == []


@pytest.mark.parametrize("whitelisted", [True, False])
def test_replayed_event_changes_nothing(line: Line, whitelisted: bool) -> None:
    cert = line.device("board-0002")
    if whitelisted:
        line.whitelist((cert, "board-0002"))
    event = line.first_connect(cert)
    first = lambda_handler(event, None)
    before = line.snapshot()

    second = lambda_handler(dict(event), None)

    assert second["decision"] == first["decision"]
    assert second["changed"] == []
    assert line.snapshot() == before
    assert line.status(event) == ("ACTIVE" if whitelisted else "INACTIVE")


def test_device_revoked_after_activation_is_revoked_by_the_sync(line: Line) -> None:
    keep, drop = line.device("board-0003"), line.device("board-0004")
    line.whitelist((keep, "board-0003"), (drop, "board-0004"))
    keep_event, drop_event = line.first_connect(keep), line.first_connect(drop)
    assert lambda_handler(drop_event, None)["decision"] == "activate"
    assert line.status(drop_event) == "ACTIVE"

    # AWS IoT raises no new event for an ACTIVE certificate: the sync itself revokes it
    line.whitelist(revoked=(drop,))
    assert line.status(drop_event) == "REVOKED"

    result = lambda_handler(drop_event, None)  # a late replay agrees and changes nothing
    assert (result["decision"], result["changed"]) == ("hold", [])
    assert line.status(drop_event) == "REVOKED"
    assert lambda_handler(keep_event, None)["decision"] == "activate"
    assert line.status(keep_event) == "ACTIVE"


def test_revoked_certificate_stays_revoked_once_whitelisted(line: Line) -> None:
    cert = line.device("board-0005")
    event = line.first_connect(cert)
    # REVOKED by hand in the console (the Lambda itself never revokes)
    line.iot.update_certificate(certificateId=event["certificateId"], newStatus="REVOKED")
    assert lambda_handler(event, None)["decision"] == "hold"
    assert line.status(event) == "REVOKED"

    line.whitelist((cert, "board-0005"))
    before = line.snapshot()
    result = lambda_handler(event, None)

    # REVOKED is final on AWS IoT (UpdateCertificate refuses it); moto would allow
    # REVOKED -> ACTIVE, so the handler must not even try, nor build a thing for it.
    assert (result["decision"], result["reason"]) == ("hold", "already-revoked")
    assert result["changed"] == []
    assert line.status(event) == "REVOKED"
    assert line.snapshot() == before
    assert line.iot.list_things()["things"] == []


def test_fingerprint_mismatch_is_held_inactive(line: Line) -> None:
    cert = line.device("board-0006")
    entry = entry_for(cert, "board-0006")
    forged = WhitelistEntry(entry.serial, entry.device_id, entry.batch, "ab" * 32, entry.not_after)
    sync_whitelist(line.ddb, TABLE, [forged], [], iot=line.iot)
    event = line.first_connect(cert)

    result = lambda_handler(event, None)

    assert (result["decision"], result["reason"]) == ("hold", "fingerprint-mismatch")
    assert line.status(event) == "INACTIVE"


def test_expired_whitelist_entry_is_held_inactive(line: Line) -> None:
    cert = line.device("board-0007")
    entry = entry_for(cert, "board-0007")
    past = datetime.now(UTC) - timedelta(days=1)
    expired = WhitelistEntry(entry.serial, entry.device_id, entry.batch, entry.fingerprint, past)
    sync_whitelist(line.ddb, TABLE, [expired], [], iot=line.iot)
    event = line.first_connect(cert)

    assert lambda_handler(event, None)["reason"] == "expired"
    assert line.status(event) == "INACTIVE"


def test_policy_name_and_document_from_environment(line: Line, monkeypatch: Any) -> None:
    document = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}],
        }
    )
    monkeypatch.setenv("POLICY_NAME", "factory-policy")
    monkeypatch.setenv("POLICY_DOCUMENT", document)
    cert = line.device("board-0008")
    line.whitelist((cert, "board-0008"))
    event = line.first_connect(cert)

    assert lambda_handler(event, None)["policyName"] == "factory-policy"
    attached = line.iot.list_attached_policies(target=line.arn(event))["policies"]
    assert [p["policyName"] for p in attached] == ["factory-policy"]
    assert json.loads(line.iot.get_policy(policyName="factory-policy")["policyDocument"]) == (
        json.loads(document)
    )


def test_existing_policy_is_reused(line: Line) -> None:
    a, b = line.device("board-0010"), line.device("board-0011")
    line.whitelist((a, "board-0010"), (b, "board-0011"))
    assert "create-policy" in lambda_handler(line.first_connect(a), None)["changed"]
    result = lambda_handler(line.first_connect(b), None)
    assert result["changed"] == ["create-thing", "update-certificate:ACTIVE"]
    assert len(line.iot.list_policies()["policies"]) == 1


# --------------------------------------------------------------------------- robustness


def test_bad_event_and_unexpected_ca_are_ignored(line: Line, monkeypatch: Any) -> None:
    assert lambda_handler({}, None) == {"decision": "ignore", "reason": "bad-event"}
    assert lambda_handler({"certificateId": "x", "caCertificateId": "y"}, None)["decision"] == (
        "ignore"
    )
    cert = line.device("board-0012")
    line.whitelist((cert, "board-0012"))
    event = line.first_connect(cert)
    monkeypatch.setenv("CA_CERTIFICATE_ID", "f" * 64)
    assert lambda_handler(event, None)["reason"] == "unexpected-ca"
    assert line.status(event) == "PENDING_ACTIVATION"


def test_infrastructure_failure_raises_and_revokes_nothing(line: Line, monkeypatch: Any) -> None:
    cert = line.device("board-0013")
    event = line.first_connect(cert)
    monkeypatch.setenv("WHITELIST_TABLE", "no-such-table")
    with pytest.raises(Exception, match="ResourceNotFound"):
        lambda_handler(event, None)
    assert line.status(event) == "PENDING_ACTIVATION"


def test_log_lines_are_json_without_secrets(line: Line, capsys: pytest.CaptureFixture[str]) -> None:
    cert = line.device("board-0014")
    line.whitelist((cert, "board-0014"))
    capsys.readouterr()
    lambda_handler(line.first_connect(cert), None)
    lines = [json.loads(raw) for raw in capsys.readouterr().out.splitlines() if raw.strip()]
    assert lines and all(entry["component"] == "jitr" for entry in lines)
    assert lines[-1]["step"] == "decision" and lines[-1]["decision"] == "activate"
    text = json.dumps(lines)
    assert "BEGIN CERTIFICATE" not in text and "PRIVATE" not in text


# --------------------------------------------------------------------------- the DER walker

_der: Callable[[x509.Certificate], bytes] = lambda c: c.public_bytes(serialization.Encoding.DER)  # noqa: E731


@pytest.mark.parametrize(
    "serial", [1, 0x7F, 0x80, 0xFF, 0x8000, (1 << 159) - 1, (1 << 158) + 12345]
)
def test_serial_from_der_matches_cryptography(aws_software_ca: SoftwareCa, serial: int) -> None:
    cert, _ = aws_software_ca.issue_device("board", serial)
    assert serial_from_der(_der(cert)) == serial
    assert handler.serial_hex(serial_from_der(_der(cert))) == serial_hex(serial)


def test_serial_from_der_random_and_pem(aws_software_ca: SoftwareCa) -> None:
    for _ in range(20):
        cert, _ = aws_software_ca.issue_device("board")
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        assert serial_from_der(handler.der_from_pem(pem)) == cert.serial_number


def test_serial_from_der_v1_certificate_without_version_field() -> None:
    # Certificate SEQUENCE { TBSCertificate SEQUENCE { INTEGER 0x0102, ... } }
    tbs = bytes([0x30, 0x06, 0x02, 0x02, 0x01, 0x02, 0x05, 0x00])
    der = bytes([0x30, len(tbs)]) + tbs
    assert serial_from_der(der) == 0x0102


@pytest.mark.parametrize(
    "der",
    [b"", b"\x30", b"\x30\x05\x30\x03\x02\x01", b"\x04\x00", b"\x30\x02\x30\x00", b"\x30\x84\xff"],
)
def test_serial_from_der_refuses_garbage(der: bytes) -> None:
    with pytest.raises(CertificateParseError):
        serial_from_der(der)


def test_unparsable_pem_is_held_inactive(line: Line, monkeypatch: Any) -> None:
    cert = line.device("board-0015")
    event = line.first_connect(cert)

    def broken(pem: str) -> bytes:
        raise CertificateParseError("broken")

    monkeypatch.setattr(handler, "der_from_pem", broken)
    result = lambda_handler(event, None)
    assert result["decision"] == "hold"
    assert result["reason"].startswith("unparsable")
    assert line.status(event) == "INACTIVE"


# --------------------------------------------------------------------------- the template


def test_cloudformation_template_lints_clean_and_matches_the_handler() -> None:
    root = Path(__file__).resolve().parent.parent
    template = root / "deploy" / "jitr.yaml"
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    if not cfn_lint.exists():
        pytest.skip("cfn-lint is not installed")
    done = subprocess.run(
        [str(cfn_lint), str(template)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = template.read_text()
    assert "Handler: jitr.handler.lambda_handler" in text
    assert "Runtime: python3.12" in text
    assert "$aws/events/certificates/registered/${CaCertificateId}" in text
    assert "iot:*" not in text and "dynamodb:*" not in text
