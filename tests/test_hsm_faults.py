"""HSM faults against real SoftHSM tokens, through the HTTP API.

Each test gets a token of its own (in the run's SoftHSM directory) and a CA key in
it, so it may break the token without disturbing others. For every fault: the
key store raises a typed error, ``/healthz`` answers 503 naming it, ``POST
/v1/certificates`` answers 503 with the HSM's reason code and leaves no intent
behind, and when the token comes back the same app issues again without a restart.

Token removal is simulated the way SoftHSM allows: its token is a directory, moved
away and back. SoftHSM 2.6.1 never locks a user PIN (test_softhsm_never_locks_a_pin
shows it), so the locked-PIN path is exercised with a token whose user PIN was never
initialised: the module answers CKR_USER_PIN_NOT_INITIALIZED, which like
CKR_PIN_LOCKED means nobody can log in as user until the security officer sets the PIN.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pkcs11
import pytest
from cryptography import x509
from fastapi.testclient import TestClient

from api.app import create_app
from hsm import Pkcs11Uri, WrongPin, reset_module
from hsm import keystore as keystore_module
from hsm.errors import KeyNotFound, PinLocked, TokenNotFound, TokenUnavailable
from hsm.softhsm import ensure_dev_token
from station.ca import init_ca, open_ca, open_keystore
from station.errors import NotFoundError, StationError
from station.ledger import Ledger
from station.settings import Settings
from tests.test_api_helpers import TEMPLATE, assert_problem, new_csr

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
BATCH = "faults"


@dataclass
class Rig:
    settings: Settings
    label: str
    pin_file: Path
    token_dir: Path
    client: TestClient
    bearer: str

    def post(self, device_id: str, csr: str) -> httpx.Response:
        return self.client.post(
            "/v1/certificates",
            headers={"Authorization": f"Bearer {self.bearer}"},
            json={"batch": BATCH, "device_id": device_id, "csr": csr},
        )

    def healthz(self) -> httpx.Response:
        return self.client.get("/healthz")

    def unplug(self, tmp: Path) -> Path:
        away = tmp / f"unplugged-{self.label}"
        shutil.move(self.token_dir, away)
        return away

    def plug(self, away: Path) -> None:
        shutil.move(away, self.token_dir)


def _token_dir(softhsm_dir: Path, label: str) -> Path:
    """SoftHSM keeps each token in a directory named by a UUID; find ours by label."""
    for d in (softhsm_dir / "tokens").iterdir():
        obj = d / "token.object"
        if obj.exists() and label.encode() in obj.read_bytes():
            return d
    raise AssertionError(f"no token directory for {label}")


def _own_ca(tmp_path: Path, softhsm_dir: Path) -> tuple[Settings, str, Path]:
    label = f"fault-{secrets.token_hex(4)}"
    _, pin_file, created = ensure_dev_token(tmp_path / "tok", label)
    assert created
    reset_module(MODULE)
    uri = Pkcs11Uri(token=label, object="ca", module_path=MODULE, pin_source=str(pin_file))
    settings = Settings(data_dir=tmp_path / "data", ca_key_uri=uri.to_string(), station_id="f")
    return settings, label, pin_file


def _ledger_setup(settings: Settings) -> str:
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            BATCH, product="p", planned_count=100, key_mode="board-ecc", subject_template=TEMPLATE
        )
        return ledger.create_token(f"board-{secrets.token_hex(3)}", "board")


@pytest.fixture
def rig(tmp_path: Path, softhsm_dir: Path) -> Iterator[Rig]:
    settings, label, pin_file = _own_ca(tmp_path, softhsm_dir)
    assert init_ca(settings).status == "created"
    bearer = _ledger_setup(settings)
    with TestClient(create_app(settings)) as client:
        yield Rig(settings, label, pin_file, _token_dir(softhsm_dir, label), client, bearer)


def assert_nothing_half_recorded(settings: Settings, device_id: str) -> None:
    """No certificate of the device is left in state intent, and recovery has nothing to do."""
    with Ledger.from_settings(settings) as ledger:
        states = (
            [c.state for c in ledger.certificates(device_id)] if _known(ledger, device_id) else []
        )
        assert "intent" not in states, states


def _known(ledger: Ledger, device_id: str) -> bool:
    try:
        ledger.get_device(device_id)
    except NotFoundError:
        return False
    return True


def assert_issues_and_verifies(rig: Rig, device_id: str, csr: str) -> None:
    r = rig.post(device_id, csr)
    assert r.status_code == 201, r.text
    chain = x509.load_pem_x509_certificates(r.json()["chain"].encode())
    ca_on_disk = x509.load_pem_x509_certificate(rig.settings.ca_cert_path.read_bytes())
    chain[0].verify_directly_issued_by(ca_on_disk)
    assert chain[1] == ca_on_disk
    with Ledger.from_settings(rig.settings) as ledger:
        assert ledger.get_device(device_id).serial == r.json()["serial"]
        report = ledger.recover(open_ca(rig.settings))
        assert not report.resigned and not report.failed


def assert_healthy(rig: Rig) -> None:
    r = rig.healthz()
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ wrong PIN


def test_wrong_pin_is_refused_once_not_retried_and_recovers(
    tmp_path: Path, softhsm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, label, pin_file = _own_ca(tmp_path, softhsm_dir)
    assert init_ca(settings).status == "created"
    bearer = _ledger_setup(settings)
    good_pin = pin_file.read_text()
    pin_file.write_text("not-the-pin")
    reset_module(MODULE)  # the station starts with no session, as after a restart
    # A spy on the one function that hands a PIN to the token (the call goes through).
    logins: list[str] = []
    real_open = keystore_module._open_with_pin

    def spy(token: Any, pin: str | None) -> Any:
        logins.append(token.label)
        return real_open(token, pin)

    monkeypatch.setattr(keystore_module, "_open_with_pin", spy)

    with pytest.raises(WrongPin) as excinfo:
        open_keystore(settings).health()
    assert "not-the-pin" not in str(excinfo.value)

    with TestClient(create_app(settings)) as client:
        rig = Rig(settings, label, pin_file, _token_dir(softhsm_dir, label), client, bearer)
        for _ in range(3):
            body = assert_problem(rig.healthz(), 503, "hsm-wrong-pin")
            assert body["part"] == "token"
        csr, _ = new_csr("dev-pin")
        assert_problem(rig.post("dev-pin", csr), 503, "hsm-wrong-pin")
        assert_nothing_half_recorded(settings, "dev-pin")
        # A real HSM locks the PIN after a few failures: the same refused PIN is
        # never offered again (health probes every few seconds would lock it).
        assert logins == [label], logins

        pin_file.write_text(good_pin)  # the operator fixes the PIN file
        assert_healthy(rig)
        assert_issues_and_verifies(rig, "dev-pin", csr)


def test_softhsm_never_locks_a_pin(tmp_path: Path, softhsm_dir: Path) -> None:
    """SoftHSM 2.6.1 answers CKR_PIN_INCORRECT forever and then accepts the right PIN."""
    _settings, label, pin_file = _own_ca(tmp_path, softhsm_dir)
    token = pkcs11.lib(MODULE).get_token(token_label=label)
    for _ in range(12):
        with pytest.raises(pkcs11.exceptions.PinIncorrect):
            token.open(user_pin="wrong-pin")
    with token.open(user_pin=pin_file.read_text()):
        pass


# ------------------------------------------------------------------ locked PIN


def test_pin_not_usable_is_pin_locked_and_recovers_when_the_so_sets_it(
    tmp_path: Path, softhsm_dir: Path, ca_home: Path
) -> None:
    label = f"nopin-{secrets.token_hex(4)}"
    so_pin = secrets.token_urlsafe(12)
    free = next(
        s
        for s in pkcs11.lib(MODULE).get_slots()
        if not s.get_token().flags & pkcs11.TokenFlag.TOKEN_INITIALIZED
    )
    # A throwaway test token: the SO PIN in argv is acceptable here (never in the station).
    # pkcs11-tool initialises the token without a user PIN (softhsm2-util always sets one).
    subprocess.run(
        ["pkcs11-tool", "--module", MODULE, "--slot", str(free.slot_id), "--init-token",
         "--label", label, "--so-pin", so_pin],
        check=True, capture_output=True,
    )  # fmt: skip
    reset_module(MODULE)
    pin_file = tmp_path / "user.pin"
    pin_file.write_text(secrets.token_urlsafe(12))
    pin_file.chmod(0o600)  # the station refuses a PIN file others may read
    uri = Pkcs11Uri(token=label, object="ca", module_path=MODULE, pin_source=str(pin_file))
    settings = Settings(data_dir=tmp_path / "data", ca_key_uri=uri.to_string(), station_id="f")
    settings.data_dir.mkdir(parents=True)
    # Some CA certificate on disk, so that opening the CA reaches the token's login.
    shutil.copy(ca_home / "ca.pem", settings.ca_cert_path)
    bearer = _ledger_setup(settings)

    with pytest.raises(PinLocked) as excinfo:
        open_keystore(settings).health()
    assert "security officer" in str(excinfo.value)

    with TestClient(create_app(settings)) as client:
        rig = Rig(settings, label, pin_file, _token_dir(softhsm_dir, label), client, bearer)
        body = assert_problem(rig.healthz(), 503, "hsm-pin-locked")
        assert body["part"] == "token"
        csr, _ = new_csr("dev-locked")
        assert_problem(rig.post("dev-locked", csr), 503, "hsm-pin-locked")
        assert_nothing_half_recorded(settings, "dev-locked")

        # The security officer sets the user PIN; the key ceremony makes the CA key.
        token = pkcs11.lib(MODULE).get_token(token_label=label)
        with token.open(rw=True, so_pin=so_pin) as so:
            so.init_pin(pin_file.read_text())
        settings.ca_cert_path.unlink()
        assert init_ca(settings).status == "created"

        assert_healthy(rig)
        assert_issues_and_verifies(rig, "dev-locked", csr)


# ------------------------------------------------------------------ token missing / removed


def test_token_missing_at_start_then_plugged_in(tmp_path: Path, softhsm_dir: Path) -> None:
    settings, label, pin_file = _own_ca(tmp_path, softhsm_dir)
    assert init_ca(settings).status == "created"
    bearer = _ledger_setup(settings)
    token_dir = _token_dir(softhsm_dir, label)
    away = tmp_path / "away"
    shutil.move(token_dir, away)
    reset_module(MODULE)  # the station (re)starts while the token is out

    with pytest.raises(TokenNotFound):
        open_keystore(settings).health()
    with TestClient(create_app(settings)) as client:
        rig = Rig(settings, label, pin_file, token_dir, client, bearer)
        body = assert_problem(rig.healthz(), 503, "hsm-token-not-found")
        assert body["part"] == "token"
        csr, _ = new_csr("dev-missing")
        assert_problem(rig.post("dev-missing", csr), 503, "hsm-token-not-found")
        assert_nothing_half_recorded(settings, "dev-missing")

        rig.plug(away)  # nobody restarts anything: the station must find it
        assert_healthy(rig)
        assert_issues_and_verifies(rig, "dev-missing", csr)


def test_token_pulled_while_running_then_plugged_back(rig: Rig, tmp_path: Path) -> None:
    """The module notices (slot list refreshed): the token is gone, then back."""
    csr0, _ = new_csr("dev-before")
    assert_issues_and_verifies(rig, "dev-before", csr0)
    away = rig.unplug(tmp_path)
    reset_module(MODULE)
    body = assert_problem(rig.healthz(), 503, "hsm-token-not-found")
    assert body["part"] == "token"
    csr, _ = new_csr("dev-pulled")
    assert_problem(rig.post("dev-pulled", csr), 503, "hsm-token-not-found")
    assert_nothing_half_recorded(rig.settings, "dev-pulled")

    rig.plug(away)
    assert_healthy(rig)
    assert_issues_and_verifies(rig, "dev-pulled", csr)


def test_token_storage_gone_under_a_live_session(rig: Rig, tmp_path: Path) -> None:
    """The module does not notice: the logged-in session breaks on the next call."""
    csr0, _ = new_csr("dev-live")
    assert_issues_and_verifies(rig, "dev-live", csr0)
    away = rig.unplug(tmp_path)
    csr, _ = new_csr("dev-broken")
    r = rig.post("dev-broken", csr)
    body = assert_problem(r, 503, r.json()["code"])
    assert body["code"] in ("hsm-token-unavailable", "hsm-token-not-found"), body
    assert body["code"] != "sign-failed"
    assert_nothing_half_recorded(rig.settings, "dev-broken")
    body = rig.healthz().json()
    assert body["status"] == 503 and body["part"] == "token", body
    with pytest.raises((TokenUnavailable, TokenNotFound)):
        open_keystore(rig.settings).health()

    rig.plug(away)
    assert_healthy(rig)
    assert_issues_and_verifies(rig, "dev-broken", csr)


def test_session_closed_under_the_key_store_is_reopened(rig: Rig) -> None:
    csr0, _ = new_csr("dev-s0")
    assert_issues_and_verifies(rig, "dev-s0", csr0)
    for session in list(keystore_module._SESSIONS.values()):
        session.close()
    assert_healthy(rig)
    csr, _ = new_csr("dev-s1")
    assert_issues_and_verifies(rig, "dev-s1", csr)


# ------------------------------------------------------------------ key deleted


def _replace_key_under_the_same_uri(settings: Settings) -> None:
    """What the token's own tools can do behind the station's back (`station init --force`
    never deletes a key: it makes the new one beside the old)."""
    open_keystore(settings).delete_key()
    assert init_ca(settings).status == "created"


def test_key_deleted_then_replaced_by_a_new_ca(rig: Rig) -> None:
    csr0, _ = new_csr("dev-k0")
    assert_issues_and_verifies(rig, "dev-k0", csr0)
    open_keystore(rig.settings).delete_key()

    with pytest.raises(KeyNotFound):
        open_keystore(rig.settings).health()
    csr, _ = new_csr("dev-k1")
    assert_problem(rig.post("dev-k1", csr), 503, "hsm-key-not-found")
    assert_nothing_half_recorded(rig.settings, "dev-k1")
    body = assert_problem(rig.healthz(), 503, "hsm-key-not-found")
    assert body["part"] == "key"

    # Recovery: a new CA key and certificate (station init), same running app.
    assert init_ca(rig.settings).status == "created"
    assert_healthy(rig)
    assert_issues_and_verifies(rig, "dev-k1", csr)


def test_key_replaced_between_requests_is_never_used_with_the_old_certificate(
    rig: Rig,
) -> None:
    """No health probe in between: the app still holds the old CA certificate."""
    csr0, _ = new_csr("dev-r0")
    assert_issues_and_verifies(rig, "dev-r0", csr0)
    _replace_key_under_the_same_uri(rig.settings)
    csr, _ = new_csr("dev-r1")
    r = rig.post("dev-r1", csr)
    if r.status_code == 201:
        # Acceptable only if it verifies under the CA certificate the app now serves.
        chain = x509.load_pem_x509_certificates(r.json()["chain"].encode())
        ca_on_disk = x509.load_pem_x509_certificate(rig.settings.ca_cert_path.read_bytes())
        chain[0].verify_directly_issued_by(chain[1])
        chain[0].verify_directly_issued_by(ca_on_disk)
        return
    # The key the open CA found is not its certificate's (issue 14: not "not found").
    assert_problem(r, 503, "hsm-key-mismatch")
    assert_nothing_half_recorded(rig.settings, "dev-r1")
    assert_issues_and_verifies(rig, "dev-r1", csr)


def test_health_after_the_key_was_replaced_serves_the_new_ca(rig: Rig) -> None:
    csr0, _ = new_csr("dev-h0")
    assert_issues_and_verifies(rig, "dev-h0", csr0)
    _replace_key_under_the_same_uri(rig.settings)
    assert_healthy(rig)  # the stale CA is noticed and reopened by the probe
    r = rig.client.get("/v1/ca", headers={"Authorization": f"Bearer {rig.bearer}"})
    assert r.status_code == 200, r.text
    assert rig.settings.ca_cert_path.read_text().strip() in r.text.replace("\\n", "\n")
    csr, _ = new_csr("dev-h1")
    assert_issues_and_verifies(rig, "dev-h1", csr)


def test_ledger_chains_the_hsm_error_under_sign_failed(rig: Rig) -> None:
    """What the API's reason code relies on (api/issuance.py), and what the serial line
    and CLI see today: the ledger reports sign-failed with the HsmError as __cause__, and
    marks the board failed although the fault is the station's."""
    ca = open_ca(rig.settings)
    open_keystore(rig.settings).delete_key()
    csr, _ = new_csr("dev-l0")
    with Ledger.from_settings(rig.settings) as ledger:
        with pytest.raises(StationError) as excinfo:
            ledger.issue(BATCH, "dev-l0", csr.encode(), ca)
        assert excinfo.value.code == "sign-failed"
        assert isinstance(excinfo.value.__cause__, KeyNotFound)
        device = ledger.get_device("dev-l0")
        assert (device.state, device.failure_code) == ("failed", "sign-failed")
        assert [c.state for c in ledger.certificates("dev-l0")] == ["failed"]


# ------------------------------------------------------------------ found on the way (ledger)


def test_ledger_list_devices_finds_each_live_certificate_by_device(
    station_settings: Settings,
) -> None:
    """Found by the soak, fixed in the ledger by 86044ab (index on device_pk); kept as a guard.

    Ledger.list_devices (GET /v1/devices, `station device list`, reports, exports)
    left-joins certificates ON device_pk = devices.id AND state = 'issued'. On SQLite
    the only index on device_pk is partial (uq_certificates_live_device, WHERE state
    IN ('intent', 'issued')), which the planner may not use for state = 'issued', so it
    searches ix_certificates_state_station_id by state: every issued certificate for
    every device. After the 10-minute soak (111,194 boards) listing 2,000 devices took
    4 minutes; the whole batch would have taken hours.
    """
    from station.ledger.devices import RECORD_SELECT
    from station.ledger.schema import devices

    with Ledger.from_settings(station_settings) as ledger:
        stmt = RECORD_SELECT.where(devices.c.batch_id == 1).order_by(devices.c.id)
        sql = str(stmt.compile(ledger.engine, compile_kwargs={"literal_binds": True}))
        with ledger.engine.connect() as conn:
            plan = [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
    cert_steps = [p for p in plan if "certificates" in p]
    assert cert_steps and not any("(state=?)" in p for p in cert_steps), plan
