"""Proof of possession signs a domain-separated message, never bytes of the caller's choosing.

Issue 15 item 14: PROVE used to sign any 16-1024 bytes with the device key, so
whoever reached the agent's port could have it sign a TLS 1.3 CertificateVerify
input (130 bytes) and impersonate the board to AWS IoT."""

from __future__ import annotations

import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_hooks.host import BoardClient
from firmware_hooks.protocol import (
    PROOF_CONTEXT,
    BadPayload,
    BoardError,
    ErrorCode,
    MsgType,
    Tag,
    parse_proof_message,
    proof_message,
)
from firmware_hooks.simboard import SimulatedBoard
from tests.fixtures.boards import board_client, sim_board  # noqa: F401

SUBJECT = "/O=company/OU=team/CN=dev-0001/C=US"
# What a TLS 1.3 client signs in CertificateVerify: 64 spaces, the context, 0, a hash.
TLS13_CERTIFICATE_VERIFY = b" " * 64 + b"TLS 1.3, client CertificateVerify" + b"\x00" + bytes(32)


def test_the_message_is_context_id_length_id_and_a_32_byte_nonce() -> None:
    nonce = bytes(range(32))
    message = proof_message("ARTIK-0001", nonce)
    assert message == PROOF_CONTEXT + b"\x0a" + b"ARTIK-0001" + nonce
    assert len(PROOF_CONTEXT) == 40 and PROOF_CONTEXT.endswith(b"\x00\x01")
    assert parse_proof_message(message) == ("ARTIK-0001", nonce)


@pytest.mark.parametrize(
    "bad",
    [
        TLS13_CERTIFICATE_VERIFY,
        os.urandom(32),
        proof_message("a", bytes(32))[:-1],  # 31-byte nonce
        proof_message("a", bytes(32)) + b"\x00",  # 33-byte nonce
        PROOF_CONTEXT + b"\x00" + bytes(32),  # empty id
        PROOF_CONTEXT,
    ],
    ids=["tls13", "bare-nonce", "short", "long", "empty-id", "context-only"],
)
def test_anything_else_is_not_a_proof_message(bad: bytes) -> None:
    with pytest.raises(BadPayload):
        parse_proof_message(bad)


def test_the_nonce_is_exactly_32_bytes_and_the_id_at_most_64() -> None:
    with pytest.raises(ValueError):
        proof_message("a", bytes(16))
    with pytest.raises(ValueError):
        proof_message("a" * 65, bytes(32))


def _raw_prove(client: BoardClient, message: bytes) -> bytes:
    reply = client.link.request(
        MsgType.PROVE,
        bytes([Tag.NONCE, len(message) >> 8, len(message) & 0xFF]) + message,
        timeout=10.0,
    )
    return reply.payload


def test_the_agent_refuses_to_sign_a_tls_certificate_verify_input(
    board_client: BoardClient,  # noqa: F811
) -> None:
    board_client.generate_key_csr(SUBJECT)
    with pytest.raises(BoardError) as caught:
        _raw_prove(board_client, TLS13_CERTIFICATE_VERIFY)
    assert caught.value.error_code == ErrorCode.INVALID_ARGUMENT


def test_the_agent_refuses_a_proof_naming_another_board(
    board_client: BoardClient,  # noqa: F811
) -> None:
    board_client.generate_key_csr(SUBJECT)
    with pytest.raises(BoardError) as caught:
        board_client.prove("SOMEONE-ELSE", os.urandom(32))
    assert caught.value.error_code == ErrorCode.INVALID_ARGUMENT
    assert "SOMEONE-ELSE" in caught.value.message


def test_the_agent_signs_the_proof_message_for_its_own_id(
    sim_board: SimulatedBoard,  # noqa: F811
    board_client: BoardClient,  # noqa: F811
) -> None:
    csr = x509.load_der_x509_csr(board_client.generate_key_csr(SUBJECT))
    nonce = os.urandom(32)
    signature = board_client.prove(sim_board.hardware_id, nonce)
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(signature, proof_message(sim_board.hardware_id, nonce), ec.ECDSA(hashes.SHA256()))
