"""EST's parsers and routes fuzzed with hypothesis (in process over ASGI, real ledger and CA).

Whatever the body, the content type or the label: never a 5xx, never a traceback,
an EST answer (``code: message`` in text/plain) for every refusal, and nothing
issued unless the request was a good CSR from a board token.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.app import create_app
from station.enroll import est
from station.errors import StationError
from station.ledger import Ledger
from station.policy import load_csr
from station.settings import Settings
from tests.csrs import device_name, make_csr

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture
def client(station_settings: Settings) -> Iterator[tuple[TestClient, str, Ledger]]:
    with Ledger.from_settings(station_settings) as led:
        led.create_batch(
            "E", product="p", planned_count=1000, key_mode="board-ecc", subject_template=TEMPLATE
        )
        token = led.create_token("fuzz-board", "board")
        app = create_app(station_settings)
        with TestClient(app, raise_server_exceptions=False) as c:
            yield c, token, led


def _good_der() -> bytes:
    csr, _ = make_csr(device_name("fuzz-seed"))
    return csr.public_bytes(serialization.Encoding.DER)


GOOD = _good_der()


def _mutations() -> st.SearchStrategy[bytes]:
    """Garbage, and a real CSR with bytes flipped, cut or appended (closer to valid)."""

    def flip(data: tuple[int, int]) -> bytes:
        pos, value = data
        b = bytearray(GOOD)
        b[pos % len(b)] = value
        return bytes(b)

    return st.one_of(
        st.binary(max_size=600),
        st.tuples(st.integers(0, 10_000), st.integers(0, 255)).map(flip),
        st.integers(0, len(GOOD)).map(lambda n: GOOD[:n]),
        st.binary(max_size=40).map(lambda tail: GOOD + tail),
    )


@FUZZ
@given(body=st.binary(max_size=400), ctype=st.sampled_from([est.PKCS10, "", "text/plain"]))
def test_read_pkcs10_only_raises_station_errors(body: bytes, ctype: str) -> None:
    try:
        der = est.read_pkcs10(body, ctype)
    except StationError as exc:
        assert exc.code in ("est-malformed", "est-media-type")
    else:
        assert der


@FUZZ
@given(der=_mutations())
def test_device_id_of_only_raises_station_errors(der: bytes) -> None:
    try:
        est.device_id_of(load_csr(der))
    except StationError as exc:
        assert exc.code in ("malformed-csr", "csr-too-large", "est-no-device-id")


def test_simpleenroll_fuzzed(client: tuple[TestClient, str, Ledger]) -> None:
    c, token, led = client
    auth = {"Authorization": "Basic " + base64.b64encode(f"x:{token}".encode()).decode()}
    issued: list[int] = []

    @FUZZ
    @given(
        der=_mutations(),
        encode=st.booleans(),
        ctype=st.sampled_from([est.PKCS10, "application/pkcs10; charset=x", "application/json"]),
        label=st.sampled_from(["E", "NOPE", "E%2F..", "%00", "x" * 300]),
    )
    def check(der: bytes, encode: bool, ctype: str, label: str) -> None:
        body = base64.b64encode(der) if encode else der
        r = c.post(
            f"/.well-known/est/{label}/simpleenroll",
            content=body,
            headers={**auth, "Content-Type": ctype},
        )
        assert r.status_code < 500, r.text
        if r.status_code == 200:
            issued.append(1)
            assert r.headers["content-type"].startswith("application/pkcs7-mime")
        elif r.headers["content-type"].startswith("text/plain"):
            code, sep, _ = r.text.partition(": ")
            assert sep and code and " " not in code, r.text
        else:  # refused by the app's middleware (control character, body size): problem+json
            assert r.headers["content-type"].startswith("application/problem+json"), r.text

    check()
    # Only bytes that were a good CSR for the batch can have been issued: the seed's.
    devices = {d.device_id for d in led.list_devices()}
    assert devices <= {"fuzz-seed"}
    assert bool(issued) == (devices == {"fuzz-seed"})


def test_fuzzed_reenrol_without_tls_is_refused(client: tuple[TestClient, str, Ledger]) -> None:
    c, _, _ = client

    @FUZZ
    @given(body=st.binary(max_size=300))
    def check(body: bytes) -> None:
        r = c.post(
            "/.well-known/est/E/simplereenroll",
            content=body,
            headers={"Content-Type": est.PKCS10},
        )
        assert r.status_code == 401 and r.text.startswith("est-no-client-certificate: ")

    check()
