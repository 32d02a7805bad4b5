"""Issue 15, the ledger side: a revocation that holds on every channel (item 1) and
proof-of-possession challenges that are bounded, spent and audited (item 4).
HTTP through the real server, the serial line with the real agent on a pty."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import typer
from click.testing import Result
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select
from typer.testing import CliRunner

from firmware_hooks.host import BoardClient
from firmware_hooks.protocol import proof_message
from firmware_hooks.simboard import SimulatedBoard
from station.ca import CertificateAuthority
from station.cli import ledger_cmds
from station.ledger import Ledger
from station.ledger.schema import audit_log, challenges
from station.line import ProvisionContext
from station.line.provision import provision_board
from tests.live import live_api
from tests.test_api_helpers import TEMPLATE, Api, assert_problem, new_csr, sign

__all__ = ["live_api"]


def _issue(
    api: Api, device_id: str, role: str = "board", **extra: object
) -> ec.EllipticCurvePrivateKey:
    pem, key = new_csr(device_id)
    body = {"batch": "B1", "device_id": device_id, "csr": pem, **extra}
    r = api.post("/v1/certificates", role, json=body)
    assert r.status_code == 201, r.text
    return key


def _prove(
    api: Api, device_id: str, key: ec.EllipticCurvePrivateKey, role: str = "board"
) -> object:
    r = api.post(f"/v1/devices/{device_id}/challenge", role)
    assert r.status_code == 200, r.text
    nonce = r.json()["nonce"]
    sig = base64.b64encode(sign(key, proof_message(device_id, base64.b64decode(nonce)))).decode()
    return api.post(f"/v1/devices/{device_id}/proof", role, json={"nonce": nonce, "signature": sig})


def _audit(api: Api, action: str) -> list[dict[str, object]]:
    with Ledger.from_settings(api.settings) as ledger, ledger.engine.connect() as conn:
        rows = conn.execute(
            select(audit_log.c.entity, audit_log.c.detail)
            .where(audit_log.c.action == action)
            .order_by(audit_log.c.seq)
        ).all()
    return [{"entity": e, **json.loads(d)} for e, d in rows]


def _challenge_rows(api: Api) -> int:
    with Ledger.from_settings(api.settings) as ledger, ledger.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(challenges)).scalar_one())


# -- 1: a revoked board stays revoked -------------------------------------------------


def test_a_board_token_cannot_undo_an_admin_revocation(live_api: Api) -> None:
    api = live_api
    api.batch()
    key = _issue(api, "stolen-1")
    assert _prove(api, "stolen-1", key).status_code == 200  # type: ignore[attr-defined]
    r = api.post("/v1/devices/stolen-1/revoke", "admin", json={"reason": "stolen"})
    assert r.status_code == 200 and r.json()["state"] == "revoked"

    # A new key for the revoked id: refused, nothing recorded, not whitelisted.
    pem, new_key = new_csr("stolen-1")
    body = {"batch": "B1", "device_id": "stolen-1", "csr": pem}
    assert_problem(api.post("/v1/certificates", "board", json=body), 409, "device-revoked")
    assert_problem(api.post("/v1/devices/stolen-1/challenge", "board"), 409, "device-revoked")
    assert api.get("/v1/devices/stolen-1").json()["state"] == "revoked"
    assert api.get("/v1/whitelist").json() == []
    # An operator re-provisioning needs a reason.
    assert_problem(
        api.post("/v1/certificates", "operator", json={**body, "reprovision": True}),
        409,
        "device-revoked",
    )
    # With one, the board is back, audited with the reason.
    r = api.post(
        "/v1/certificates",
        "operator",
        json={**body, "reprovision": True, "reason": "returned, refurbished"},
    )
    assert r.status_code == 201, r.text
    assert _prove(api, "stolen-1", new_key).status_code == 200  # type: ignore[attr-defined]
    assert [e["device_id"] for e in api.get("/v1/whitelist").json()] == ["stolen-1"]
    [entry] = _audit(api, "device.reprovision")
    assert entry["entity"] == "stolen-1" and entry["reason"] == "returned, refurbished"


def test_a_revoked_board_on_the_serial_line_is_refused(
    station_settings: object, ca: CertificateAuthority
) -> None:
    ledger = Ledger.from_settings(station_settings)
    try:
        batch = ledger.create_batch(
            "S1", product="p", planned_count=4, key_mode="board-ecc", subject_template=TEMPLATE
        )
        ctx = ProvisionContext(ledger, ca, batch)
        with SimulatedBoard(baudrate=None) as board, BoardClient.open(board.port) as client:
            first = provision_board(client, client.hello(), ctx)
            assert first.result == "verified", first
            ledger.revoke(board.hardware_id, "stolen")
            again = provision_board(client, client.hello(), ctx)
            assert (again.result, again.code) == ("failed", "device-revoked"), again
            # Twice: a failure recorded on the board must not open the way either.
            again = provision_board(client, client.hello(), ctx)
            assert (again.result, again.code) == ("failed", "device-revoked"), again
            device = ledger.get_device(board.hardware_id)
            assert device.state == "revoked"
            assert [c.state for c in ledger.certificates(board.hardware_id)] == ["revoked"]
            assert list(ledger.whitelist()) == []
    finally:
        ledger.close()


# -- 4: challenges --------------------------------------------------------------------


def test_one_open_challenge_per_device_and_the_old_one_is_gone(live_api: Api) -> None:
    api = live_api
    api.batch()
    key = _issue(api, "c-1")
    nonces = [api.post("/v1/devices/c-1/challenge", "board").json()["nonce"] for _ in range(50)]
    assert _challenge_rows(api) == 1
    old = nonces[0]
    sig = base64.b64encode(sign(key, proof_message("c-1", base64.b64decode(old)))).decode()
    r = api.post("/v1/devices/c-1/proof", "board", json={"nonce": old, "signature": sig})
    assert_problem(r, 422, "no-challenge")
    sig = base64.b64encode(sign(key, proof_message("c-1", base64.b64decode(nonces[-1])))).decode()
    r = api.post("/v1/devices/c-1/proof", "board", json={"nonce": nonces[-1], "signature": sig})
    assert r.status_code == 200, r.text
    assert _challenge_rows(api) == 0  # a used challenge is not kept


def test_no_challenge_for_unknown_revoked_or_verified_devices(live_api: Api) -> None:
    api = live_api
    api.batch()
    assert_problem(api.post("/v1/devices/nobody/challenge", "board"), 404, "unknown-device")
    key = _issue(api, "c-2")
    assert _prove(api, "c-2", key).status_code == 200  # type: ignore[attr-defined]
    assert_problem(api.post("/v1/devices/c-2/challenge", "board"), 409, "already-verified")
    api.post("/v1/devices/c-2/revoke", "admin", json={"reason": "test"})
    assert_problem(api.post("/v1/devices/c-2/challenge", "board"), 409, "device-revoked")
    assert _challenge_rows(api) == 0


def test_no_challenge_for_a_device_without_certificate(station_settings: object) -> None:
    with Ledger.from_settings(station_settings) as ledger:
        ledger.create_batch(
            "E", product="p", planned_count=4, key_mode="board-ecc", subject_template=TEMPLATE
        )
        ledger.register_device("E", "e-1")
        ledger.register_device("E", "e-2")
        # A device with no certificate has nothing to prove.
        ledger.mark_key_ready("e-1")
        from station.errors import ConflictError

        try:
            ledger.create_challenge("e-1")
        except ConflictError as exc:
            assert exc.code == "no-certificate"
        else:
            raise AssertionError("a challenge for a board without a certificate")


def test_a_nonce_is_spent_by_any_answer_and_every_refusal_is_audited(live_api: Api) -> None:
    api = live_api
    api.batch()
    key = _issue(api, "c-3")
    nonce = api.post("/v1/devices/c-3/challenge", "board").json()["nonce"]
    with Ledger.from_settings(api.settings) as ledger:
        ledger.mark_failed("c-3", "test", "left the line")
    sig = base64.b64encode(sign(key, proof_message("c-3", base64.b64decode(nonce)))).decode()
    answer = {"nonce": nonce, "signature": sig}
    assert_problem(api.post("/v1/devices/c-3/proof", "board", json=answer), 409, "bad-state")
    assert_problem(api.post("/v1/devices/c-3/proof", "board", json=answer), 422, "no-challenge")
    refused = [e["code"] for e in _audit(api, "proof.refused")]
    assert refused == ["bad-state", "no-challenge"], refused
    assert_problem(api.post("/v1/devices/ghost/proof", "board", json=answer), 404, "unknown-device")
    assert [e["code"] for e in _audit(api, "proof.refused")][-1] == "unknown-device"


def test_expired_and_used_challenges_are_purged(
    station_settings: object, ca: CertificateAuthority
) -> None:
    with Ledger.from_settings(station_settings) as ledger:
        ledger.create_batch(
            "P", product="p", planned_count=4, key_mode="board-ecc", subject_template=TEMPLATE
        )
        for device_id in ("p-1", "p-2"):
            pem, _ = new_csr(device_id)
            ledger.issue("P", device_id, pem.encode(), ca)
        ledger.create_challenge("p-1", ttl=timedelta(seconds=-1))  # already expired
        with ledger.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(challenges)).scalar_one() == 1
        ledger.create_challenge("p-2")
        with ledger.engine.connect() as conn:
            rows = conn.execute(select(challenges.c.device_pk)).all()
        assert len(rows) == 1  # p-1's expired challenge is gone


def test_station_sign_refuses_a_revoked_board_without_a_reason(
    station_env: object, tmp_path: Path
) -> None:
    """The CLI channel: `station sign` (typer's runner, the real ledger and token)."""
    app = typer.Typer(pretty_exceptions_enable=False)
    ledger_cmds.register(app)
    runner = CliRunner()

    def sign_csr(device_id: str, *extra: str) -> Result:
        pem, _ = new_csr(device_id)
        path = tmp_path / f"{device_id}-{len(list(tmp_path.iterdir()))}.csr"
        path.write_text(pem)
        args = ["sign", "--batch", "B1", "--device", device_id, "--csr", str(path), *extra]
        return runner.invoke(app, [*args, "--out", str(tmp_path / "out.pem")])

    with Ledger.from_settings(station_env) as ledger:
        ledger.create_batch(
            "B1", product="p", planned_count=4, key_mode="board-ecc", subject_template=TEMPLATE
        )
    assert sign_csr("r-1").exit_code == 0
    assert runner.invoke(app, ["revoke", "r-1", "--reason", "stolen"]).exit_code == 0
    refused = sign_csr("r-1", "--reprovision")
    assert refused.exit_code == 1 and "error [device-revoked]" in refused.stderr, refused.stderr
    back = sign_csr("r-1", "--reprovision", "--reason", "refurbished")
    assert back.exit_code == 0, back.stderr
    with Ledger.from_settings(station_env) as ledger:
        assert ledger.get_device("r-1").state == "issued"
