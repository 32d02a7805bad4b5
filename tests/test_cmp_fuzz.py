"""CMP's parser and route fuzzed with hypothesis (in process over ASGI, real ledger and token).

Seeds: a real p10cr that `openssl cmp` wrote (-reqout, sent nowhere), MAC-protected
with a real board token; mutated by flipping, cutting and extending bytes, and
plain garbage. Whatever arrives: never a 5xx, a CMP error message (signed, with a
PKIFailureInfo) for every refusal, and nothing issued.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder as der_decoder
from pyasn1_modules import rfc4210

from api.app import create_app
from station.enroll import cmp
from station.errors import StationError
from station.ledger import Ledger
from station.settings import Settings

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
FUZZ = settings(
    max_examples=120,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _seed(work: Path, token: str) -> bytes:
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", "k.pem", "-subj", "/O=company/OU=team/CN=fuzz-seed/C=US",
         "-out", "r.csr"],
        check=True, capture_output=True, cwd=work,
    )  # fmt: skip
    # Port 1 refuses the connection: openssl cmp writes the request and sends nothing.
    subprocess.run(
        ["openssl", "cmp", "-cmd", "p10cr", "-server", "127.0.0.1:1", "-path", "x",
         "-ref", "fuzz-board", "-secret", f"pass:{token}", "-csr", "r.csr",
         "-reqout", "seed.der"],
        capture_output=True, cwd=work, timeout=60,
    )  # fmt: skip
    return (work / "seed.der").read_bytes()


@pytest.fixture
def client(
    station_settings: Settings, tmp_path: Path
) -> Iterator[tuple[TestClient, Ledger, bytes]]:
    with Ledger.from_settings(station_settings) as led:
        led.create_batch(
            "C", product="p", planned_count=1000, key_mode="board-ecc", subject_template=TEMPLATE
        )
        token = led.create_token("fuzz-board", "board")
        secrets = tmp_path / "cmp-secrets"
        secrets.write_text(f"fuzz-board {token}\n")
        secrets.chmod(0o600)
        app = create_app(station_settings.model_copy(update={"cmp_secrets": secrets}))
        seed = _seed(tmp_path, token)
        with TestClient(app, raise_server_exceptions=False) as c:
            yield c, led, seed


@FUZZ
@given(data=st.binary(max_size=600))
def test_decode_only_raises_cmp_errors(data: bytes) -> None:
    try:
        msg = cmp.decode(data)
    except StationError as exc:
        assert isinstance(exc, cmp.CmpError) and exc.failure == "badDataFormat"
    else:
        cmp.header(msg)


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    def flip(data: tuple[int, int]) -> bytes:
        pos, value = data
        b = bytearray(seed)
        b[pos % len(b)] = value
        return bytes(b)

    return st.one_of(
        st.binary(max_size=500),
        st.tuples(st.integers(0, 10_000), st.integers(0, 255)).map(flip),
        st.integers(0, len(seed) - 1).map(lambda n: seed[:n]),
        st.binary(min_size=1, max_size=40).map(lambda tail: seed + tail),
    )


def test_cmp_route_fuzzed(client: tuple[TestClient, Ledger, bytes]) -> None:
    c, led, seed = client
    # The seed itself is a good request: the fixture really reaches issuance.
    r = c.post(
        "/.well-known/cmp/p/C/pkcs10", content=seed, headers={"Content-Type": cmp.CONTENT_TYPE}
    )
    first, _ = der_decoder.decode(r.content, asn1Spec=rfc4210.PKIMessage())
    assert first["body"].getName() == "cp", r.content

    @FUZZ
    @given(body=_mutations(seed))
    def check(body: bytes) -> None:
        r = c.post(
            "/.well-known/cmp/p/C/pkcs10",
            content=body,
            headers={"Content-Type": cmp.CONTENT_TYPE},
        )
        assert r.status_code == 200, r.text
        msg, _ = der_decoder.decode(r.content, asn1Spec=rfc4210.PKIMessage())
        kind = msg["body"].getName()
        # A flip outside the protected part (say, in the MAC's own bytes) may leave a
        # valid request only once: its transactionID is then used.
        assert kind in ("error", "cp"), kind
        if kind == "error":
            assert msg["body"]["error"]["pKIStatusInfo"]["failInfo"].isValue

    check()
    # Only the seed's own CSR was ever issued: every mutation of it came after.
    assert {d.device_id for d in led.list_devices()} == {"fuzz-seed"}
    assert len(led.certificates("fuzz-seed")) == 1
