"""The board agent end to end: a real agent process on a pty, the real OpenSSL CLI,
the stand-in see_test; the station's side is played with `cryptography`."""

from __future__ import annotations

import datetime
import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from firmware_hooks.agent import CHAIN_FILE, OPENSSL_REQ, default_hardware_id
from firmware_hooks.host import BoardClient
from firmware_hooks.link import Link
from firmware_hooks.protocol import (
    BoardError,
    ErrorCode,
    Frame,
    Message,
    MessageDecoder,
    MsgType,
    Tag,
    encode_frame,
    encode_message,
    encode_tlv,
    proof_message,
)
from firmware_hooks.simboard import SimulatedBoard
from station.line.simkeys import CryptographyKeys
from tests.fixtures.boards import board_client, sim_board, sim_board_factory  # noqa: F401

SUBJECT = "/O=company/OU=team/CN=dev-0001/C=US"
FAST = {MsgType.HELLO: 1.0, MsgType.STATUS: 1.0}


# --------------------------------------------------------------------------- station side


class TestCA:
    """A throwaway issuing CA, standing in for the station's HSM-backed one."""

    __test__ = False

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )

    def chain_pem(self, cert: x509.Certificate) -> bytes:
        encoding = serialization.Encoding.PEM
        return cert.public_bytes(encoding) + self.cert.public_bytes(encoding)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _der(key: rsa.RSAPrivateKey, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())


def _station_csr(key: rsa.RSAPrivateKey) -> x509.CertificateSigningRequest:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-rsa")])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def _leftovers(board: SimulatedBoard) -> list[str]:
    return [name for name in os.listdir(board.key_dir) if name.startswith(".")]


# --------------------------------------------------------------------------- hello, status


def test_hello_names_the_board_and_its_abilities(
    sim_board: SimulatedBoard,  # noqa: F811
    board_client: BoardClient,  # noqa: F811
) -> None:
    hello = board_client.hello()
    assert hello.hardware_id == sim_board.hardware_id
    assert hello.agent_version == "1.1.0"
    assert {"board-ecc", "see-rsa"} <= hello.capabilities


def test_a_fresh_board_is_idle(board_client: BoardClient) -> None:  # noqa: F811
    status = board_client.status()
    assert status["state"] == "idle"
    assert status["key_mode"] == "none"


# --------------------------------------------------------------------------- board-ecc


def test_board_ecc_from_key_to_proof(
    sim_board: SimulatedBoard,  # noqa: F811
    board_client: BoardClient,  # noqa: F811
    ca: TestCA,
) -> None:
    csr_der = board_client.generate_key_csr(SUBJECT)
    csr = x509.load_der_x509_csr(csr_der)
    assert csr.is_signature_valid
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    assert csr.subject.rfc4514_string() == "C=US,CN=dev-0001,OU=team,O=company"

    key_file = sim_board.key_dir / "deviceCert.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert board_client.status()["state"] == "key-ready"

    cert = ca.issue(csr)
    chain = ca.chain_pem(cert)
    digest = board_client.put_chain(chain)
    assert digest == hashlib.sha256(chain).digest()
    assert (sim_board.key_dir / CHAIN_FILE).read_bytes() == chain
    assert board_client.status()["chain_sha256"] == digest.hex()

    nonce = os.urandom(32)
    signature = board_client.prove(sim_board.hardware_id, nonce)
    cert_key = cert.public_key()
    assert isinstance(cert_key, ec.EllipticCurvePublicKey)
    signed = proof_message(sim_board.hardware_id, nonce)
    cert_key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
    assert _leftovers(sim_board) == []


def test_a_named_key_gets_its_own_file(
    sim_board: SimulatedBoard,  # noqa: F811
    board_client: BoardClient,  # noqa: F811
) -> None:
    board_client.generate_key_csr(SUBJECT, key_name="line7")
    assert (sim_board.key_dir / "line7.key").exists()
    assert board_client.status()["key_name"] == "line7"


@pytest.mark.parametrize(
    ("subject", "code"),
    [
        ("CN=no-leading-slash", ErrorCode.INVALID_ARGUMENT),
        ("/CN=dev\n/O=x", ErrorCode.INVALID_ARGUMENT),
        ("/C=USA", ErrorCode.KEYGEN_FAILED),
    ],
    ids=["no-slash", "newline", "openssl-refuses"],
)
def test_bad_subjects_are_refused(
    sim_board: SimulatedBoard,  # noqa: F811
    board_client: BoardClient,  # noqa: F811
    subject: str,
    code: ErrorCode,
) -> None:
    with pytest.raises(BoardError) as caught:
        board_client.generate_key_csr(subject)
    assert caught.value.error_code == code
    assert _leftovers(sim_board) == []
    assert not (sim_board.key_dir / "deviceCert.key").exists()


def test_a_key_name_with_a_path_is_refused(board_client: BoardClient) -> None:  # noqa: F811
    with pytest.raises(BoardError) as caught:
        board_client.generate_key_csr(SUBJECT, key_name="../etc/evil")
    assert caught.value.error_code == ErrorCode.INVALID_ARGUMENT


def test_abort_drops_a_key_no_certificate_was_issued_for(
    sim_board: SimulatedBoard,  # noqa: F811
    board_client: BoardClient,  # noqa: F811
) -> None:
    board_client.generate_key_csr(SUBJECT)
    board_client.abort()
    assert not (sim_board.key_dir / "deviceCert.key").exists()
    assert board_client.status()["state"] == "idle"
    with pytest.raises(BoardError) as caught:
        board_client.prove(sim_board.hardware_id, os.urandom(32))
    assert caught.value.error_code == ErrorCode.BAD_STATE


# --------------------------------------------------------------------------- see-rsa


@pytest.mark.parametrize(
    "fmt",
    [serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8],
    ids=["pkcs1", "pkcs8"],
)
def test_see_rsa_from_key_to_proof(
    sim_board: SimulatedBoard,  # noqa: F811
    board_client: BoardClient,  # noqa: F811
    ca: TestCA,
    rsa_key: rsa.RSAPrivateKey,
    fmt: serialization.PrivateFormat,
) -> None:
    board_client.put_secure_key("rsaDevCert.key", _der(rsa_key, fmt))
    stored = sim_board.see_store / "rsaDevCert.key.der"
    assert stored.read_bytes() == _der(rsa_key, fmt)
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert _leftovers(sim_board) == []  # the temporary DER copy is gone
    assert board_client.status()["key_mode"] == "see-rsa"

    cert = ca.issue(_station_csr(rsa_key))
    chain = ca.chain_pem(cert)
    assert board_client.put_chain(chain) == hashlib.sha256(chain).digest()

    nonce = os.urandom(32)
    signature = board_client.prove(sim_board.hardware_id, nonce)
    cert_key = cert.public_key()
    assert isinstance(cert_key, rsa.RSAPublicKey)
    signed = proof_message(sim_board.hardware_id, nonce)
    cert_key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())


def test_a_secure_key_name_over_20_characters_is_refused(
    sim_board: SimulatedBoard,  # noqa: F811
    board_client: BoardClient,  # noqa: F811
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    der = _der(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL)
    with pytest.raises(BoardError) as caught:
        board_client.put_secure_key("a" * 21, der)
    assert caught.value.error_code == ErrorCode.KEY_NAME_TOO_LONG
    assert list(sim_board.see_store.iterdir()) == []
    board_client.put_secure_key("a" * 20, der)  # exactly 20 is fine


def test_see_test_failure_is_reported_verbatim(
    sim_board: SimulatedBoard,  # noqa: F811
    board_client: BoardClient,  # noqa: F811
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    der = _der(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL)
    with pytest.raises(BoardError) as caught:
        board_client.put_secure_key("devkey", der, algorithm=0x2010)
    assert caught.value.error_code == ErrorCode.SEE_FAILED
    assert caught.value.message.startswith("see_test exited with status 2: ")
    assert "ERR_SEE_INVALID_ALGORITHM" in caught.value.message
    assert "0x2010" in caught.value.message
    assert _leftovers(sim_board) == []


def test_a_key_that_is_not_der_is_refused_by_see_test_and_wiped(
    sim_board: SimulatedBoard,  # noqa: F811
    board_client: BoardClient,  # noqa: F811
) -> None:
    with pytest.raises(BoardError) as caught:
        board_client.put_secure_key("devkey", b"-----BEGIN RSA PRIVATE KEY-----\n")
    assert caught.value.error_code == ErrorCode.SEE_FAILED
    assert "status 5" in caught.value.message
    assert _leftovers(sim_board) == []


def test_a_missing_see_test_is_a_board_error(
    sim_board_factory: Callable[..., SimulatedBoard],  # noqa: F811
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    board = sim_board_factory(agent_args=["--see-test", "/nonexistent/see_test"])
    with BoardClient.open(board.port) as client:
        assert "see-rsa" not in client.hello().capabilities
        with pytest.raises(BoardError) as caught:
            client.put_secure_key("k", _der(rsa_key, serialization.PrivateFormat.PKCS8))
    assert caught.value.error_code == ErrorCode.SEE_FAILED
    assert _leftovers(board) == []


def test_signing_with_the_real_artiksee_engine_fails_cleanly_off_board(
    sim_board_factory: Callable[..., SimulatedBoard],  # noqa: F811
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    # The default --se-sign uses OpenSSL's artiksee engine, which only boards have.
    from firmware_hooks.agent import DEFAULT_SE_SIGN

    board = sim_board_factory(agent_args=["--se-sign", DEFAULT_SE_SIGN])
    with BoardClient.open(board.port) as client:
        client.put_secure_key("k", _der(rsa_key, serialization.PrivateFormat.PKCS8))
        with pytest.raises(BoardError) as caught:
            client.prove(board.hardware_id, os.urandom(32))
    assert caught.value.error_code == ErrorCode.SIGN_FAILED


# --------------------------------------------------------------------------- refusals


def test_proof_before_any_key_is_bad_state(
    sim_board: SimulatedBoard,  # noqa: F811
    board_client: BoardClient,  # noqa: F811
) -> None:
    with pytest.raises(BoardError) as caught:
        board_client.prove(sim_board.hardware_id, os.urandom(32))
    assert caught.value.error_code == ErrorCode.BAD_STATE


def test_a_chain_before_any_key_is_bad_state(board_client: BoardClient, ca: TestCA) -> None:  # noqa: F811
    with pytest.raises(BoardError) as caught:
        board_client.put_chain(ca.chain_pem(ca.cert))
    assert caught.value.error_code == ErrorCode.BAD_STATE


def test_a_chain_without_certificates_is_refused(board_client: BoardClient) -> None:  # noqa: F811
    board_client.generate_key_csr(SUBJECT)
    with pytest.raises(BoardError) as caught:
        board_client.put_chain(b"not a certificate")
    assert caught.value.error_code == ErrorCode.INVALID_ARGUMENT


def test_the_client_refuses_short_nonces_before_sending(board_client: BoardClient) -> None:  # noqa: F811
    with pytest.raises(ValueError):
        board_client.prove("dev-0001", b"short")


def test_unknown_commands_and_malformed_payloads_get_error_replies(
    board_client: BoardClient,  # noqa: F811
) -> None:
    link = board_client.link
    with pytest.raises(BoardError) as caught:
        link.request(0x42, timeout=1.0)
    assert caught.value.error_code == ErrorCode.UNKNOWN_COMMAND
    with pytest.raises(BoardError) as caught:
        link.request(MsgType.GEN_KEY_CSR, b"\x10\x00\x09abc", timeout=1.0)
    assert caught.value.error_code == ErrorCode.BAD_REQUEST
    with pytest.raises(BoardError) as caught:
        link.request(MsgType.GEN_KEY_CSR, encode_tlv([(Tag.KEY_NAME, "x")]), timeout=1.0)
    assert caught.value.error_code == ErrorCode.BAD_REQUEST  # SUBJECT missing


def _raw_exchange(board_client: BoardClient, wire: bytes, count: int) -> list[Message]:  # noqa: F811
    link: Link = board_client.link
    link.write(wire)
    replies = []
    for _ in range(count):
        reply = link.receive(5.0)
        assert reply is not None
        replies.append(reply)
    return replies


def test_a_request_in_another_protocol_version_gets_unsupported_version(
    board_client: BoardClient,  # noqa: F811
) -> None:
    wire = encode_frame(Frame(MsgType.HELLO, 0x0707, b"", version=9))
    (reply,) = _raw_exchange(board_client, wire, 1)
    assert (reply.type, reply.seq) == (MsgType.ERROR, 0x0707)
    assert b"version 9" in reply.payload


def test_a_board_that_agreed_to_version_2_refuses_a_version_3_request(
    sim_board_factory: Callable[..., SimulatedBoard],  # noqa: F811
) -> None:
    """Section 3: a good frame of a version the board does not speak is answered
    UNSUPPORTED_VERSION, so a host that sends version 3 to a version 2 board is told."""
    board = sim_board_factory(baudrate=None, agent_args=["--max-protocol", "2"])
    with BoardClient.open(board.port) as client:
        assert client.hello().protocol_version == 2
        client.link.version = 3  # a host that ignores the board's choice
        with pytest.raises(BoardError) as refused:
            client.status()
        assert refused.value.error_code == ErrorCode.UNSUPPORTED_VERSION
        client.link.version = 2
        assert client.status()["hardware_id"] == board.hardware_id


def test_a_repeated_request_is_answered_from_the_replay_cache(
    sim_board: SimulatedBoard,  # noqa: F811
    board_client: BoardClient,  # noqa: F811
) -> None:
    payload = encode_tlv([(Tag.SUBJECT, SUBJECT)])
    wire = encode_message(Message(MsgType.GEN_KEY_CSR, 0x0101, payload))
    first, second = _raw_exchange(board_client, wire + wire, 2)
    assert first == second  # same CSR: the key was made once
    key_before = (sim_board.key_dir / "deviceCert.key").read_bytes()
    (third,) = _raw_exchange(board_client, wire, 1)
    assert third == first
    assert (sim_board.key_dir / "deviceCert.key").read_bytes() == key_before


# --------------------------------------------------------------------------- thread mode, CLI


def test_the_agent_also_runs_in_a_thread(
    sim_board_factory: Callable[..., SimulatedBoard],  # noqa: F811
    ca: TestCA,
) -> None:
    board = sim_board_factory(mode="thread", baudrate=None)
    with BoardClient.open(board.port, timeouts=FAST) as client:
        assert client.hello().hardware_id == board.hardware_id
        csr = x509.load_der_x509_csr(client.generate_key_csr(SUBJECT))
        cert = ca.issue(csr)
        client.put_chain(ca.chain_pem(cert))
        nonce = os.urandom(32)
        cert_key = cert.public_key()
        assert isinstance(cert_key, ec.EllipticCurvePublicKey)
        signed = proof_message(board.hardware_id, nonce)
        cert_key.verify(client.prove(board.hardware_id, nonce), signed, ec.ECDSA(hashes.SHA256()))


def test_state_survives_an_agent_restart(
    sim_board_factory: Callable[..., SimulatedBoard],  # noqa: F811
    tmp_path,
    ca: TestCA,
) -> None:
    key_dir = tmp_path / "keys"
    with (
        SimulatedBoard(key_dir=key_dir, baudrate=None) as board,
        BoardClient.open(board.port) as client,
    ):
        cert = ca.issue(x509.load_der_x509_csr(client.generate_key_csr(SUBJECT)))
        client.put_chain(ca.chain_pem(cert))
    board = sim_board_factory(key_dir=key_dir, baudrate=None)
    with BoardClient.open(board.port) as client:
        assert client.status()["state"] == "chain-stored"
        nonce = os.urandom(32)
        cert_key = cert.public_key()
        assert isinstance(cert_key, ec.EllipticCurvePublicKey)
        signed = proof_message(board.hardware_id, nonce)
        cert_key.verify(client.prove(board.hardware_id, nonce), signed, ec.ECDSA(hashes.SHA256()))


def test_the_agent_command_line_documents_its_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "firmware_hooks.agent", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in ("--port", "--key-dir", "--hardware-id", "--baud", "--see-test", "--se-sign"):
        assert option in done.stdout


def test_the_agent_exits_when_its_port_cannot_be_opened(tmp_path) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "firmware_hooks.agent", "--port", str(tmp_path / "nope")),
            *("--key-dir", str(tmp_path), "--hardware-id", "X", "--exit-on-disconnect"),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 1
    assert "cannot open" in done.stderr


def test_the_default_hardware_id_comes_from_the_system() -> None:
    assert default_hardware_id().strip() != ""


def test_the_stream_decoder_sees_replies_as_whole_messages(
    board_client: BoardClient,  # noqa: F811
) -> None:
    # Sanity check of the wire itself: a HELLO exchange decodes with a fresh decoder.
    wire = encode_message(Message(MsgType.HELLO, 0x2222, b""))
    (reply,) = _raw_exchange(board_client, wire, 1)
    decoder = MessageDecoder()
    decoder.feed(encode_message(reply))
    assert decoder.next_message() == reply


# --------------------------------------------------------------------------- simulated key backend


def _openssl_subject_der(tmp_path, subject: str) -> bytes:
    key = tmp_path / "ref.key"
    subprocess.run(
        ["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(key)],
        check=True,
    )
    csr = subprocess.run(
        ["openssl", "req", "-new", "-key", str(key), "-subj", subject, *OPENSSL_REQ],
        check=True,
        capture_output=True,
    ).stdout
    return x509.load_der_x509_csr(csr).subject.public_bytes()


def test_the_in_process_key_backend_makes_what_openssl_makes(
    sim_board_factory: Callable[..., SimulatedBoard],  # noqa: F811
    ca: TestCA,
    tmp_path,
) -> None:
    board = sim_board_factory(mode="thread", baudrate=None, keys=CryptographyKeys())
    subject = "/O=company/OU=team \\/ line 2/CN=dev-0001/C=US"
    with BoardClient.open(board.port, timeouts=FAST) as client:
        csr = x509.load_der_x509_csr(client.generate_key_csr(subject))
        assert csr.is_signature_valid
        assert csr.subject.public_bytes() == _openssl_subject_der(tmp_path, subject)
        key_file = board.key_dir / "deviceCert.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        cert = ca.issue(csr)
        client.put_chain(ca.chain_pem(cert))
        nonce = os.urandom(32)
        cert_key = cert.public_key()
        assert isinstance(cert_key, ec.EllipticCurvePublicKey)
        signed = proof_message(board.hardware_id, nonce)
        cert_key.verify(client.prove(board.hardware_id, nonce), signed, ec.ECDSA(hashes.SHA256()))
    assert _leftovers(board) == []


def test_a_key_backend_failure_is_keygen_failed_and_leaves_no_file(
    sim_board_factory: Callable[..., SimulatedBoard],  # noqa: F811
) -> None:
    board = sim_board_factory(mode="thread", baudrate=None, keys=CryptographyKeys())
    with BoardClient.open(board.port, timeouts=FAST) as client:
        with pytest.raises(BoardError) as refused:
            client.generate_key_csr("/O=company/XX=unknown/CN=dev-0001")
        assert refused.value.error_code == ErrorCode.KEYGEN_FAILED
        assert "unknown or malformed attribute" in str(refused.value)
        assert client.status()["state"] == "idle"
    assert os.listdir(board.key_dir) == []


def test_a_key_backend_needs_an_in_process_board() -> None:
    with pytest.raises(ValueError, match="mode='thread'"):
        SimulatedBoard(keys=CryptographyKeys())


def test_a_station_key_left_by_a_killed_agent_is_wiped_when_it_starts_again(
    tmp_path,
    sim_board_factory: Callable[..., SimulatedBoard],  # noqa: F811
) -> None:
    """Power cut while see_test loads the station's RSA key: the temporary copy stays
    on the board's disk; the next agent overwrites and removes it before serving."""
    import time

    slow = tmp_path / "slow_see_test.sh"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)
    keys = tmp_path / "keys"
    board = sim_board_factory(key_dir=keys, agent_args=["--see-test", str(slow)], baudrate=None)
    der = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    link = Link(serial_port := __import__("serial").serial_for_url(board.port, timeout=0.05))
    link.send(
        Message(
            MsgType.PUT_SECURE_KEY,
            1,
            encode_tlv([(Tag.KEY_NAME, "devkey"), (Tag.KEY_DER, der)]),
        )
    )
    deadline = time.monotonic() + 10
    while not (left := [n for n in os.listdir(keys) if n.startswith(".se-key-")]):
        assert time.monotonic() < deadline, "the agent never wrote its temporary key"
        time.sleep(0.05)
    assert (keys / left[0]).read_bytes() == der
    board._proc.kill()  # the power cut
    board._proc.wait()
    serial_port.close()
    assert [n for n in os.listdir(keys) if n.startswith(".se-key-")] == left

    again = sim_board_factory(key_dir=keys, hardware_id=board.hardware_id, baudrate=None)
    with BoardClient.open(again.port, timeouts=FAST) as client:
        assert client.status()["hardware_id"] == board.hardware_id
    assert [n for n in os.listdir(keys) if n.startswith(".")] == []


def test_leftover_key_files_are_zeroed_before_they_are_removed(tmp_path, monkeypatch) -> None:
    from firmware_hooks import agent as agent_module

    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / ".se-key-abc.der").write_bytes(b"\x30\x82secret" * 100)
    (keys / ".key-xyz.tmp").write_bytes(b"-----BEGIN EC PRIVATE KEY-----")
    (keys / "deviceCert.key").write_bytes(b"the board's key")
    seen: dict[str, bytes] = {}
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        with open(path, "rb") as handle:
            seen[os.path.basename(path)] = handle.read()
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(agent_module.os, "unlink", unlink)
    agent_module.Agent(agent_module.AgentConfig(key_dir=keys, hardware_id="DEV-1"))
    assert seen == {".se-key-abc.der": bytes(800), ".key-xyz.tmp": bytes(30)}
    assert sorted(os.listdir(keys)) == ["deviceCert.key"]


def test_a_key_name_with_a_trailing_newline_is_refused(board_client: BoardClient) -> None:  # noqa: F811
    with pytest.raises(BoardError) as caught:
        board_client.generate_key_csr(SUBJECT, key_name="devkey\n")
    assert caught.value.error_code == ErrorCode.INVALID_ARGUMENT
