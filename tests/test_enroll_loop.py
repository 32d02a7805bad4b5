"""EST and CMP never call the token on the event loop (in process, real SoftHSM and ledger).

A PKCS#11 call blocks its thread (a signature, a key look-up, a login, the
process-wide token lock another thread holds): on the event loop it stalls every
request of the worker. Every token call goes through ``hsm.KeyStore.call``; the
spy below notes each one made in a thread that is running an event loop, and
lets it through to the real token. Deterministic: it asks where the call runs,
not how long the loop stalled.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from pyasn1.codec.der import decoder as der_decoder
from pyasn1_modules import rfc4210

from api.app import create_app
from hsm import KeyStore
from station.enroll import cmp
from station.ledger import Ledger
from station.settings import Settings
from tests.csrs import device_name, make_csr

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
CMP_TYPE = {"Content-Type": cmp.CONTENT_TYPE}


@pytest.fixture
def on_loop(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the threads that called the token while running an event loop."""
    seen: list[str] = []
    real = KeyStore.call

    def call(self: KeyStore, fn: Callable[[Any], Any]) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # a worker thread: where token calls belong
        else:
            seen.append(threading.current_thread().name)
        return real(self, fn)

    monkeypatch.setattr(KeyStore, "call", call)
    return seen


def _p10cr(work: Path, token: str, device_id: str) -> bytes:
    """A MAC-protected p10cr written by `openssl cmp` (-reqout; port 1 sends nothing)."""
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", f"{device_id}.key",
         "-subj", f"/O=company/OU=team/CN={device_id}/C=US", "-out", f"{device_id}.csr"],
        check=True, capture_output=True, cwd=work,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "cmp", "-cmd", "p10cr", "-server", "127.0.0.1:1", "-path", "x",
         "-ref", "loop-board", "-secret", f"pass:{token}", "-csr", f"{device_id}.csr",
         "-reqout", f"{device_id}.der"],
        capture_output=True, cwd=work, timeout=60,
    )  # fmt: skip
    return (work / f"{device_id}.der").read_bytes()


@pytest.fixture
def station(station_settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, str, Path]]:
    with Ledger.from_settings(station_settings) as led:
        led.create_batch(
            "C", product="p", planned_count=10, key_mode="board-ecc", subject_template=TEMPLATE
        )
        token = led.create_token("loop-board", "board")
    secrets = tmp_path / "cmp-secrets"
    secrets.write_text(f"loop-board {token}\n")
    secrets.chmod(0o600)
    settings = station_settings.model_copy(
        update={"cmp_secrets": secrets, "est_default_batch": "C"}
    )
    with TestClient(create_app(settings)) as client:
        yield client, token, tmp_path


def _body_of(der: bytes) -> str:
    msg, _ = der_decoder.decode(der, asn1Spec=rfc4210.PKIMessage())
    return str(msg["body"].getName())


def test_a_cmp_refusal_is_signed_off_the_loop(
    station: tuple[TestClient, str, Path], on_loop: list[str]
) -> None:
    """The first CMP answer of a worker is a refusal: the responder key is looked up
    (or made) and certified, and the error message signed, all in the token."""
    client, _, _ = station
    on_loop.clear()  # start-up (warm-up in a thread) is not under test
    r = client.post("/.well-known/cmp/p/C/pkcs10", content=b"\x30\x03abc", headers=CMP_TYPE)
    assert r.status_code == 200 and _body_of(r.content) == "error"
    assert on_loop == []
    # Once the responder is cached: still only the signature, still off the loop.
    r = client.post("/.well-known/cmp/p/C/pkcs10", content=b"\x30\x03abc", headers=CMP_TYPE)
    assert _body_of(r.content) == "error"
    assert on_loop == []


def test_enrolment_touches_the_token_off_the_loop(
    station: tuple[TestClient, str, Path], on_loop: list[str]
) -> None:
    client, token, work = station
    on_loop.clear()
    r = client.post(
        "/.well-known/cmp/p/C/pkcs10", content=_p10cr(work, token, "loop-cmp-1"), headers=CMP_TYPE
    )
    assert _body_of(r.content) == "cp", r.content
    csr, _ = make_csr(device_name("loop-est-1"))
    r = client.post(
        "/.well-known/est/simpleenroll",
        content=base64.b64encode(csr.public_bytes(serialization.Encoding.DER)),
        headers={"Content-Type": "application/pkcs10", "Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200, r.text
    r = client.get("/.well-known/est/cacerts")
    assert r.status_code == 200
    assert on_loop == []
