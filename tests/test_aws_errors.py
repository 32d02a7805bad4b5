"""AWS failures are one line with a reason code, never a traceback.

The real `station` command in a subprocess, with boto3's real configuration chain:
no region, no credentials, an endpoint nobody listens on, and a moto server of its
own that enforces IAM (an identity without rights gets AccessDenied). moto never
throttles, so throttling is checked on the translation of AWS's own error answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from station.aws_iot import AwsError, aws_error
from station.ca import CertificateAuthority
from station.errors import Kind
from station.ledger import Ledger
from station.line.broker import free_port
from station.settings import Settings
from tests.test_ledger import TEMPLATE, make_csr

STATION = str(Path(sys.executable).parent / "station")


def _aws_free_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        {
            "STATION_DATA_DIR": str(settings.data_dir),
            "STATION_CA_KEY_URI": settings.ca_key_uri or "",
            "STATION_STATION_ID": settings.station_id,
            "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance role to look for here
        }
    )
    return env


def station(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STATION, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def one_line(done: subprocess.CompletedProcess[str], code: str) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error [{code}] "), lines[0]
    return lines[0]


@pytest.fixture
def env(station_env: Settings, tmp_path: Path) -> dict[str, str]:
    return _aws_free_env(station_env, tmp_path)


def test_no_region(env: dict[str, str]) -> None:
    env.update(AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="x")
    done = station(env, "aws", "create-whitelist-table")
    line = one_line(done, "aws-no-region")
    assert "AWS_DEFAULT_REGION" in line
    assert done.returncode == 3


def test_aws_region_alone_is_enough(env: dict[str, str], moto_server: str) -> None:
    """docs/aws.md once said `export AWS_REGION`, which boto3 here ignores."""
    env.update(
        AWS_REGION="eu-west-1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_ENDPOINT_URL=moto_server,
        STATION_WHITELIST_TABLE="region-test",
    )
    done = station(env, "aws", "create-whitelist-table")
    assert done.returncode == 0, done.stderr
    tables = boto3.client(
        "dynamodb",
        region_name="eu-west-1",
        endpoint_url=moto_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).list_tables()["TableNames"]
    assert "region-test" in tables


def test_no_credentials(env: dict[str, str]) -> None:
    env.update(AWS_DEFAULT_REGION="us-east-1")
    done = station(env, "aws", "create-whitelist-table")
    assert "AWS_ACCESS_KEY_ID" in one_line(done, "aws-no-credentials")
    assert done.returncode == 3


def test_unreachable_endpoint(env: dict[str, str]) -> None:
    env.update(
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",  # nobody listens there
        AWS_MAX_ATTEMPTS="1",
    )
    done = station(env, "aws", "create-whitelist-table")
    assert "unreachable" in one_line(done, "aws-unreachable")
    assert done.returncode == 4  # a part the station depends on does not answer (README)


@pytest.fixture
def iam_moto(tmp_path: Path) -> Iterator[str]:
    """A moto server of its own that checks IAM: the first 2 calls go unauthenticated
    (to make a user and its keys), every later call is authorised against IAM."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/moto-api/", timeout=1):  # noqa: S310
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_access_denied(env: dict[str, str], iam_moto: str) -> None:
    iam = boto3.client(
        "iam",
        region_name="us-east-1",
        endpoint_url=iam_moto,
        aws_access_key_id="admin",
        aws_secret_access_key="admin",
    )
    iam.create_user(UserName="no-rights")
    key = iam.create_access_key(UserName="no-rights")["AccessKey"]
    env.update(
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID=key["AccessKeyId"],
        AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"],
        AWS_ENDPOINT_URL=iam_moto,
    )
    done = station(env, "aws", "create-whitelist-table")
    line = one_line(done, "aws-access-denied")
    assert "StationPolicy" in line
    assert done.returncode == 3


def test_throttling_and_other_refusals_are_translated() -> None:
    def refusal(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "BatchWriteItem")

    throttled = aws_error(refusal("ThrottlingException"), "BatchWriteItem")
    assert isinstance(throttled, AwsError)
    assert (throttled.code, throttled.kind) == ("aws-throttled", Kind.UPSTREAM)
    capacity = aws_error(refusal("ProvisionedThroughputExceededException"))
    assert capacity is not None and capacity.code == "aws-throttled"
    denied = aws_error(refusal("AccessDeniedException"))
    assert denied is not None and denied.code == "aws-access-denied"
    other = aws_error(refusal("ValidationException"))
    assert other is not None and other.code == "aws-error"
    assert aws_error(ValueError("not AWS")) is None


def test_watch_reports_each_failed_round_in_one_line_and_keeps_going(
    env: dict[str, str], station_env: Settings, ca: CertificateAuthority
) -> None:
    with Ledger.from_settings(station_env) as ledger:  # one verified board to publish
        ledger.create_batch(
            "B1", product="p", planned_count=1, key_mode="board-ecc", subject_template=TEMPLATE
        )
        ledger.issue("B1", "dev-1", make_csr("dev-1")[0], ca)
        ledger.mark_verified("dev-1")
    env.update(
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        AWS_MAX_ATTEMPTS="1",
    )
    proc = subprocess.Popen(
        [STATION, "aws", "sync-whitelist", "--watch", "--interval", "0.5"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    status_file = station_env.data_dir / "aws-sync-status.json"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            if status_file.exists():
                status = json.loads(status_file.read_text())
                if status["failures"] >= 2:
                    break
            assert time.monotonic() < deadline, "no two failed rounds"
            time.sleep(0.2)
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0  # stopped by SIGTERM, cleanly
    assert status["last_error_code"] == "aws-unreachable"
    assert status["last_success_at"] is None
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) >= 2 and all(e.startswith("error [aws-unreachable] ") for e in errors)
    assert "Traceback" not in err
