"""Hostile CSRs through the HTTP API and through `station sign`: refused, nothing issued.

The corpus is ``tests/vectors/csr/`` (made by its ``make_corpus.py``, each file's
expected reason code in ``expected.json``); hypothesis adds bit flips,
truncations and splices of valid DER. Every input goes through
``POST /v1/certificates`` (JSON, raw PEM, raw DER) and through the CLI's
``station sign`` (with a batch, and ad hoc); each must be refused with a 4xx
and a reason code (CLI: one line, exit 1, no traceback), and the ledger's
tables (audit log included) must be byte-for-byte what they were before.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from api.app import create_app
from api.problems import http_status
from station import policy
from station.cli import ledger_cmds
from station.errors import StationError
from station.ledger import Ledger
from station.settings import Settings
from tests.csrs import csr_der, csr_pem, device_name, make_csr

VECTORS = Path(__file__).resolve().parent / "vectors" / "csr"
EXPECTED: dict[str, str] = json.loads((VECTORS / "expected.json").read_text())
TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
DEVICE = "hostile-1"
BATCH = "H1"
CODE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")

# ------------------------------------------------------------------ the ledger's state


def ledger_dump(settings: Settings) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table of the SQLite ledger (audit log included), sorted; but a
    token's last use, which a refused request of a valid token records too."""
    path = settings.resolved_database_url().removeprefix("sqlite:///")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not r[0].startswith("sqlite_")
        ]
        assert {"audit_log", "certificates", "devices", "batches"} <= set(tables)
        dump = {
            t: sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr)  # noqa: S608
            for t in sorted(tables)
        }
        dump["api_tokens"] = sorted(
            conn.execute("SELECT id, name, role, token_sha256, created_at, revoked_at, expires_at "
                         "FROM api_tokens").fetchall(),
            key=repr,
        )  # fmt: skip
        return dump
    finally:
        conn.close()


def prepare_ledger(settings: Settings) -> None:
    """The batch the hostile CSRs aim at, and the ad hoc batch (so `sign` without a batch
    does not create it: that creation is a ledger change of its own)."""
    with Ledger.from_settings(settings) as led:
        led.create_batch(
            BATCH,
            product="artik530",
            planned_count=1000,
            key_mode="board-ecc",
            subject_template=TEMPLATE,
            days=365,
        )
        led.ensure_adhoc_batch(days=365)


# ------------------------------------------------------------------ the two paths


class Paths:
    """The API (in-process ASGI) and the CLI (in-process typer) on one ledger."""

    def __init__(self, client: TestClient, token: str, settings: Settings, tmp: Path) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}
        self.settings = settings
        self.tmp = tmp
        app = typer.Typer(pretty_exceptions_enable=False)
        ledger_cmds.register(app)
        self.cli = app
        self.runner = CliRunner()

    def api_requests(self, data: bytes) -> Iterator[tuple[str, httpx.Response]]:
        url = "/v1/certificates"
        params = {"batch": BATCH, "device_id": DEVICE}
        text = data.decode("utf-8", "surrogateescape")
        body = json.dumps({"batch": BATCH, "device_id": DEVICE, "csr": text})
        json_headers = {**self.headers, "Content-Type": "application/json"}
        yield "json", self.client.post(url, content=body.encode(), headers=json_headers)
        for ctype in ("application/x-pem-file", "application/pkcs10"):
            headers = {**self.headers, "Content-Type": ctype}
            yield ctype, self.client.post(url, params=params, content=data, headers=headers)

    def cli_runs(self, data: bytes) -> Iterator[tuple[str, list[str]]]:
        path = self.tmp / "hostile.csr"
        path.write_bytes(data)
        out = self.tmp / "out.pem"
        yield "batch", ["sign", "--batch", BATCH, "--device", DEVICE, "--csr", str(path)]
        yield "adhoc", ["sign", "--csr", str(path), "--out", str(out)]

    def run_cli(self, args: list[str]) -> tuple[int, str, BaseException | None]:
        result = self.runner.invoke(self.cli, args)
        return result.exit_code, result.stderr + result.stdout, result.exception


def assert_api_refused(how: str, r: httpx.Response, code: str | None) -> str:
    assert 400 <= r.status_code < 500, (how, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json"), (how, r.headers)
    body = r.json()
    assert body["status"] == r.status_code
    assert body["code"] and set(body["code"]) <= CODE_CHARS, (how, body)
    if code is not None:
        assert body["code"] == code, (how, body)
    got: str = body["code"]
    return got


def assert_cli_refused(
    how: str, result: tuple[int, str, BaseException | None], code: str | None
) -> str:
    exit_code, output, exc = result
    assert isinstance(exc, SystemExit) and exit_code == 1, (how, exit_code, output, exc)
    assert "Traceback" not in output, (how, output)
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error ["), (how, output)
    got = lines[0].split("[", 1)[1].split("]", 1)[0]
    assert got and set(got) <= CODE_CHARS, (how, output)
    if code is not None:
        assert got == code, (how, output)
    return got


@pytest.fixture
def paths(station_env: Settings, tmp_path: Path) -> Iterator[Paths]:
    prepare_ledger(station_env)
    app = create_app(station_env)
    with TestClient(app, raise_server_exceptions=False) as client:
        token = app.state.station.ledger.create_token("fuzzer", "admin")
        yield Paths(client, token, station_env, tmp_path)


# ------------------------------------------------------------------ the corpus


def test_the_corpus_is_what_make_corpus_writes() -> None:
    files = {p.name for p in VECTORS.iterdir() if p.name not in {"make_corpus.py", "expected.json"}}
    assert files == set(EXPECTED)
    assert len(EXPECTED) >= 40


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_policy_refuses_each_corpus_csr_with_its_code(name: str) -> None:
    """The rule itself, file by file (the two paths below add the transport)."""
    data = (VECTORS / name).read_bytes()
    with pytest.raises(StationError) as refused:
        csr = policy.load_csr(data)
        policy.check_csr(csr)
        policy.check_subject(csr, policy.subject_from_template(TEMPLATE, DEVICE))
    assert refused.value.code == EXPECTED[name]
    assert 400 <= http_status(refused.value) < 500


# One API request is not needed per file for the ad hoc path's expected code: without a
# batch the subject is taken as presented, so subject-mismatch cannot happen there.
ADHOC_ACCEPTS_SUBJECT = {"subject-mismatch.pem"}


def test_every_corpus_csr_is_refused_by_api_and_cli(paths: Paths) -> None:
    before = ledger_dump(paths.settings)
    seen: dict[str, set[str]] = {}
    for name, code in sorted(EXPECTED.items()):
        data = (VECTORS / name).read_bytes()
        for how, r in paths.api_requests(data):
            # JSON carries text: bytes that are not UTF-8 cannot be the same CSR there,
            # and an empty "csr" is refused by the schema (invalid-request).
            exact = how != "json" or (_is_utf8(data) and data != b"")
            got = assert_api_refused(f"{name} via {how}", r, code if exact else None)
            seen.setdefault(name, set()).add(got)
        for how, args in paths.cli_runs(data):
            if how == "adhoc" and name in ADHOC_ACCEPTS_SUBJECT:
                continue
            expected_code = code if how == "batch" else None
            got = assert_cli_refused(f"{name} via cli {how}", paths.run_cli(args), expected_code)
            seen[name].add(got)
        assert ledger_dump(paths.settings) == before, f"{name} changed the ledger"
    assert not (paths.tmp / "out.pem").exists()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_the_real_station_sign_prints_one_line(station_env: Settings, tmp_path: Path) -> None:
    """The installed entry point (not CliRunner): a hostile CSR gives one line, exit 1."""
    prepare_ledger(station_env)
    before = ledger_dump(station_env)
    for name in ("bad-utf8-cn.der", "pem-garbage-after.pem", "wrong-signature.der"):
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "station"),
                "sign",
                "--batch",
                BATCH,
                "--device",
                DEVICE,
                "--csr",
                str(VECTORS / name),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1, (name, done.stderr)
        assert done.stdout == "" and "Traceback" not in done.stderr, (name, done.stderr)
        assert done.stderr.strip() == done.stderr.strip().splitlines()[0]
        assert done.stderr.startswith(f"error [{EXPECTED[name]}]"), (name, done.stderr)
    assert ledger_dump(station_env) == before


# ------------------------------------------------------------------ mutations


def _valid_ders() -> list[bytes]:
    keys: list[object] = [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(65537, 2048),
    ]
    return [csr_der(make_csr(device_name(DEVICE), k, hash_alg=hashes.SHA256())[0]) for k in keys]


VALID = _valid_ders()


@st.composite
def mutated_der(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from(VALID))
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "flips", "insert"]))
    data = bytearray(base)
    if kind == "flip":
        i = draw(st.integers(0, len(data) * 8 - 1))
        data[i // 8] ^= 1 << (i % 8)
    elif kind == "flips":
        for i in draw(st.lists(st.integers(0, len(data) * 8 - 1), min_size=2, max_size=16)):
            data[i // 8] ^= 1 << (i % 8)
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "splice":
        other = draw(st.sampled_from(VALID))
        data = data[: draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))) :]
    else:
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _as_pem(der: bytes) -> bytes:
    import base64
    import textwrap

    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return (
        f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n".encode()
    )


def test_the_valid_bases_are_accepted(paths: Paths) -> None:
    """The mutations start from CSRs the station would sign (checked on a scratch device)."""
    for i, der in enumerate(VALID):
        r = paths.client.post(
            "/v1/certificates",
            params={"batch": BATCH, "device_id": f"base-{i}"},
            content=der,
            headers={**paths.headers, "Content-Type": "application/pkcs10"},
        )
        assert r.status_code == 422 and r.json()["code"] == "device-id-mismatch", r.text


@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=mutated_der(), as_pem=st.booleans())
def test_mutated_der_is_refused_by_the_api(paths: Paths, data: bytes, as_pem: bool) -> None:
    if data in VALID:
        return  # a splice can rebuild the original
    before = ledger_dump(paths.settings)
    payload = _as_pem(data) if as_pem else data
    for how, r in paths.api_requests(payload):
        assert_api_refused(how, r, None)
    assert ledger_dump(paths.settings) == before


@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=mutated_der())
def test_mutated_der_is_refused_by_the_cli(paths: Paths, data: bytes) -> None:
    if data in VALID:
        return
    before = ledger_dump(paths.settings)
    for how, args in paths.cli_runs(data):
        assert_cli_refused(how, paths.run_cli(args), None)
    assert ledger_dump(paths.settings) == before


def test_a_good_csr_still_works_after_the_hostile_ones(paths: Paths) -> None:
    """The refusals leave nothing behind that blocks the next board."""
    for name in sorted(EXPECTED):
        for _how, r in paths.api_requests((VECTORS / name).read_bytes()):
            assert 400 <= r.status_code < 500
    key = ec.generate_private_key(ec.SECP256R1())
    good = csr_pem(make_csr(device_name(DEVICE), key)[0])
    r = paths.client.post(
        "/v1/certificates",
        json={"batch": BATCH, "device_id": DEVICE, "csr": good.decode()},
        headers=paths.headers,
    )
    assert r.status_code == 201, r.text


def test_adhoc_sign_of_a_refused_csr_leaves_the_ledger_unchanged(
    station_env: Settings, tmp_path: Path
) -> None:
    """On a ledger without the adhoc batch, a CSR with a bad signature is refused
    (bad-signature) before the adhoc batch (and its audit row) is created."""
    with Ledger.from_settings(station_env) as led:
        led.list_batches()  # creates the schema
    before = ledger_dump(station_env)
    app = typer.Typer(pretty_exceptions_enable=False)
    ledger_cmds.register(app)
    result = CliRunner().invoke(app, ["sign", "--csr", str(VECTORS / "wrong-signature.der")])
    assert result.exit_code == 1 and "[bad-signature]" in result.stderr
    assert ledger_dump(station_env) == before
