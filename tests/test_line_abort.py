"""A failed session is aborted and the board wipes what it made; every command names the
board it is meant for; a version 1 board and a version 2 board both provision."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_hooks.agent import CHAIN_FILE, Agent, AgentConfig
from firmware_hooks.host import BoardClient
from firmware_hooks.protocol import (
    BoardError,
    ErrorCode,
    Fields,
    Message,
    MsgType,
    OffsetReassembler,
    Tag,
    board_error,
    decode_frame,
    encode_tlv,
)
from firmware_hooks.simboard import SimulatedBoard
from station.ca import CertificateAuthority
from station.ledger import Ledger
from station.line import ProvisionContext
from station.line.driver import open_port_client
from station.line.provision import provision_board
from station.line.simkeys import CryptographyKeys
from station.settings import Settings

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
VECTORS = Path(__file__).parent / "vectors" / "serial"


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


def _earlier_session(client: BoardClient) -> bytes:
    """A session of an earlier run left on the board: its key and its chain (as a
    board verified elsewhere, or by another station, keeps them)."""
    client.hello()
    client.generate_key_csr("/O=company/OU=team/CN=earlier/C=US")
    chain = b"-----BEGIN CERTIFICATE-----\nearlier\n-----END CERTIFICATE-----\n"
    client.put_chain(chain)
    return chain


def test_a_board_refused_before_its_key_is_made_is_not_aborted(
    station_settings: Settings, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This session made nothing on the board, so it has nothing to abort: an ABORT
    would wipe what an earlier session made (for a board verified elsewhere, its
    live key and chain)."""
    ctx = _ctx(station_settings, ca, "abort-untouched")
    with SimulatedBoard(mode="thread", baudrate=None, keys=CryptographyKeys()) as board:
        client = open_port_client(board.port)
        aborts: list[str] = []
        real_abort = client.abort
        monkeypatch.setattr(client, "abort", lambda: aborts.append("abort") or real_abort())
        try:
            chain = _earlier_session(client)
            hello = client.hello()
            # A board that offers only see-rsa, for a board-ecc batch.
            see_only = replace(hello, capabilities=frozenset({"see-rsa", "put-chain", "prove"}))
            outcome = provision_board(client, see_only, ctx)
            assert (outcome.result, outcome.code) == ("failed", "unsupported-mode")
            assert aborts == []
            assert (board.key_dir / "deviceCert.key").exists()
            assert (board.key_dir / CHAIN_FILE).read_bytes() == chain
            assert client.status()["state"] == "chain-stored"
        finally:
            client.close()


def test_a_board_whose_key_command_fails_is_aborted_and_keeps_an_earlier_session(
    station_settings: Settings, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key command was sent, so the session is aborted (the board may have made a
    key before it failed); what the board made before this session's HELLO stays."""
    ctx = _ctx(station_settings, ca, "abort-keygen")
    with SimulatedBoard(mode="thread", baudrate=None, keys=FailingKeys()) as board:
        client = open_port_client(board.port)
        aborts: list[str] = []
        real_abort = client.abort
        monkeypatch.setattr(client, "abort", lambda: aborts.append("abort") or real_abort())
        try:
            board.keys.fail = False
            chain = _earlier_session(client)
            board.keys.fail = True
            outcome = provision_board(client, client.hello(), ctx)
            assert (outcome.result, outcome.code) == ("failed", "board-error")
            assert aborts == ["abort"]
            assert (board.key_dir / "deviceCert.key").exists()
            assert (board.key_dir / CHAIN_FILE).read_bytes() == chain
            assert client.status()["state"] == "chain-stored"
        finally:
            client.close()


class FailingKeys(CryptographyKeys):
    """A board whose key generation fails when ``fail`` is set."""

    fail = False

    def generate_key_csr(self, key_path: Path, subject: str) -> bytes:
        if self.fail:
            raise RuntimeError("key generation failed")
        return super().generate_key_csr(key_path, subject)


def test_abort_wipes_only_what_was_made_since_the_last_hello(tmp_path: Path) -> None:
    agent = Agent(
        AgentConfig(key_dir=tmp_path / "keys", hardware_id="BOARD-B", keys=CryptographyKeys())
    )
    _request(agent, MsgType.GEN_KEY_CSR, [(Tag.SUBJECT, "/O=company/CN=BOARD-B")])
    chain = b"-----BEGIN CERTIFICATE-----\nstub\n-----END CERTIFICATE-----\n"
    _request(agent, MsgType.PUT_CHAIN, [(Tag.CHAIN, chain)])
    assert _request(agent, MsgType.HELLO, []).type == MsgType.HELLO_OK
    assert _request(agent, MsgType.ABORT, [(Tag.EXPECTED_ID, "BOARD-B")]).type == MsgType.ABORT_OK
    assert (tmp_path / "keys" / "deviceCert.key").exists()
    assert (tmp_path / "keys" / CHAIN_FILE).read_bytes() == chain
    assert agent.session.state == "chain-stored"
    # A restarted agent (the session is on disk) agrees.
    again = Agent(AgentConfig(key_dir=tmp_path / "keys", hardware_id="BOARD-B"))
    assert again.session.state == "chain-stored"
    _request(again, MsgType.ABORT, [])
    assert (tmp_path / "keys" / "deviceCert.key").exists()


def _vector_message(name: str) -> Message:
    wire = (VECTORS / f"{name}.hex").read_text().splitlines()
    (frame,) = [bytes.fromhex(line) for line in wire if line.strip() and not line.startswith("#")]
    got = OffsetReassembler().add(decode_frame(frame[1:-1]))
    assert got.message is not None
    return got.message


def test_the_abort_vector_is_served_by_its_board_and_refused_by_another(tmp_path: Path) -> None:
    abort = _vector_message("v2-abort-request")
    assert Fields.decode(abort.payload).get_str(Tag.EXPECTED_ID) == "ARTIK-0001"
    for hardware_id, expected in (("ARTIK-0001", MsgType.ABORT_OK), ("ARTIK-0002", None)):
        agent = Agent(AgentConfig(key_dir=tmp_path / hardware_id, hardware_id=hardware_id))
        reply = agent.handle(abort)
        if expected is None:
            assert board_error(reply.payload).error_code == ErrorCode.WRONG_BOARD
        else:
            assert reply.type == expected


@pytest.mark.parametrize("offered", [(1,), (1, 2)])
def test_status_reports_the_protocol_version_the_session_speaks(offered: tuple[int, ...]) -> None:
    with (
        SimulatedBoard(mode="thread", baudrate=None) as board,
        BoardClient.open(board.port, protocol_versions=offered) as client,
    ):
        assert client.hello().protocol_version == max(offered)
        assert client.status()["protocol_version"] == str(max(offered))


def test_a_renewal_of_an_earlier_session_survives_an_abort_after_a_new_hello(
    tmp_path: Path,
) -> None:
    """A renewal the station confirmed but whose RENEW_COMMIT never arrived is finished
    by the next run (RENEW_COMMIT alone): an ABORT after that run's HELLO must not
    drop it, or the board would keep only its superseded chain. A renewal started
    since the last HELLO is still dropped by ABORT."""
    keys = tmp_path / "keys"
    agent = Agent(AgentConfig(key_dir=keys, hardware_id="BOARD-B", keys=CryptographyKeys()))
    subject = [(Tag.SUBJECT, "/O=company/CN=BOARD-B")]
    chain = b"-----BEGIN CERTIFICATE-----\nlive\n-----END CERTIFICATE-----\n"
    renewed = b"-----BEGIN CERTIFICATE-----\nrenewed\n-----END CERTIFICATE-----\n"
    _request(agent, MsgType.GEN_KEY_CSR, subject)
    _request(agent, MsgType.PUT_CHAIN, [(Tag.CHAIN, chain)])
    _request(agent, MsgType.HELLO, [])
    assert _request(agent, MsgType.RENEW_KEY_CSR, subject).type == MsgType.RENEW_KEY_CSR_OK
    _request(agent, MsgType.PUT_CHAIN, [(Tag.CHAIN, renewed)])
    _request(agent, MsgType.HELLO, [])  # the next run
    assert _request(agent, MsgType.ABORT, []).type == MsgType.ABORT_OK
    assert agent.session.state == "renewing"
    assert (keys / "deviceCert.key.renew").exists()
    commit = _request(agent, MsgType.RENEW_COMMIT, [])
    assert Fields.decode(commit.payload).get_bytes(Tag.DIGEST) == hashlib.sha256(renewed).digest()
    assert (keys / CHAIN_FILE).read_bytes() == renewed
    # Started since the last HELLO: dropped, the live key and chain stay.
    _request(agent, MsgType.RENEW_KEY_CSR, subject)
    assert _request(agent, MsgType.ABORT, []).type == MsgType.ABORT_OK
    assert agent.session.state == "chain-stored"
    assert not (keys / "deviceCert.key.renew").exists()
    assert (keys / CHAIN_FILE).read_bytes() == renewed


def test_the_hosts_abort_names_the_board_of_its_hello() -> None:
    """BoardClient.abort carries EXPECTED_ID (the HELLO's hardware id): a board that is
    not that one refuses it and keeps what it holds."""
    with (
        SimulatedBoard(mode="thread", baudrate=None, keys=CryptographyKeys()) as board,
        BoardClient.open(board.port) as client,
    ):
        client.hello()
        client.generate_key_csr("/O=company/CN=swapped")
        client.expected_id = "ANOTHER-BOARD"  # what a board swapped in after HELLO sees
        with pytest.raises(BoardError) as refused:
            client.abort()
        assert refused.value.error_code == ErrorCode.WRONG_BOARD
        assert (board.key_dir / "deviceCert.key").exists()
        client.expected_id = board.hardware_id
        client.abort()
        assert not (board.key_dir / "deviceCert.key").exists()
