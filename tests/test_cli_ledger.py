"""`station batch|sign|device|revoke|whitelist|audit` end to end, with the SoftHSM CA."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from typer.testing import CliRunner

from station.cli import ledger_cmds
from station.settings import Settings
from tests.test_ledger import TEMPLATE, make_csr


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    ledger_cmds.register(app)
    return app


@pytest.fixture
def run(app: typer.Typer, station_env: Settings):  # type: ignore[no-untyped-def]
    runner = CliRunner()

    def invoke(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result

    return invoke


def write_csr(tmp_path: Path, device_id: str, **kw: str) -> Path:
    path = tmp_path / f"{device_id}.csr"
    path.write_bytes(make_csr(device_id, **kw)[0])  # type: ignore[arg-type]
    return path


def batch_create(run, name: str = "B1", count: str = "3"):  # type: ignore[no-untyped-def]
    return run(
        "batch", "create", name, "--product", "artik530", "--count", count,
        "--key-mode", "board-ecc", "--subject-template", TEMPLATE, "--days", "365",
    )  # fmt: skip


def test_batch_lifecycle(run) -> None:  # type: ignore[no-untyped-def]
    assert "created batch B1" in batch_create(run).stdout
    assert "B1" in run("batch", "list").stdout
    shown = run("batch", "show", "B1").stdout
    assert "0 of 3" in shown and "365 days" in shown
    run("batch", "close", "B1")
    assert "closed" in run("batch", "show", "B1").stdout


def test_sign_through_a_batch_then_device_commands(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    batch_create(run)
    out = tmp_path / "dev-1.pem"
    result = run("sign", "--batch", "B1", "--device", "dev-1", "--csr",
                 str(write_csr(tmp_path, "dev-1")), "--out", str(out))  # fmt: skip
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    assert f"issued serial {cert.serial_number:x} to dev-1" in result.stderr

    shown = run("device", "show", "dev-1").stdout
    assert "issued" in shown and format(cert.serial_number, "x") in shown
    listed = run("device", "list", "--batch", "B1", "--state", "issued").stdout
    assert "dev-1" in listed
    run("revoke", "dev-1", "--reason", "lost")
    assert "revoked" in run("device", "show", "dev-1").stdout
    assert "intact" in run("audit", "verify").stdout


def test_sign_without_batch_uses_the_adhoc_batch(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    csr = write_csr(tmp_path, "bench-1", org="lab")
    first = run("sign", "--csr", str(csr)).stdout
    again = run("sign", "--csr", str(csr)).stdout
    assert first == again and first.startswith("-----BEGIN CERTIFICATE-----")
    assert "adhoc" in run("batch", "list").stdout
    assert "bench-1" in run("device", "list", "--batch", "adhoc").stdout


@pytest.mark.parametrize(
    ("args", "code", "exit_code"),
    [
        (["sign", "--batch", "nope", "--device", "dev-1"], "unknown-batch", 1),
        (["sign", "--batch", "B1", "--device", "dev-2"], "device-id-mismatch", 1),
        (["device", "show", "ghost"], "unknown-device", 1),
        (["revoke", "ghost", "--reason", "x"], "unknown-device", 1),
        (["revoke", "dev-1", "--reason", "lost\nINFO forged"], "bad-text", 1),
        (
            [
                "batch",
                "create",
                "B2",
                "--product",
                "a\x1b[2Jb",
                "--count",
                "1",
                "--key-mode",
                "board-ecc",
                "--subject-template",
                TEMPLATE,
            ],
            "bad-text",
            1,
        ),
        (["batch", "show", "nope"], "unknown-batch", 1),
        (["whitelist", "export", "--batch", "nope"], "unknown-batch", 1),
        (["sign", "--batch", "B1"], "usage", 2),
    ],
)
def test_refusals_are_one_line_with_a_code(  # type: ignore[no-untyped-def]
    run, tmp_path: Path, args: list[str], code: str, exit_code: int
) -> None:
    batch_create(run)
    if args[0] == "sign":
        args = [*args, "--csr", str(write_csr(tmp_path, "dev-1"))]
    result = run(*args, code=exit_code)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"[{code}]" in lines[0]


def test_batch_create_rejects_bad_input(run) -> None:  # type: ignore[no-untyped-def]
    result = run("batch", "create", "X", "--product", "p", "--count", "1", "--key-mode",
                 "board-ecc", "--subject-template", "/O=company/CN=fixed", code=1)  # fmt: skip
    assert "[bad-template]" in result.stderr
    batch_create(run)
    result = run("batch", "create", "B1", "--product", "p", "--count", "1", "--key-mode",
                 "board-ecc", "--subject-template", TEMPLATE, code=1)  # fmt: skip
    assert "[batch-exists]" in result.stderr


def test_whitelist_export_csv_and_json(run, tmp_path: Path, station_env: Settings) -> None:  # type: ignore[no-untyped-def]
    from station.ca import open_ca
    from station.ledger import Ledger

    batch_create(run, count="10")
    batch_create(run, "B2")
    expected = {}
    with Ledger.from_settings(station_env) as led:
        ca = open_ca(station_env)
        for i, batch in enumerate(["B1", "B1", "B2", "B1"]):
            res = led.issue(batch, f"dev-{i}", make_csr(f"dev-{i}")[0], ca)
            if i != 3:
                led.mark_verified(f"dev-{i}")
                expected[f"dev-{i}"] = (res, batch)

    rows = list(csv.DictReader(io.StringIO(run("whitelist", "export").stdout)))
    assert {r["device_id"] for r in rows} == set(expected)
    for r in rows:
        res, batch = expected[r["device_id"]]
        assert r["serial"] == format(res.serial, "x") and r["batch"] == batch
        assert r["fingerprint"] == res.certificate.fingerprint(hashes.SHA256()).hex()
        assert r["not_after"] == res.certificate.not_valid_after_utc.isoformat()

    only_b1 = json.loads(run("whitelist", "export", "--batch", "B1", "--format", "json").stdout)
    assert sorted(e["device_id"] for e in only_b1) == ["dev-0", "dev-1"]
    assert json.loads(run("whitelist", "export", "--batch", "B2", "--format", "json").stdout)[0][
        "serial"
    ] == format(expected["dev-2"][0].serial, "x")

    out = tmp_path / "wl.json"
    run("whitelist", "export", "--format", "json", "--out", str(out))
    assert len(json.loads(out.read_text())) == 3
    run("whitelist", "export", "--format", "xml", code=2)


def test_audit_verify_reports_tampering(run, tmp_path: Path, station_env: Settings) -> None:  # type: ignore[no-untyped-def]
    batch_create(run)
    run("batch", "close", "B1")
    db = station_env.data_dir / "ledger.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_log SET entity = 'B9' WHERE seq = 2")
    result = run("audit", "verify", code=1)
    assert "[audit-broken] entry 2: hash-mismatch" in result.stderr


def test_audit_verify_with_a_recorded_head_notices_entries_cut_from_the_end(  # type: ignore[no-untyped-def]
    run, station_env: Settings
) -> None:
    """Removing the newest entries leaves no broken link; the head recorded earlier shows it."""
    batch_create(run)
    out = run("audit", "verify").stdout
    head = next(line for line in out.splitlines() if line.startswith("head: ")).split()[1]
    seq = int(head.split(":")[0])
    run("batch", "close", "B1")
    assert "intact" in run("audit", "verify", "--head", head).stdout  # it grew: fine
    with sqlite3.connect(station_env.data_dir / "ledger.sqlite") as conn:
        conn.execute("DELETE FROM audit_log WHERE seq >= ?", (seq,))
    assert "intact" in run("audit", "verify").stdout  # the chain alone cannot tell
    cut = run("audit", "verify", "--head", head, code=1)
    assert "[audit-truncated]" in cut.stderr and f"entry {seq}" in cut.stderr
    run("audit", "verify", "--head", "not-a-head", code=2)


def test_recover_resolves_intents_a_station_id_left_behind(  # type: ignore[no-untyped-def]
    run, station_env: Settings, ca, tmp_path: Path
) -> None:
    """A station that crashed under another id (a re-created container) never comes back to
    resolve its intent; `station recover --all-stations` does, and only intents old enough."""
    from station.ledger import Ledger

    batch_create(run)
    url = f"sqlite:///{station_env.data_dir / 'ledger.sqlite'}"
    with Ledger(url, "old-container") as gone:
        gone.after_sign = lambda cert: (_ for _ in ()).throw(SystemExit("killed"))
        with pytest.raises(SystemExit):
            gone.issue("B1", "dev-1", make_csr("dev-1")[0], ca)
    # The board is stuck: this station's start-up recovery leaves that intent alone.
    csr = write_csr(tmp_path, "dev-1")
    stuck = run("sign", "--batch", "B1", "--device", "dev-1", "--csr", str(csr), code=1)
    assert "issuance-in-progress" in stuck.stderr
    # This station's own recovery leaves the other id's intent alone,
    assert "recovered 0, failed 0" in run("recover", "--older-than", "0").stdout
    # as does --all-stations while the intent is younger than --older-than.
    assert "recovered 0, failed 0" in run("recover", "--all-stations").stdout
    out = run("recover", "--all-stations", "--older-than", "0").stdout
    assert "recovered 1, failed 0" in out
    assert "issued" in run("device", "show", "dev-1").stdout
