"""A failed session is aborted and the board wipes what it made; every command names the
board it is meant for; a version 1 board and a version 2 board both provision."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_hooks.agent import CHAIN_FILE, Agent, AgentConfig
from firmware_hooks.host import BoardClient
from firmware_hooks.protocol import ErrorCode, Message, MsgType, Tag, board_error, encode_tlv
from firmware_hooks.simboard import SimulatedBoard
from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.line import ProvisionContext
from station.line.driver import open_port_client
from station.line.provision import provision_board
from station.line.simkeys import CryptographyKeys
from station.settings import Settings

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


def _ctx(settings: Settings, ca: CertificateAuthority, name: str) -> ProvisionContext:
    ledger = Ledger.from_settings(settings)
    batch = ledger.create_batch(
        name, product="p", planned_count=16, key_mode="board-ecc", subject_template=TEMPLATE
    )
    return ProvisionContext(ledger, ca, batch)


class WrongSigner(CryptographyKeys):
    """A board whose proof is signed with a key other than the one it made the CSR with."""

    def sign(self, key_path: Path, data: bytes) -> bytes:
        return ec.generate_private_key(ec.SECP256R1()).sign(data, ec.ECDSA(hashes.SHA256()))


def test_a_board_that_fails_after_its_chain_is_aborted_and_wipes_key_and_chain(
    station_settings: Settings, ca: CertificateAuthority
) -> None:
    ctx = _ctx(station_settings, ca, "abort-proof")
    with SimulatedBoard(mode="thread", baudrate=None, keys=WrongSigner()) as board:
        client = open_port_client(board.port)
        try:
            outcome = provision_board(client, client.hello(), ctx)
            assert (outcome.result, outcome.code) == ("failed", "bad-proof")
            assert not (board.key_dir / "deviceCert.key").exists()
            assert not (board.key_dir / CHAIN_FILE).exists()
            assert client.status()["state"] == "idle"
        finally:
            client.close()
    assert ctx.ledger.get_device(board.hardware_id).state == "failed"
    assert board.hardware_id not in {e.device_id for e in ctx.ledger.whitelist()}


def _request(agent: Agent, msg_type: MsgType, fields: list[tuple[int, bytes | str | int]]):
    return agent.handle(Message(msg_type, 1, encode_tlv(fields)))


def test_a_command_meant_for_another_board_is_refused_and_nothing_is_done(
    tmp_path: Path,
) -> None:
    agent = Agent(
        AgentConfig(key_dir=tmp_path / "keys", hardware_id="BOARD-B", keys=CryptographyKeys())
    )
    reply = _request(
        agent,
        MsgType.GEN_KEY_CSR,
        [(Tag.EXPECTED_ID, "BOARD-A"), (Tag.SUBJECT, "/O=company/CN=BOARD-A")],
    )
    assert reply.type == MsgType.ERROR
    error = board_error(reply.payload)
    assert error.error_code == ErrorCode.WRONG_BOARD and error.code == "board-changed"
    assert not (tmp_path / "keys" / "deviceCert.key").exists()
    # Its own id, or none (a version 1 host): served.
    ok = _request(
        agent,
        MsgType.GEN_KEY_CSR,
        [(Tag.EXPECTED_ID, "BOARD-B"), (Tag.SUBJECT, "/O=company/CN=BOARD-B")],
    )
    assert ok.type == MsgType.GEN_KEY_CSR_OK


def test_an_abort_meant_for_another_board_leaves_its_key_and_chain(tmp_path: Path) -> None:
    agent = Agent(
        AgentConfig(key_dir=tmp_path / "keys", hardware_id="BOARD-B", keys=CryptographyKeys())
    )
    _request(agent, MsgType.GEN_KEY_CSR, [(Tag.SUBJECT, "/O=company/CN=BOARD-B")])
    chain = b"-----BEGIN CERTIFICATE-----\nstub\n-----END CERTIFICATE-----\n"
    assert _request(agent, MsgType.PUT_CHAIN, [(Tag.CHAIN, chain)]).type == MsgType.PUT_CHAIN_OK
    refused = _request(agent, MsgType.ABORT, [(Tag.EXPECTED_ID, "BOARD-A")])
    assert board_error(refused.payload).error_code == ErrorCode.WRONG_BOARD
    assert (tmp_path / "keys" / "deviceCert.key").exists()
    assert (tmp_path / "keys" / CHAIN_FILE).read_bytes() == chain


@pytest.mark.parametrize("max_protocol", [1, 2, 3])
def test_a_version_1_and_a_version_2_agent_both_provision(
    station_settings: Settings, ca: CertificateAuthority, max_protocol: int
) -> None:
    ctx = _ctx(station_settings, ca, f"v{max_protocol}")
    with SimulatedBoard(agent_args=["--max-protocol", str(max_protocol)]) as board:
        client = open_port_client(board.port)
        try:
            hello = client.hello()
            assert hello.protocol_version == max_protocol
            outcome = provision_board(client, hello, ctx)
        finally:
            client.close()
    assert outcome.result == "verified", outcome
    assert ctx.ledger.get_device(board.hardware_id).state == "verified"


def test_a_version_1_host_is_served_by_a_version_2_agent() -> None:
    with (
        SimulatedBoard(baudrate=None) as board,
        BoardClient.open(board.port, protocol_versions=(1,)) as client,
    ):
        assert client.hello().protocol_version == 1
        assert client.status()["hardware_id"] == board.hardware_id
