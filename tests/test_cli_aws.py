"""`station aws ...` end to end: the HSM CA registered with (moto's) AWS IoT, the ledger's
whitelist published to DynamoDB, and the JITR Lambda deciding on the station's own devices.

moto stands in for AWS because no real AWS is reachable here; it does not check the
verification certificate, so this test checks it itself (station.aws_iot does too).
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path
from typing import Any

import boto3
import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from jitr.handler import lambda_handler
from station.ca import DeviceProfile, open_ca
from station.cli import aws_cmds
from station.ledger import Ledger
from station.policy import certificate_fingerprint
from station.settings import Settings
from tests.csrs import csr_der, device_name, make_csr

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


@pytest.fixture
def cli(station_env: Settings, aws_env: str, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("STATION_WHITELIST_TABLE", "wlist")
    app = typer.Typer(pretty_exceptions_enable=False)
    aws_cmds.register(app)
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, ["aws", *args])
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result.stdout + result.stderr

    return invoke


def provision(settings: Settings, device_id: str) -> x509.Certificate:
    """A board through the ledger up to verified, as the serial line or HTTP would do it."""
    ca = open_ca(settings)
    csr, _key = make_csr(device_name(device_id))
    with Ledger.from_settings(settings) as ledger:
        result = ledger.issue("B1", device_id, csr_der(csr), ca)
        ledger.mark_installed(device_id, "00" * 32)
        ledger.mark_verified(device_id)
    return result.certificate


def first_connect(iot: Any, cert: x509.Certificate, ca_pem: bytes, ca_id: str) -> dict[str, Any]:
    registered = iot.register_certificate(
        certificatePem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        caCertificatePem=ca_pem.decode(),
        status="PENDING_ACTIVATION",
    )
    now = int(time.time() * 1000)
    return {
        "certificateId": registered["certificateId"],
        "caCertificateId": ca_id,
        "timestamp": now,
        "certificateStatus": "PENDING_ACTIVATION",
        "awsAccountId": "123456789012",
        "certificateRegistrationTimestamp": str(now),
    }


def test_register_sync_and_jitr_with_the_hsm_ca(
    cli, station_env: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out = cli("register-ca")
    assert "registered the CA" in out
    state = json.loads((station_env.data_dir / "aws-ca-registration.json").read_text())
    ca = open_ca(station_env)
    assert state["certificateId"] == ca.fingerprint
    assert "already registered" in cli("register-ca")
    assert "ACTIVE" in cli("ca-status")

    assert "created" in cli("create-whitelist-table")
    assert "exists" in cli("create-whitelist-table")
    with Ledger.from_settings(station_env) as ledger:
        ledger.create_batch(
            "B1",
            product="artik530",
            planned_count=3,
            key_mode="board-ecc",
            subject_template=TEMPLATE,
        )
    good = provision(station_env, "dev-good")
    doomed = provision(station_env, "dev-doomed")
    assert "2 added" in cli("sync-whitelist")
    assert "2 unchanged" in cli("sync-whitelist")

    ddb = boto3.client("dynamodb")
    item = ddb.get_item(TableName="wlist", Key={"serial": {"S": format(good.serial_number, "x")}})
    assert item["Item"]["fingerprint"]["S"] == certificate_fingerprint(good)
    assert item["Item"]["device_id"]["S"] == "dev-good"

    monkeypatch.setenv("WHITELIST_TABLE", "wlist")
    iot = boto3.client("iot")
    event = first_connect(iot, good, ca.chain_pem, state["certificateId"])
    assert event["certificateId"] == certificate_fingerprint(good)
    assert lambda_handler(event, None)["decision"] == "activate"
    assert (
        iot.describe_certificate(certificateId=event["certificateId"])["certificateDescription"][
            "status"
        ]
        == "ACTIVE"
    )
    assert iot.describe_thing(thingName="dev-good")["thingName"] == "dev-good"

    with Ledger.from_settings(station_env) as ledger:
        ledger.revoke("dev-doomed", "returned by QA")
    assert "1 removed" in cli("sync-whitelist")
    event = first_connect(iot, doomed, ca.chain_pem, state["certificateId"])
    assert lambda_handler(event, None)["decision"] == "hold"  # INACTIVE; the sync revokes it

    stranger_csr, _ = make_csr(device_name("stranger"))
    stranger = ca.issue(
        stranger_csr, subject=stranger_csr.subject, serial=12345, profile=DeviceProfile()
    )
    event = first_connect(iot, stranger, ca.chain_pem, state["certificateId"])
    assert lambda_handler(event, None)["decision"] == "hold"

    # revoked after activation: no JITR event any more, the sync revokes it in AWS IoT
    with Ledger.from_settings(station_env) as ledger:
        ledger.revoke("dev-good", "stolen")
    out = cli("sync-whitelist")
    assert "1 removed" in out and "1 revoked" in out
    # dev-doomed, revoked before it ever connected, was held INACTIVE by the Lambda: a
    # sync looks at a revoked certificate AWS IoT did not know again after an hour
    doomed_id = certificate_fingerprint(doomed)
    status = iot.describe_certificate(certificateId=doomed_id)["certificateDescription"]["status"]
    assert status == "INACTIVE"
    good_id = certificate_fingerprint(good)
    status = iot.describe_certificate(certificateId=good_id)["certificateDescription"]["status"]
    assert status == "REVOKED"

    assert "INACTIVE" in cli("update-ca", "--status", "INACTIVE")

    zpath = tmp_path / "jitr.zip"
    assert "wrote" in cli("package-lambda", "--out", str(zpath))
    assert "jitr/handler.py" in zipfile.ZipFile(zpath).namelist()


def test_sync_whitelist_reports_what_it_cannot_publish(cli, station_env: Settings) -> None:
    cli("create-whitelist-table")
    with Ledger.from_settings(station_env) as ledger:
        ledger.create_batch(
            "B1", product="p", planned_count=3, key_mode="board-ecc", subject_template=TEMPLATE
        )
    dotted = provision(station_env, "board.02")  # a valid device id, not a valid thing name
    ok = provision(station_env, "dev-ok")

    out = cli("sync-whitelist", code=1)

    assert "1 added" in out and "1 skipped" in out
    assert "board.02" in out and format(dotted.serial_number, "x") in out
    assert "Traceback" not in out
    items = boto3.client("dynamodb").scan(TableName="wlist")["Items"]
    assert [i["serial"]["S"] for i in items] == [format(ok.serial_number, "x")]


def test_aws_errors_are_one_line(cli) -> None:
    out = cli("ca-status", code=3)
    assert "[ca-not-registered]" in out and "Traceback" not in out
    out = cli("update-ca", "--status", "SIDEWAYS", code=1)
    assert "Traceback" not in out
