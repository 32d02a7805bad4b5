"""/healthz: 200 when token, key and database answer; 503 naming the part that does not.

Destructive cases run on their own data directory and their own CA key.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from station.ca import init_ca, open_keystore
from station.settings import Settings
from tests.fixtures.hsm import settings_for
from tests.test_api_helpers import assert_problem, make_api, new_csr


def test_healthz_ok(station_settings: Settings) -> None:
    with TestClient(create_app(station_settings)) as client:
        r = client.get("/healthz")
        assert r.status_code == 200
        assert r.json()["checks"] == {
            "token": {"status": "ok"},
            "key": {"status": "ok"},
            "database": {"status": "ok"},
        }


def test_healthz_database_unreachable(ca_home: Path, tmp_path: Path) -> None:
    settings = settings_for(ca_home, tmp_path / "own")
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        db = settings.data_dir / "ledger.sqlite"
        db.rename(tmp_path / "moved.sqlite")
        body = assert_problem(client.get("/healthz"), 503, "database-unreachable")
        assert body["part"] == "database"
        assert body["checks"]["key"] == {"status": "ok"}


def test_healthz_database_unopenable_at_start(ca_home: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    settings = settings_for(
        ca_home, tmp_path / "own", database_url=f"sqlite:///{blocker}/ledger.sqlite"
    )
    with TestClient(create_app(settings)) as client:
        body = assert_problem(client.get("/healthz"), 503, "database-unreachable")
        assert body["part"] == "database"


def test_healthz_key_gone(ca_home: Path, tmp_path: Path) -> None:
    # A CA key of its own, in the run's token, that this test may delete.
    uri = (ca_home / "ca-key.uri").read_text().strip()
    label = f"health-{secrets.token_hex(4)}"
    own_uri = uri.replace("object=station-ca-key", f"object={label}")
    assert own_uri != uri
    settings = Settings(data_dir=tmp_path / "own", ca_key_uri=own_uri, station_id="health")
    assert init_ca(settings).status == "created"
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        open_keystore(settings).delete_key()
        body = assert_problem(client.get("/healthz"), 503, "hsm-key-not-found")
        assert body["part"] == "key"
        assert body["checks"]["database"] == {"status": "ok"}


def test_healthz_after_a_failed_log_sync(
    ca_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose ledger could not sync takes no more writes: it says so until restarted."""
    settings = settings_for(ca_home, tmp_path / "own")
    for api in make_api(settings):
        api.batch("B1")
        assert api.get("/healthz", None).status_code == 200

        def broken(_engine: object) -> None:  # a failing disk cannot be made here
            raise OSError(5, "Input/output error")

        monkeypatch.setattr("station.ledger.groupcommit.sync_log", broken)
        pem, _key = new_csr("dev-1")
        body = {"batch": "B1", "device_id": "dev-1", "csr": pem}
        assert_problem(api.post("/v1/certificates", "board", json=body), 503, "ledger-sync-failed")
        monkeypatch.undo()  # the disk answers again; the worker still refuses
        assert_problem(api.post("/v1/certificates", "board", json=body), 503, "ledger-sync-failed")
        health = assert_problem(api.get("/healthz", None), 503, "ledger-sync-failed")
        assert health["part"] == "database"
        health = assert_problem(api.get("/healthz", "operator"), 503, "ledger-sync-failed")
        assert health["part"] == "database" and "restart" in health["detail"]


def test_a_worker_whose_start_up_recovery_failed_recovers_before_it_issues(
    ca_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the station lock a later process of the station would take this worker's
    in-flight intents for a dead run's; so no certificate before recovery has run."""
    from api import context
    from station.recovery import recover_at_startup

    calls: list[str] = []

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append("recover")
        if len(calls) == 1:
            raise RuntimeError("the ledger was not there yet")
        return recover_at_startup(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(context, "recover_at_startup", flaky)
    settings = settings_for(ca_home, tmp_path / "own")
    for api in make_api(settings):  # start-up recovery fails (logged, /healthz unaffected)
        station = api.client.app.state.station  # type: ignore[attr-defined]
        assert calls == ["recover"] and station._station_lock is None
        api.batch("B1")
        pem, _key = new_csr("dev-1")
        body = {"batch": "B1", "device_id": "dev-1", "csr": pem}
        assert api.post("/v1/certificates", "board", json=body).status_code == 201
        assert calls == ["recover", "recover"] and station._station_lock is not None
        pem2, _key2 = new_csr("dev-2")
        body2 = {"batch": "B1", "device_id": "dev-2", "csr": pem2}
        assert api.post("/v1/certificates", "board", json=body2).status_code == 201
        assert len(calls) == 2  # once is enough
