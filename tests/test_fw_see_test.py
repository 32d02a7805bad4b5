"""The see_test stand-in: the documented set-key command, its errors, and sign."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

RSA_2048 = "4097"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def see_test(store: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("SEE_TEST_STORE", None)
    if store is not None:
        env["SEE_TEST_STORE"] = str(store)
    return subprocess.run(
        [sys.executable, "-m", "firmware_hooks.see_test", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=30,
    )


def write_der(tmp_path: Path, key: object, fmt: serialization.PrivateFormat) -> Path:
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    path = tmp_path / "key.der"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
    )
    return path


@pytest.mark.parametrize(
    "fmt",
    [serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8],
    ids=["pkcs1", "pkcs8"],
)
def test_set_key_stores_an_rsa_2048_key_privately(
    tmp_path: Path, store: Path, rsa_key: rsa.RSAPrivateKey, fmt: serialization.PrivateFormat
) -> None:
    der = write_der(tmp_path, rsa_key, fmt)
    done = see_test(store, "-K", "set-key", "-a", RSA_2048, "-k", "rsaDevCert.key", "-I", str(der))
    assert done.returncode == 0, done.stderr
    stored = store / "rsaDevCert.key.der"
    assert stored.read_bytes() == der.read_bytes()
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600


def test_sign_plays_the_artiksee_engine_with_pkcs1v15_sha256(
    tmp_path: Path, store: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    der = write_der(tmp_path, rsa_key, serialization.PrivateFormat.PKCS8)
    assert (
        see_test(store, "-K", "set-key", "-a", "0x1001", "-k", "k", "-I", str(der)).returncode == 0
    )
    data, sig = tmp_path / "data", tmp_path / "sig"
    data.write_bytes(b"nonce" * 10)
    done = see_test(store, "-K", "sign", "-k", "k", "-I", str(data), "-O", str(sig))
    assert done.returncode == 0, done.stderr
    rsa_key.public_key().verify(
        sig.read_bytes(), data.read_bytes(), padding.PKCS1v15(), hashes.SHA256()
    )


def test_remove_key_forgets_the_key(
    tmp_path: Path, store: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    der = write_der(tmp_path, rsa_key, serialization.PrivateFormat.PKCS8)
    see_test(store, "-K", "set-key", "-a", RSA_2048, "-k", "k", "-I", str(der))
    assert see_test(store, "-K", "remove-key", "-k", "k").returncode == 0
    assert see_test(store, "-K", "remove-key", "-k", "k").returncode == 7


def _refusal(done: subprocess.CompletedProcess[str], code: int, name: str) -> str:
    assert done.returncode == code
    assert done.stdout == ""
    assert done.stderr.startswith("see_test: ")
    assert f"({name})" in done.stderr
    return done.stderr


def test_an_unsupported_algorithm_is_refused(
    tmp_path: Path, store: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    der = write_der(tmp_path, rsa_key, serialization.PrivateFormat.PKCS8)
    err = _refusal(
        see_test(store, "-K", "set-key", "-a", "8208", "-k", "k", "-I", str(der)),
        2,
        "ERR_SEE_INVALID_ALGORITHM",
    )
    assert "0x2010" in err


def test_a_name_over_20_characters_is_refused(
    tmp_path: Path, store: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    der = write_der(tmp_path, rsa_key, serialization.PrivateFormat.PKCS8)
    err = _refusal(
        see_test(store, "-K", "set-key", "-a", RSA_2048, "-k", "x" * 21, "-I", str(der)),
        3,
        "ERR_SEE_INVALID_KEY_NAME",
    )
    assert "21 characters, at most 20" in err
    assert not store.exists() or list(store.iterdir()) == []


def test_a_name_with_a_path_is_refused(
    tmp_path: Path, store: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    der = write_der(tmp_path, rsa_key, serialization.PrivateFormat.PKCS8)
    _refusal(
        see_test(store, "-K", "set-key", "-a", RSA_2048, "-k", "../k", "-I", str(der)),
        3,
        "ERR_SEE_INVALID_KEY_NAME",
    )


def test_an_unreadable_input_is_refused(tmp_path: Path, store: Path) -> None:
    err = _refusal(
        see_test(store, "-K", "set-key", "-a", RSA_2048, "-k", "k", "-I", str(tmp_path / "none")),
        4,
        "ERR_SEE_INPUT_UNREADABLE",
    )
    assert "No such file" in err


@pytest.mark.parametrize(
    "content",
    [b"", b"\x30\x03\x02\x01", b"-----BEGIN PRIVATE KEY-----\n", b"\x30\x03\x02\x01\x00"],
    ids=["empty", "truncated", "pem", "not-rsa"],
)
def test_invalid_der_is_refused(tmp_path: Path, store: Path, content: bytes) -> None:
    bad = tmp_path / "bad.der"
    bad.write_bytes(content)
    _refusal(
        see_test(store, "-K", "set-key", "-a", RSA_2048, "-k", "k", "-I", str(bad)),
        5,
        "ERR_SEE_INVALID_KEY",
    )


def test_an_ec_key_is_not_an_rsa_key(tmp_path: Path, store: Path) -> None:
    der = write_der(
        tmp_path, ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8
    )
    _refusal(
        see_test(store, "-K", "set-key", "-a", RSA_2048, "-k", "k", "-I", str(der)),
        5,
        "ERR_SEE_INVALID_KEY",
    )


def test_an_rsa_key_of_another_size_is_refused(tmp_path: Path, store: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point
    err = _refusal(
        see_test(
            store,
            "-K",
            "set-key",
            "-a",
            RSA_2048,
            "-k",
            "k",
            "-I",
            str(write_der(tmp_path, small, serialization.PrivateFormat.PKCS8)),
        ),
        5,
        "ERR_SEE_INVALID_KEY",
    )
    assert "RSA-1024" in err


def test_signing_with_an_unknown_key_is_refused(tmp_path: Path, store: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x")
    _refusal(
        see_test(store, "-K", "sign", "-k", "nokey", "-I", str(data), "-O", str(tmp_path / "s")),
        7,
        "ERR_SEE_KEY_NOT_FOUND",
    )


def test_no_store_configured_is_a_storage_error(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    der = write_der(tmp_path, rsa_key, serialization.PrivateFormat.PKCS8)
    _refusal(
        see_test(None, "-K", "set-key", "-a", RSA_2048, "-k", "k", "-I", str(der)),
        6,
        "ERR_SEE_STORAGE",
    )


@pytest.mark.parametrize(
    "args",
    [(), ("-K", "set-key", "-k", "k"), ("-K", "frobnicate", "-k", "k"), ("-K", "sign", "-k", "k")],
    ids=["nothing", "set-key-without-input", "unknown-command", "sign-without-files"],
)
def test_usage_errors_exit_1(store: Path, args: tuple[str, ...]) -> None:
    _refusal(see_test(store, *args), 1, "ERR_SEE_USAGE")
