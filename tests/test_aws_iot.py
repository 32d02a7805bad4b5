"""The station's AWS IoT side against a moto server over real HTTP.

No real AWS is reachable here: the `aws_env` fixture points boto3's standard chain
(AWS_ENDPOINT_URL) at moto's server. The CA is a throwaway software CA built with
`cryptography` (the HSM-backed CA is written elsewhere); what matters here is the
registration protocol, which is the same whoever holds the key.

moto never checks the verification certificate, so these tests check that the
station refuses a bad one *before* anything is sent to AWS.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import sysconfig
import zipfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from station.aws_iot import (
    AwsError,
    CaRegistration,
    VerificationCertificateError,
    ca_certificate_id,
    ca_status,
    package_lambda,
    register_ca,
    update_ca,
)
from station.ca import CertificateAuthority
from station.errors import StationError
from station.ledger import Ledger
from station.publish.aws_state import RevokedInAws
from station.publish.aws_sync import SyncReport, create_whitelist_table, sync_whitelist
from station.whitelist import DelistedCertificate, WhitelistEntry, serial_hex
from tests.fixtures.aws import SoftwareCa, make_software_ca
from tests.test_ledger import TEMPLATE, make_csr

TABLE = "station-whitelist"


class CountingIot:
    """Wraps a boto3 IoT client and records the operations called on it."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if callable(attr):

            def call(*args: Any, **kwargs: Any) -> Any:
                self.calls.append(name)
                return attr(*args, **kwargs)

            return call
        return attr


# --------------------------------------------------------------------------- CA registration


def test_register_ca_registers_activates_and_stores_state(
    aws_env: str, aws_software_ca: SoftwareCa, tmp_path: Path
) -> None:
    iot = boto3.client("iot")
    state = tmp_path / "aws" / "ca.json"
    seen: list[x509.CertificateSigningRequest] = []

    def sign(csr: x509.CertificateSigningRequest) -> x509.Certificate:
        seen.append(csr)
        return aws_software_ca.sign_csr(csr)

    reg = register_ca(iot, aws_software_ca.cert, sign, state)

    assert isinstance(reg, CaRegistration)
    assert reg.certificate_id == ca_certificate_id(aws_software_ca.cert)
    assert reg.status == "ACTIVE"
    assert reg.auto_registration == "ENABLE"
    assert reg.already_registered is False
    assert reg.certificate_arn.endswith(f"/{reg.certificate_id}")  # AWS: cacert/, moto: cert/
    # the CSR carried a fresh P-256 key and a CN from GetRegistrationCode
    (csr,) = seen
    assert csr.is_signature_valid
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)
    assert len(csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)) == 1
    stored = json.loads(state.read_text())
    assert stored["certificateId"] == reg.certificate_id
    assert stored["certificateArn"] == reg.certificate_arn
    assert stored["status"] == "ACTIVE"
    assert "PRIVATE KEY" not in state.read_text()
    # AWS (moto) agrees
    described = iot.describe_ca_certificate(certificateId=reg.certificate_id)
    assert described["certificateDescription"]["status"] == "ACTIVE"


def test_register_ca_inactive_without_auto_registration(
    aws_env: str, aws_software_ca: SoftwareCa, tmp_path: Path
) -> None:
    iot = boto3.client("iot")
    reg = register_ca(
        iot,
        aws_software_ca.cert,
        aws_software_ca.sign_csr,
        tmp_path / "ca.json",
        activate=False,
        auto_registration=False,
    )
    assert reg.status == "INACTIVE"
    assert reg.auto_registration == "DISABLE"


def test_second_register_reports_existing_registration(
    aws_env: str, aws_software_ca: SoftwareCa, tmp_path: Path
) -> None:
    iot = CountingIot(boto3.client("iot"))
    state = tmp_path / "ca.json"
    first = register_ca(iot, aws_software_ca.cert, aws_software_ca.sign_csr, state)
    iot.calls.clear()

    def must_not_sign(csr: x509.CertificateSigningRequest) -> x509.Certificate:
        raise AssertionError("an already registered CA must not be signed for again")

    second = register_ca(iot, aws_software_ca.cert, must_not_sign, state)
    assert second.already_registered is True
    assert (second.certificate_id, second.certificate_arn, second.status) == (
        first.certificate_id,
        first.certificate_arn,
        first.status,
    )
    assert second.auto_registration == "ENABLE"  # from the stored state (moto omits it)
    assert "register_ca_certificate" not in iot.calls
    assert "get_registration_code" not in iot.calls

    # also without the state file (another station, or the file was lost)
    third = register_ca(iot, aws_software_ca.cert, must_not_sign, tmp_path / "other.json")
    assert third.already_registered is True
    assert third.certificate_id == first.certificate_id


def _assert_refused_before_sending(
    iot: CountingIot, ca: SoftwareCa, sign: Any, state: Path, reason: str
) -> None:
    with pytest.raises(VerificationCertificateError) as info:
        register_ca(iot, ca.cert, sign, state)
    assert info.value.code == "verification-certificate-invalid"
    assert info.value.reason == reason
    assert "register_ca_certificate" not in iot.calls
    assert not state.exists()


def test_verification_certificate_with_wrong_cn_is_refused(
    aws_env: str, aws_software_ca: SoftwareCa, tmp_path: Path
) -> None:
    iot = CountingIot(boto3.client("iot"))

    def wrong_cn(csr: x509.CertificateSigningRequest) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-the-code")])
        return aws_software_ca.sign_csr(csr, subject=subject)

    _assert_refused_before_sending(
        iot, aws_software_ca, wrong_cn, tmp_path / "ca.json", "cn-mismatch"
    )


def test_verification_certificate_from_wrong_signer_is_refused(
    aws_env: str, aws_software_ca: SoftwareCa, tmp_path: Path
) -> None:
    iot = CountingIot(boto3.client("iot"))
    impostor = make_software_ca("Impostor CA")

    def other_ca(csr: x509.CertificateSigningRequest) -> x509.Certificate:
        return impostor.sign_csr(csr)

    _assert_refused_before_sending(
        iot, aws_software_ca, other_ca, tmp_path / "ca.json", "issuer-mismatch"
    )

    # same issuer name, wrong key: only the signature check can tell
    def forged(csr: x509.CertificateSigningRequest) -> x509.Certificate:
        return aws_software_ca.sign_csr(csr, signer=impostor.key)

    _assert_refused_before_sending(
        iot, aws_software_ca, forged, tmp_path / "ca.json", "bad-signature"
    )


def test_verification_certificate_not_valid_or_other_key_is_refused(
    aws_env: str, aws_software_ca: SoftwareCa, tmp_path: Path
) -> None:
    iot = CountingIot(boto3.client("iot"))

    def expired(csr: x509.CertificateSigningRequest) -> x509.Certificate:
        return aws_software_ca.sign_csr(csr, days=-1)

    _assert_refused_before_sending(
        iot, aws_software_ca, expired, tmp_path / "ca.json", "not-valid-now"
    )

    def other_key(csr: x509.CertificateSigningRequest) -> x509.Certificate:
        other = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(csr.subject)
            .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        )
        return aws_software_ca.sign_csr(other)

    _assert_refused_before_sending(
        iot, aws_software_ca, other_key, tmp_path / "ca.json", "key-mismatch"
    )


def test_register_refuses_a_non_ca_certificate(aws_env: str, tmp_path: Path) -> None:
    ca = make_software_ca()
    leaf, _ = ca.issue_device("dev-1")
    with pytest.raises(StationError) as info:
        register_ca(boto3.client("iot"), leaf, ca.sign_csr, tmp_path / "ca.json")
    assert info.value.code == "ca-certificate-invalid"


def test_ca_status_and_update(aws_env: str, aws_software_ca: SoftwareCa, tmp_path: Path) -> None:
    iot = boto3.client("iot")
    state = tmp_path / "ca.json"
    with pytest.raises(StationError) as info:
        ca_status(iot, state)
    assert info.value.code == "ca-not-registered"

    reg = register_ca(iot, aws_software_ca.cert, aws_software_ca.sign_csr, state)
    assert ca_status(iot, state) == reg

    updated = update_ca(iot, state, "INACTIVE", "DISABLE")
    assert updated.status == "INACTIVE"
    assert updated.auto_registration == "DISABLE"
    assert ca_status(iot, state).status == "INACTIVE"
    assert json.loads(state.read_text())["autoRegistrationStatus"] == "DISABLE"

    updated = update_ca(iot, state, "active", None)
    assert updated.status == "ACTIVE"
    assert updated.auto_registration == "DISABLE"

    with pytest.raises(StationError) as info:
        update_ca(iot, state, "PENDING", None)
    assert info.value.code == "invalid-ca-status"
    with pytest.raises(StationError) as info:
        update_ca(iot, state, None, "MAYBE")
    assert info.value.code == "invalid-auto-registration"
    with pytest.raises(StationError) as info:
        update_ca(iot, state, None, None)
    assert info.value.code == "nothing-to-update"


# --------------------------------------------------------------------------- whitelist


def _entry(serial: int, batch: str = "B1", *, device: str | None = None) -> WhitelistEntry:
    return WhitelistEntry(
        serial=serial_hex(serial),
        device_id=device or f"dev-{serial:04d}",
        batch=batch,
        fingerprint=f"{serial:064x}",
        not_after=datetime(2035, 1, 1, tzinfo=UTC),
    )


def _delisted(serial: int, *, revoked: bool = True) -> DelistedCertificate:
    return DelistedCertificate(serial_hex(serial), f"{serial:064x}", revoked)


def _table_items(ddb: Any) -> dict[str, dict[str, str]]:
    items = ddb.scan(TableName=TABLE, ConsistentRead=True)["Items"]
    return {i["serial"]["S"]: {k: v["S"] for k, v in i.items()} for i in items}


def test_create_whitelist_table_is_idempotent(aws_env: str) -> None:
    ddb = boto3.client("dynamodb")
    assert create_whitelist_table(ddb, TABLE) is True
    assert create_whitelist_table(ddb, TABLE) is False
    table = ddb.describe_table(TableName=TABLE)["Table"]
    assert table["KeySchema"] == [{"AttributeName": "serial", "KeyType": "HASH"}]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"

    ddb.create_table(
        TableName="wrong-key",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    with pytest.raises(StationError) as info:
        create_whitelist_table(ddb, "wrong-key")
    assert info.value.code == "whitelist-table-mismatch"


def test_sync_whitelist_counts_idempotency_revocation_and_batches(aws_env: str) -> None:
    ddb = boto3.client("dynamodb")
    iot = boto3.client("iot")  # knows none of these certificates: no status to change
    create_whitelist_table(ddb, TABLE)
    entries = [_entry(n, "B1") for n in range(1, 61)] + [_entry(n, "B2") for n in range(61, 71)]

    # batch filter: only B1 (60 entries: three BatchWriteItem chunks)
    assert sync_whitelist(ddb, TABLE, entries, [], iot=iot, batch="B1") == SyncReport(60, 0, 0, 0)
    items = _table_items(ddb)
    assert len(items) == 60
    assert {i["batch"] for i in items.values()} == {"B1"}
    assert items["a"] == {
        "serial": "a",
        "device_id": "dev-0010",
        "batch": "B1",
        "fingerprint": f"{10:064x}",
        "not_after": "2035-01-01T00:00:00+00:00",
    }

    # everything: B2 added, B1 unchanged; again: nothing written
    assert sync_whitelist(ddb, TABLE, entries, [], iot=iot) == SyncReport(10, 0, 60, 0)
    assert sync_whitelist(ddb, TABLE, entries, [], iot=iot) == SyncReport(0, 0, 70, 0)

    # a change is an update
    changed = [*entries[:-1], _entry(70, "B2", device="dev-replaced")]
    assert sync_whitelist(ddb, TABLE, changed, [], iot=iot) == SyncReport(0, 1, 69, 0)
    assert _table_items(ddb)[serial_hex(70)]["device_id"] == "dev-replaced"

    # revoked serials go, whatever their batch, and are not re-added
    revoked = [_delisted(3), _delisted(65), _delisted(0xFFFF)]  # ffff was never there
    assert sync_whitelist(ddb, TABLE, changed, revoked, iot=iot, batch="B1") == SyncReport(
        0, 0, 59, 2
    )
    items = _table_items(ddb)
    assert len(items) == 68
    assert serial_hex(3) not in items and serial_hex(65) not in items
    assert sync_whitelist(ddb, TABLE, changed, revoked, iot=iot) == SyncReport(0, 0, 68, 0)


def test_sync_whitelist_retries_unprocessed_items(aws_env: str) -> None:
    ddb = boto3.client("dynamodb")
    create_whitelist_table(ddb, TABLE)

    class Flaky:
        """Hands back half of each first batch as unprocessed, like a throttled table."""

        def __init__(self, client: Any) -> None:
            self.client = client
            self.writes: list[int] = []

        def batch_get_item(self, **kwargs: Any) -> Any:
            return self.client.batch_get_item(**kwargs)

        def batch_write_item(self, RequestItems: dict[str, Any]) -> Any:
            (requests,) = RequestItems.values()
            self.writes.append(len(requests))
            assert len(requests) <= 25
            if len(self.writes) % 2 == 1 and len(requests) > 1:
                half = len(requests) // 2
                self.client.batch_write_item(RequestItems={TABLE: requests[:half]})
                return {"UnprocessedItems": {TABLE: requests[half:]}}
            return self.client.batch_write_item(RequestItems=RequestItems)

    flaky = Flaky(ddb)
    entries = [_entry(n) for n in range(1, 31)]
    iot = boto3.client("iot")
    assert sync_whitelist(flaky, TABLE, entries, [], iot=iot) == SyncReport(30, 0, 0, 0)
    assert len(_table_items(ddb)) == 30
    assert flaky.writes == [25, 13, 5, 3]


def test_sync_whitelist_skips_bad_entries_and_refuses_duplicates(aws_env: str) -> None:
    ddb = boto3.client("dynamodb")
    iot = boto3.client("iot")
    create_whitelist_table(ddb, TABLE)
    bad = WhitelistEntry("0A", "dev 1", "B1", "xyz", datetime(2035, 1, 1, tzinfo=UTC))
    report = sync_whitelist(ddb, TABLE, [_entry(1), bad, _entry(2)], [], iot=iot)
    assert (report.added, report.unchanged) == (2, 0)
    (skipped,) = report.skipped
    assert (skipped.serial, skipped.device_id) == ("0A", "dev 1")
    assert "thing name" in skipped.reason and "padding" in skipped.reason
    assert set(_table_items(ddb)) == {"1", "2"}
    with pytest.raises(StationError) as info:
        sync_whitelist(ddb, TABLE, [_entry(3), _entry(3, device="other")], [], iot=iot)
    assert info.value.code == "whitelist-duplicate-serial"
    assert set(_table_items(ddb)) == {"1", "2"}


# --------------------------------------------------------------------------- Lambda zip


def test_package_lambda_is_deterministic_and_self_contained(tmp_path: Path) -> None:
    first = package_lambda(tmp_path / "a" / "jitr.zip")
    second = package_lambda(tmp_path / "b" / "jitr.zip")
    assert first.read_bytes() == second.read_bytes()

    with zipfile.ZipFile(first) as archive:
        names = archive.namelist()
        assert names == sorted(names)
        assert "jitr/handler.py" in names and "jitr/__init__.py" in names
        assert all(n.startswith("jitr/") and n.endswith(".py") for n in names)
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        # every import in the package is stdlib, boto3/botocore or jitr itself
        allowed = set(sys.stdlib_module_names) | {"boto3", "botocore", "jitr", "__future__"}
        for name in names:
            tree = ast.parse(archive.read(name))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    tops = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = {node.module.split(".")[0]}
                else:
                    continue
                assert tops <= allowed, f"{name} imports {tops - allowed}"
        archive.extractall(tmp_path / "unzipped")

    # import the unzipped handler with only the zip, the stdlib and site-packages on sys.path
    # (-S: no .pth files, so the editable install of the station is not reachable)
    site_packages = sysconfig.get_paths()["purelib"]
    probe = (
        "import sys\n"
        f"sys.path[:] = [{str(tmp_path / 'unzipped')!r}, {site_packages!r}] + "
        "[p for p in sys.path if 'site-packages' not in p and p not in ('', '.')]\n"
        "import jitr.handler as h\n"
        "assert callable(h.lambda_handler)\n"
        "assert h.__file__.startswith(sys.path[0]), h.__file__\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('station', 'hsm', 'api', 'cryptography', 'firmware_hooks'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_not_after_is_stored_in_utc(aws_env: str) -> None:
    ddb = boto3.client("dynamodb")
    create_whitelist_table(ddb, TABLE)
    tz = datetime(2030, 6, 1, 12, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    entry = WhitelistEntry("1", "dev-1", "B1", "0" * 64, tz)
    sync_whitelist(ddb, TABLE, [entry], [], iot=boto3.client("iot"))
    assert _table_items(ddb)["1"]["not_after"] == "2030-06-01T12:00:00+00:00"


# --------------------------------------------------------------------------- sync and IoT status
#
# The JITR Lambda runs only on a certificate's first connection: once ACTIVE, a
# certificate stays ACTIVE whatever the table says. The sync must stop it itself.


@pytest.fixture
def led(tmp_path: Path) -> Any:
    with Ledger(f"sqlite:///{tmp_path}/ledger.db", "st-1", backdate_seconds=60) as ledger:
        ledger.create_batch(
            "B1", product="p", planned_count=10, key_mode="board-ecc", subject_template=TEMPLATE
        )
        yield ledger


class Plant:
    """A ledger with its HSM CA, the whitelist table and AWS IoT (moto)."""

    def __init__(self, ledger: Ledger, ca: CertificateAuthority) -> None:
        self.ledger, self.ca = ledger, ca
        self.ddb, self.iot = boto3.client("dynamodb"), boto3.client("iot")
        create_whitelist_table(self.ddb, TABLE)
        self.csrs: dict[str, bytes] = {}

    def verified(self, device_id: str) -> x509.Certificate:
        csr = self.csrs.setdefault(device_id, make_csr(device_id)[0])
        result = self.ledger.issue("B1", device_id, csr, self.ca)
        self.ledger.mark_verified(device_id)
        return result.certificate

    def connected(self, cert: x509.Certificate) -> None:
        """As after the JITR Lambda activated it (AWS IoT names it by its DER's SHA-256)."""
        self.iot.register_certificate_without_ca(
            certificatePem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            status="ACTIVE",
        )

    def status(self, cert: x509.Certificate) -> str:
        certificate_id = cert.fingerprint(hashes.SHA256()).hex()
        description = self.iot.describe_certificate(certificateId=certificate_id)
        return str(description["certificateDescription"]["status"])

    def sync(self, iot: Any = None) -> SyncReport:
        return sync_whitelist(
            self.ddb,
            TABLE,
            self.ledger.whitelist(),
            self.ledger.delisted_serials(),
            iot=iot or self.iot,
            revoked=RevokedInAws(self.ledger.engine),
        )

    def items(self) -> set[str]:
        return set(_table_items(self.ddb))


@pytest.fixture
def plant(aws_env: str, led: Ledger, ca: CertificateAuthority) -> Plant:
    return Plant(led, ca)


def _serial(cert: x509.Certificate) -> str:
    return serial_hex(cert.serial_number)


def test_sync_revokes_in_aws_iot_a_certificate_revoked_after_activation(plant: Plant) -> None:
    a, b, never = plant.verified("dev-a"), plant.verified("dev-b"), plant.verified("dev-n")
    assert plant.sync() == SyncReport(3, 0, 0, 0)
    plant.connected(a)
    plant.connected(b)
    plant.ledger.revoke("dev-a", "stolen")
    plant.ledger.revoke("dev-n", "scrapped")  # never connected: nothing in AWS IoT

    report = plant.sync()

    assert (report.removed, report.revoked, report.deactivated) == (2, 1, 0)
    assert plant.status(a) == "REVOKED"
    assert plant.status(b) == "ACTIVE"
    assert plant.items() == {_serial(b)}
    # bounded: once out of the table, a certificate costs no AWS IoT call again
    counting = CountingIot(plant.iot)
    assert plant.sync(counting) == SyncReport(0, 0, 1, 0)
    assert counting.calls == []
    assert _serial(never) not in plant.items()


def test_sync_leaves_an_item_of_another_certificate_alone(plant: Plant) -> None:
    a = plant.verified("dev-a")
    plant.ledger.revoke("dev-a", "stolen")
    foreign = {**_item_of(a), "fingerprint": {"S": "ab" * 32}}  # same serial, other cert
    plant.ddb.put_item(TableName=TABLE, Item=foreign)
    assert plant.sync() == SyncReport(0, 0, 0, 0)
    assert plant.items() == {_serial(a)}


def _item_of(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "serial": {"S": _serial(cert)},
        "device_id": {"S": "elsewhere"},
        "batch": {"S": "X"},
        "fingerprint": {"S": cert.fingerprint(hashes.SHA256()).hex()},
        "not_after": {"S": "2035-01-01T00:00:00+00:00"},
    }


def test_failed_board_is_deactivated_and_reactivated_once_verified_again(plant: Plant) -> None:
    cert = plant.verified("dev-f")
    plant.sync()
    plant.connected(cert)

    plant.ledger.mark_failed("dev-f", "final-test", "burn-in failed")
    report = plant.sync()
    assert (report.removed, report.revoked, report.deactivated) == (1, 0, 1)
    assert plant.status(cert) == "INACTIVE"
    assert plant.items() == set()

    again = plant.verified("dev-f")  # re-tested: the same live certificate
    assert again == cert
    report = plant.sync()
    assert (report.added, report.reactivated) == (1, 1)
    assert plant.items() == {_serial(cert)}
    assert plant.status(cert) == "ACTIVE"


def test_bad_thing_name_is_skipped_and_the_rest_is_synced(plant: Plant) -> None:
    old = plant.verified("dev-1")
    plant.sync()
    plant.connected(old)
    plant.ledger.revoke("dev-1", "stolen")
    dotted = plant.verified("board.02")  # fine for the station, not an AWS thing name
    good = plant.verified("dev-3")

    report = plant.sync()

    (skipped,) = report.skipped
    assert (skipped.serial, skipped.device_id) == (_serial(dotted), "board.02")
    assert "thing name" in skipped.reason
    assert (report.added, report.removed, report.revoked) == (1, 1, 1)
    assert plant.items() == {_serial(good)}
    assert plant.status(old) == "REVOKED"


class FailingUpdates:
    """An IoT client whose UpdateCertificate fails from the n-th call on."""

    def __init__(self, client: Any, fail_from: int) -> None:
        self.client, self.fail_from, self.updates = client, fail_from, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def update_certificate(self, **kwargs: Any) -> Any:
        self.updates += 1
        if self.updates >= self.fail_from:
            raise ClientError(
                {"Error": {"Code": "ThrottlingException", "Message": "slow down"}},
                "UpdateCertificate",
            )
        return self.client.update_certificate(**kwargs)


def test_update_certificate_failure_keeps_the_item_for_the_next_sync(plant: Plant) -> None:
    a, b = plant.verified("dev-a"), plant.verified("dev-b")
    plant.sync()
    plant.connected(a)
    plant.connected(b)
    plant.ledger.revoke("dev-a", "stolen")
    plant.ledger.revoke("dev-b", "stolen")

    with pytest.raises(AwsError, match="ThrottlingException"):
        plant.sync(FailingUpdates(plant.iot, fail_from=2))
    first, second = sorted([a, b], key=_serial)
    assert plant.status(first) == "REVOKED"
    assert plant.status(second) == "ACTIVE"
    assert _serial(second) in plant.items()  # not deleted before its certificate is stopped

    report = plant.sync()
    assert (report.removed, report.revoked) == (2, 1)
    assert plant.items() == set()
    assert plant.status(first) == plant.status(second) == "REVOKED"


def test_reactivation_failure_is_retried_by_the_next_sync(plant: Plant) -> None:
    cert = plant.verified("dev-f")
    plant.sync()
    plant.connected(cert)
    plant.ledger.mark_failed("dev-f", "final-test", "burn-in failed")
    plant.sync()
    plant.verified("dev-f")

    with pytest.raises(AwsError):
        plant.sync(FailingUpdates(plant.iot, fail_from=1))
    assert plant.status(cert) == "INACTIVE"
    assert plant.items() == set()  # taken out again, so the next sync sees it entering

    report = plant.sync()
    assert (report.added, report.reactivated) == (1, 1)
    assert plant.status(cert) == "ACTIVE"
