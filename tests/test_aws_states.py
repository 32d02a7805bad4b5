"""A board's AWS IoT state follows the ledger, whatever the order of events.

End to end against the moto server: the station's HSM CA registered, its ledger,
the whitelist sync and the JITR Lambda (called with the event AWS IoT publishes on
a certificate's first connection). Three ways a state ended wrong, one test each:

- a failed board (synced to INACTIVE, its item deleted) later revoked stayed INACTIVE;
- replaying the registration event of a failed board revoked it for good;
- a board that connected before its batch was synced was REVOKED for good.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from jitr.handler import lambda_handler
from station.aws_iot import register_ca
from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.publish.aws_state import RevokedInAws
from station.publish.aws_sync import SyncReport, create_whitelist_table, sync_whitelist
from station.settings import Settings
from tests.test_aws_iot import CountingIot
from tests.test_ledger import TEMPLATE, make_csr

TABLE = "states-whitelist"


class Flow:
    """The station (ledger, HSM CA), AWS IoT with the CA registered, the table, the Lambda."""

    def __init__(self, ledger: Ledger, ca: CertificateAuthority, tmp_path: Path) -> None:
        self.ledger, self.ca = ledger, ca
        self.iot, self.ddb = boto3.client("iot"), boto3.client("dynamodb")
        self.ca_id = register_ca(
            self.iot, ca.certificate, ca.issue_verification_certificate, tmp_path / "aws.json"
        ).certificate_id
        create_whitelist_table(self.ddb, TABLE)
        ledger.create_batch(
            "B1", product="p", planned_count=20, key_mode="board-ecc", subject_template=TEMPLATE
        )
        self.csrs: dict[str, bytes] = {}

    def issued(self, device_id: str) -> x509.Certificate:
        """Issued (again, for a re-tested board: the same CSR gets the same certificate)."""
        csr = self.csrs.setdefault(device_id, make_csr(device_id)[0])
        return self.ledger.issue("B1", device_id, csr, self.ca).certificate

    def verified(self, device_id: str) -> x509.Certificate:
        cert = self.issued(device_id)
        self.ledger.mark_verified(device_id)
        return cert

    def sync(self, iot: Any = None) -> SyncReport:
        return sync_whitelist(
            self.ddb,
            TABLE,
            self.ledger.whitelist(),
            self.ledger.delisted_serials(),
            iot=iot or self.iot,
            revoked=RevokedInAws(self.ledger.engine),
        )

    def connect(self, cert: x509.Certificate) -> dict[str, Any]:
        """A board's first connection: AWS IoT registers its certificate, the Lambda runs."""
        registered = self.iot.register_certificate(
            certificatePem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            caCertificatePem=self.ca.chain_pem.decode(),
            status="PENDING_ACTIVATION",
        )
        now = int(time.time() * 1000)
        event = {
            "certificateId": registered["certificateId"],
            "caCertificateId": self.ca_id,
            "timestamp": now,
            "certificateStatus": "PENDING_ACTIVATION",
            "awsAccountId": "123456789012",
            "certificateRegistrationTimestamp": str(now),
        }
        lambda_handler(event, None)
        return event

    def status(self, cert: x509.Certificate) -> str:
        certificate_id = cert.fingerprint(hashes.SHA256()).hex()
        description = self.iot.describe_certificate(certificateId=certificate_id)
        return str(description["certificateDescription"]["status"])

    def thing_of(self, cert: x509.Certificate) -> list[str]:
        arn = self.iot.describe_certificate(certificateId=cert.fingerprint(hashes.SHA256()).hex())[
            "certificateDescription"
        ]["certificateArn"]
        return [t for t in self.iot.list_principal_things(principal=arn)["things"]]

    def policies_of(self, cert: x509.Certificate) -> list[str]:
        arn = self.iot.describe_certificate(certificateId=cert.fingerprint(hashes.SHA256()).hex())[
            "certificateDescription"
        ]["certificateArn"]
        return [p["policyName"] for p in self.iot.list_attached_policies(target=arn)["policies"]]


@pytest.fixture
def flow(
    aws_env: str,
    station_settings: Settings,
    ca: CertificateAuthority,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Flow]:
    monkeypatch.setenv("WHITELIST_TABLE", TABLE)
    for name in ("POLICY_NAME", "POLICY_DOCUMENT", "TOPIC_PREFIX", "CA_CERTIFICATE_ID"):
        monkeypatch.delenv(name, raising=False)
    with Ledger.from_settings(station_settings) as ledger:
        yield Flow(ledger, ca, tmp_path)


def test_a_failed_board_later_revoked_ends_revoked(flow: Flow) -> None:
    cert = flow.verified("dev-f")
    flow.sync()
    flow.connect(cert)
    assert flow.status(cert) == "ACTIVE"
    flow.ledger.mark_failed("dev-f", "final-test", "burn-in failed")
    flow.sync()
    assert flow.status(cert) == "INACTIVE"  # reversible: the board may pass a re-test

    flow.ledger.revoke("dev-f", "scrapped")
    report = flow.sync()

    assert flow.status(cert) == "REVOKED"
    assert report.revoked == 1
    (change,) = report.changes
    assert (change.before, change.after, change.why) == ("INACTIVE", "REVOKED", "revoked-in-ledger")
    # bounded: a certificate known REVOKED costs no AWS IoT call again
    counting = CountingIot(flow.iot)
    flow.sync(counting)
    assert counting.calls == []


def test_replaying_a_failed_boards_registration_event_leaves_it_inactive(flow: Flow) -> None:
    cert = flow.verified("dev-r")
    flow.sync()
    event = flow.connect(cert)
    flow.ledger.mark_failed("dev-r", "final-test", "burn-in failed")
    flow.sync()
    assert flow.status(cert) == "INACTIVE"

    replayed = lambda_handler(event, None)

    assert flow.status(cert) == "INACTIVE"  # not REVOKED: INACTIVE stays reversible
    assert replayed["decision"] == "hold" and replayed["changed"] == []
    # and it is reversible: verified again, the next sync switches it back on
    assert flow.verified("dev-r") == cert
    report = flow.sync()
    assert flow.status(cert) == "ACTIVE" and report.reactivated == 1


def test_a_board_that_connects_before_its_batch_is_synced_is_activated_by_the_sync(
    flow: Flow,
) -> None:
    cert = flow.verified("dev-early")  # verified, but no sync yet
    decision = flow.connect(cert)

    assert flow.status(cert) == "INACTIVE"  # not REVOKED: it may just be early
    assert lambda_handler(decision, None)["reason"] == "not-whitelisted"

    report = flow.sync()

    assert flow.status(cert) == "ACTIVE"
    assert flow.thing_of(cert) == ["dev-early"]  # activated as the Lambda would have
    assert flow.policies_of(cert) == ["station-device"]
    (change,) = report.changes
    assert (change.serial, change.before, change.after, change.why) == (
        format(cert.serial_number, "x"),
        "INACTIVE",
        "ACTIVE",
        "whitelisted",
    )
    assert (report.added, report.reactivated, report.warnings) == (1, 1, ())


def test_a_whitelisted_board_found_revoked_in_aws_is_reported(flow: Flow) -> None:
    cert = flow.verified("dev-lost")
    flow.connect(cert)
    # REVOKED by hand in the console (or by an older Lambda): final in AWS IoT
    flow.iot.update_certificate(
        certificateId=cert.fingerprint(hashes.SHA256()).hex(), newStatus="REVOKED"
    )

    report = flow.sync()

    (warning,) = report.warnings
    assert warning.code == "aws-certificate-revoked"
    assert "provisioned again" in warning.message
    assert report.changes == ()
    assert flow.status(cert) == "REVOKED"


def test_only_what_the_ledger_revoked_is_set_revoked(flow: Flow) -> None:
    early, failed, revoked = flow.issued("dev-1"), flow.verified("dev-2"), flow.verified("dev-3")
    flow.sync()
    for cert in (early, failed, revoked):
        flow.connect(cert)
    flow.ledger.mark_failed("dev-2", "final-test", "burn-in failed")
    flow.ledger.revoke("dev-3", "stolen")

    report = flow.sync()

    assert flow.status(early) == "INACTIVE"  # issued, never verified: held, not revoked
    assert flow.status(failed) == "INACTIVE"
    assert flow.status(revoked) == "REVOKED"
    assert sorted((c.after, c.why) for c in report.changes) == [
        ("INACTIVE", "left-whitelist"),
        ("REVOKED", "revoked-in-ledger"),
    ]


def test_a_revoked_board_that_connects_later_is_revoked_at_the_next_recheck(flow: Flow) -> None:
    cert = flow.verified("dev-late")
    flow.ledger.revoke("dev-late", "stolen")
    flow.sync()  # AWS IoT does not know it yet: nothing to do, looked at again later
    flow.connect(cert)
    assert flow.status(cert) == "INACTIVE"  # the Lambda holds it: not whitelisted
    flow.sync()
    assert flow.status(cert) == "INACTIVE"  # within the recheck interval: no call

    report = sync_whitelist(
        flow.ddb,
        TABLE,
        flow.ledger.whitelist(),
        flow.ledger.delisted_serials(),
        iot=flow.iot,
        revoked=RevokedInAws(flow.ledger.engine, recheck=timedelta(0)),
    )

    assert flow.status(cert) == "REVOKED"
    assert [(c.before, c.after) for c in report.changes] == [("INACTIVE", "REVOKED")]


@pytest.mark.parametrize("prefix", ["things", "factory/line-1/"])
def test_the_sync_attaches_the_policy_document_the_lambda_makes(prefix: str) -> None:
    """The station may not import the Lambda's package: the document is written twice."""
    from jitr.handler import DEFAULT_POLICY_NAME, DEFAULT_TOPIC_PREFIX, default_policy_document
    from station.publish import aws_sync

    arn = "arn:aws-cn:iot:cn-north-1:123456789012:cert/" + "ab" * 32
    assert aws_sync.device_policy_document(arn, prefix) == default_policy_document(arn, prefix)
    assert (aws_sync.DEFAULT_POLICY_NAME, aws_sync.DEFAULT_TOPIC_PREFIX) == (
        DEFAULT_POLICY_NAME,
        DEFAULT_TOPIC_PREFIX,
    )
    with pytest.raises(ValueError, match="not an IoT certificate ARN"):
        aws_sync.device_policy_document("arn:aws:s3:::bucket")
