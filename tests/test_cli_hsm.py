"""`station init`, `sign`, `hsm check|list|delete-key` on SoftHSM2, a TPM 2.0 and opencryptoki."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from click.testing import Result
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, MechanismFlag
from pkcs11 import KeyType as P11KeyType
from pkcs11.util.ec import encode_named_curve_parameters
from typer.testing import CliRunner

from hsm import KeyStore, Pkcs11Uri
from station.cli.register import register_all
from tests.csrs import device_name, make_csr
from tests.fixtures.tokens import Token

Run = Callable[..., Result]


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    app = typer.Typer(pretty_exceptions_enable=False)
    register_all(app)
    runner = CliRunner()
    monkeypatch.setenv("STATION_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("STATION_STATION_ID", "hsm-cli")
    monkeypatch.delenv("STATION_CA_KEY_URI", raising=False)

    def invoke(*args: str, code: int = 0, input: str | None = None) -> Result:
        result = runner.invoke(app, list(args), input=input)
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result

    return invoke


def use_key(monkeypatch: pytest.MonkeyPatch, token: Token, prefix: str = "ca") -> str:
    uri = token.uri(f"{prefix}-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("STATION_CA_KEY_URI", uri)
    return uri


def openssl_verify(tmp_path: Path, chain: bytes) -> subprocess.CompletedProcess[str]:
    (tmp_path / "chain.pem").write_bytes(chain)
    ca = chain[chain.index(b"-----BEGIN", 10) :]
    (tmp_path / "ca-only.pem").write_bytes(ca)
    return subprocess.run(
        [
            *("openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"),
            *(str(tmp_path / "ca-only.pem"), str(tmp_path / "chain.pem")),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_init_sign_and_check_on_each_token(
    any_token: Token, run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = use_key(monkeypatch, any_token)
    out = run("init", "--key-type", any_token.ca_key_type.value).stdout
    assert "created" in out
    csr, _ = make_csr(device_name("dev-hsm-1"))
    (tmp_path / "d.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    run("sign", "--csr", str(tmp_path / "d.csr"), "--chain", "--out", str(tmp_path / "d.pem"))
    result = openssl_verify(tmp_path, (tmp_path / "d.pem").read_bytes())
    assert result.returncode == 0, result.stderr
    check = run("hsm", "check", "--seconds", "0.3").stdout
    assert "signature   verified (with the CA certificate)" in check
    assert re.search(r"key\.extractable\s+False", check)
    assert re.search(r"key\.sensitive\s+True", check)
    assert "result      ok" in check and "signatures/s" in check
    listed = run("hsm", "list").stdout
    obj = Pkcs11Uri.parse(uri).object
    assert f"token={any_token.label}" in listed
    assert f"object={obj}" in listed
    assert "token=;" not in listed  # free slots are not tokens
    assert any_token.pin_file.read_text() not in listed + check


def test_hsm_check_fails_for_a_key_that_could_leave_the_token(
    softhsm_token: Token, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = use_key(monkeypatch, softhsm_token, "loose")
    ks = KeyStore(uri, default_module=softhsm_token.module)

    def loose_key(session):  # type: ignore[no-untyped-def]
        params = session.create_domain_parameters(
            P11KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        params.generate_keypair(
            store=True,
            label=ks.uri.object,
            id=b"\x42\x43",
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            private_template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )

    ks.call(loose_key)
    result = run("hsm", "check", "--key-uri", uri, "--seconds", "0.1", code=1)
    assert "[hsm-check-failed]" in result.stderr and "could leave" in result.stderr
    assert re.search(r"key\.extractable\s+True", result.stdout)


def test_init_force_makes_the_new_key_beside_a_ceremony_key(
    any_token: Token, run: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A key the station did not make (a key ceremony's) survives `init --force`."""
    uri = use_key(monkeypatch, any_token, "ceremony")
    ceremony = KeyStore(uri, default_module=any_token.module)
    ceremony_key = ceremony.generate_key(any_token.ca_key_type)  # made outside the station
    run("init")  # the station uses the key it finds
    forced = run("init", "--force", "--key-type", any_token.ca_key_type.value).stdout
    assert "replaced" in forced and "stays in the token" in forced
    assert "set STATION_CA_KEY_URI to" in forced
    assert ceremony.has_key()
    assert ceremony.private_key().public_key() == ceremony_key.public_key()
    # The station refuses to delete what it did not make, by name.
    result = run("hsm", "delete-key", "--key-uri", uri, "--yes", code=1)
    assert "[hsm-key-not-owned]" in result.stderr
    assert ceremony.has_key()


def test_delete_key_deletes_a_key_the_station_made_but_not_the_ca_key(
    softhsm_token: Token, run: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = use_key(monkeypatch, softhsm_token, "made")
    run("init")
    run("init", "--force")
    current = (tmp_path / "data" / "ca-key.uri").read_text().strip()
    assert current != first
    # The old key was made by the station: it may go, after confirmation.
    run("hsm", "delete-key", "--key-uri", first, input="n\n", code=1)
    assert KeyStore(first, default_module=softhsm_token.module).has_key()
    run("hsm", "delete-key", "--key-uri", first, "--yes")
    assert not KeyStore(first, default_module=softhsm_token.module).has_key()
    # The key of the CA certificate in use is not deleted.
    monkeypatch.setenv("STATION_CA_KEY_URI", current)
    result = run("hsm", "delete-key", "--key-uri", current, "--yes", code=1)
    assert "[ca-key-in-use]" in result.stderr


def test_force_on_the_dev_token_switches_to_the_new_key(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run shares one SoftHSM directory: a label of this test's own.
    monkeypatch.setenv("STATION_DEV_TOKEN_LABEL", f"force-{uuid.uuid4().hex[:6]}")
    run("init")
    data = tmp_path / "data"
    old = (data / "ca-key.uri").read_text().strip()
    forced = run("init", "--force").stdout
    assert "stays in the token" in forced and "STATION_CA_KEY_URI" not in forced
    new = (data / "ca-key.uri").read_text().strip()
    assert new != old
    assert KeyStore(old, default_module="/usr/lib/softhsm/libsofthsm2.so").has_key()
    shown = run("ca", "show").stdout
    assert Pkcs11Uri.parse(new).object in shown
