"""Random and mutated bytes on the serial line: the codec, the link and the board agent.

Whatever arrives, the codec raises only ``ProtocolError`` subclasses and keeps
its buffer bounded, the link gives up within its timeout, the agent answers
every request with a reply or an ERROR (never raises), and after any garbage the
agent (the real ``Agent.serve`` loop on a pty pair) still answers a good HELLO.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import serial
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_hooks import protocol as p
from firmware_hooks.agent import Agent, AgentConfig
from firmware_hooks.link import Link
from firmware_hooks.simboard import SimulatedBoard


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# ------------------------------------------------------------------ strategies

tags = st.one_of(st.sampled_from(list(p.Tag)), st.integers(0, 255))
field_values = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=80),
    st.integers(0, 0xFFFF),
    st.binary(min_size=2000, max_size=3000),
)
tlv_payloads = st.lists(st.tuples(tags, field_values), max_size=6).map(p.encode_tlv)
payloads = st.one_of(tlv_payloads, st.binary(max_size=2500))
msg_types = st.one_of(st.sampled_from(list(p.MsgType)), st.integers(0, 255))
messages = st.builds(p.Message, msg_types, st.integers(0, 0xFFFF), payloads)
wires = messages.map(p.encode_message)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes] = wires) -> bytes:
    """A valid wire encoding, then bit flips, a truncation, a splice or inserted bytes."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "insert", "delete", "zero"]))
        if not data:
            data = bytearray(draw(st.binary(min_size=1, max_size=16)))
        if kind == "flip":
            for bit in draw(st.sets(st.integers(0, len(data) * 8 - 1), min_size=1, max_size=8)):
                data[bit // 8] ^= 1 << (bit % 8)
        elif kind == "truncate":
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif kind == "splice":
            other = draw(base)
            data = (
                data[: draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))) :]
            )
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "delete":
            i = draw(st.integers(0, len(data) - 1))
            del data[i : i + draw(st.integers(1, 16))]
        else:
            data[draw(st.integers(0, len(data) - 1))] = 0
    return bytes(data)


garbage = st.one_of(
    st.binary(max_size=4000),
    mutated(),
    st.binary(min_size=1100, max_size=5000).map(lambda b: b.replace(b"\x00", b"\x01")),
)


def drain(decoder: p.MessageDecoder) -> Iterator[p.Message | p.ProtocolError]:
    """Every message the decoder can give now; errors come out as values."""
    while True:
        try:
            message = decoder.next_message()
        except p.ProtocolError as exc:
            yield exc
            continue
        if message is None:
            return
        yield message


# ------------------------------------------------------------------ the codec


@fuzz(600)
@given(data=garbage, chunk=st.integers(1, 700))
def test_the_decoder_raises_only_protocol_errors(data: bytes, chunk: int) -> None:
    decoder = p.MessageDecoder()
    for i in range(0, len(data), chunk):
        decoder.feed(data[i : i + chunk])
        for out in drain(decoder):
            if isinstance(out, p.Message):
                for parse in (p.Fields.decode, p.board_error):
                    with contextlib.suppress(p.ProtocolError):
                        parse(out.payload)
        # Never more than one frame's worth waiting for a delimiter.
        assert decoder.frames.buffered <= p.MAX_ENCODED_FRAME + chunk


@fuzz(600)
@given(data=garbage)
def test_the_one_shot_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for decode in (p.cobs_decode, p.decode_frame, p.Fields.decode, p.board_error):
        with contextlib.suppress(p.ProtocolError):
            decode(data)


@fuzz(300)
@given(junk=garbage, message=messages)
def test_a_good_message_after_garbage_comes_through(junk: bytes, message: p.Message) -> None:
    """The delimiter resynchronises: whatever came before, the next good message decodes."""
    decoder = p.MessageDecoder()
    decoder.feed(junk)
    list(drain(decoder))
    decoder.feed(p.encode_message(message))
    out = [m for m in drain(decoder) if isinstance(m, p.Message)]
    assert out and out[-1] == message


@fuzz(200)
@given(message=messages)
def test_every_message_round_trips(message: p.Message) -> None:
    decoder = p.MessageDecoder()
    decoder.feed(p.encode_message(message))
    assert list(drain(decoder)) == [message]


# ------------------------------------------------------------------ the link


class GarbagePeer:
    """The far end of a real pty pair: sends ``junk`` at once (``at_start``) or as the
    answer to every request it reads. A thread writes, so a full pty never blocks the test."""

    def __init__(self, junk: bytes, *, at_start: bool) -> None:
        self.junk = junk
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.port = serial.Serial(os.ttyname(slave), timeout=0.05)
        os.close(slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(at_start,), daemon=True)
        self._thread.start()

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._stop.is_set():
            _, ready, _ = select.select([], [self.master], [], 0.05)
            if ready:
                view = view[os.write(self.master, view[:1024]) :]

    def _run(self, at_start: bool) -> None:
        try:
            if at_start:
                self._send(self.junk)
            while not self._stop.is_set():
                ready, _, _ = select.select([self.master], [], [], 0.05)
                if ready and os.read(self.master, 4096) and not at_start:
                    self._send(self.junk)
        except OSError:
            return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.port.close()
        os.close(self.master)


@fuzz(20)
@given(junk=garbage)
def test_the_link_drops_garbage_within_its_timeout(junk: bytes) -> None:
    peer = GarbagePeer(junk, at_start=True)
    try:
        link = Link(peer.port, poll_interval=0.01)
        start = time.monotonic()
        while time.monotonic() - start < 5.0:
            try:
                got = link.receive(0.2)
            except p.UnsupportedVersion:
                continue  # a valid frame of another version: the caller's to answer
            if got is None:
                break
        else:
            raise AssertionError("the link keeps finding messages in garbage")
    finally:
        peer.close()


@fuzz(20)
@given(junk=garbage)
def test_a_request_answered_with_garbage_ends_in_a_typed_error(junk: bytes) -> None:
    """The far end answers every request with garbage: the request ends in Timeout or
    another ProtocolError after its bounded attempts, never another exception or a hang."""
    peer = GarbagePeer(junk, at_start=False)
    try:
        link = Link(peer.port, poll_interval=0.01)
        start = time.monotonic()
        with pytest.raises(p.ProtocolError):
            link.request(p.MsgType.HELLO, timeout=0.1, retries=1)
        # Two attempts of 0.1 s (plus line time): a generous bound, only to catch a hang.
        assert time.monotonic() - start < 10.0
    finally:
        peer.close()


# ------------------------------------------------------------------ the agent


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return Agent(
        AgentConfig(
            key_dir=tmp_path / "keys",
            hardware_id="FUZZ-0001",
            see_test=(str(tmp_path / "no-see-test"),),
            se_sign=(str(tmp_path / "no-se-sign"),),
        )
    )


SEEDS = [
    p.encode_tlv([(p.Tag.SUBJECT, "/O=company/CN=x"), (p.Tag.KEY_NAME, "k")]),
    p.encode_tlv(
        [(p.Tag.KEY_NAME, "k"), (p.Tag.KEY_DER, b"\x30\x82" + bytes(40)), (p.Tag.ALGORITHM, 4097)]
    ),
    p.encode_tlv(
        [(p.Tag.CHAIN, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")]
    ),
    p.encode_tlv([(p.Tag.NONCE, b"n" * 32)]),
]
request_payloads = st.one_of(payloads, mutated(st.sampled_from(SEEDS)))


@fuzz(300)
@given(msg_type=msg_types, seq=st.integers(0, 0xFFFF), payload=request_payloads)
def test_the_agent_answers_every_request(
    agent: Agent, msg_type: int, seq: int, payload: bytes
) -> None:
    if msg_type == p.MsgType.GEN_KEY_CSR:
        msg_type = (
            p.MsgType.STATUS
        )  # key generation runs openssl: covered once below, not 300 times
    reply = agent.handle(p.Message(msg_type, seq, payload))
    assert reply.seq == seq
    assert reply.type in (p.MsgType.ERROR, p.response_type(msg_type))
    if reply.type == p.MsgType.ERROR:
        error = p.board_error(reply.payload)
        assert error.error_code in set(p.ErrorCode)
        assert error.error_code != p.ErrorCode.INTERNAL, error.message
    assert p.encode_message(reply)  # the reply itself is encodable


@pytest.mark.parametrize(
    "payload",
    [
        p.encode_tlv([(p.Tag.SUBJECT, "/O=company/CN=x\n")]),
        p.encode_tlv([(p.Tag.SUBJECT, "no-slash")]),
        p.encode_tlv([(p.Tag.SUBJECT, "/CN=" + "x" * 2000)]),
        p.encode_tlv([(p.Tag.SUBJECT, b"/CN=\xff\xfe")]),
        p.encode_tlv([(p.Tag.SUBJECT, "/O=company/CN=x"), (p.Tag.KEY_NAME, "../../etc/passwd")]),
        b"\x10\x00",
    ],
    ids=["newline", "no-slash", "long", "not-utf8", "path-key-name", "truncated"],
)
def test_the_agent_refuses_hostile_key_requests(agent: Agent, payload: bytes) -> None:
    reply = agent.handle(p.Message(p.MsgType.GEN_KEY_CSR, 1, payload))
    assert reply.type == p.MsgType.ERROR
    error = p.board_error(reply.payload)
    assert error.error_code in {
        p.ErrorCode.BAD_REQUEST,
        p.ErrorCode.INVALID_ARGUMENT,
        p.ErrorCode.KEYGEN_FAILED,
    }
    assert not list((agent.config.key_dir).glob("*.key"))


@pytest.fixture(scope="module")
def board() -> Iterator[SimulatedBoard]:
    """The real Agent.serve loop (thread mode) behind a pty pair, at full pty speed."""
    with SimulatedBoard(mode="thread", baudrate=None, hardware_id="FUZZ-BOARD") as sim:
        yield sim


@fuzz(30)
@given(junk=garbage)
def test_the_agent_serves_a_good_request_after_garbage(board: SimulatedBoard, junk: bytes) -> None:
    port = serial.serial_for_url(board.port, timeout=0.05)
    try:
        link = Link(port)
        link.write(junk)
        reply = link.request(p.MsgType.HELLO, timeout=2.0, retries=2)
        assert p.Fields.decode(reply.payload).get_str(p.Tag.HARDWARE_ID) == "FUZZ-BOARD"
    finally:
        port.close()


def test_the_agent_answers_an_unsupported_version_and_keeps_serving(board: SimulatedBoard) -> None:
    port = serial.serial_for_url(board.port, timeout=0.05)
    try:
        link = Link(port)
        raw = p.frame_bytes(p.Frame(p.MsgType.HELLO, 77, b"", version=9))
        link.write(b"\x00" + p.cobs_encode(raw) + b"\x00")
        deadline = time.monotonic() + 5
        while True:
            reply = link.receive(max(0.0, deadline - time.monotonic()))
            assert reply is not None, "no answer to a version-9 HELLO"
            if reply.seq == 77:
                break
        assert reply.type == p.MsgType.ERROR
        assert p.board_error(reply.payload).error_code == p.ErrorCode.UNSUPPORTED_VERSION
        assert link.request(p.MsgType.STATUS, timeout=2.0, retries=1).type == p.MsgType.STATUS_OK
    finally:
        port.close()


def test_os_pty_is_available() -> None:
    """The board fixture needs ptys; say so plainly if a sandbox has none."""
    master, slave = os.openpty()
    os.close(master)
    os.close(slave)


def _assert_request_times_out(
    request: Callable[[], object], master: int, close: Callable[[], None]
) -> None:
    """``request`` to a board whose side of the pty (``master``) is never read must end
    in p.Timeout within 20 s, not block in write(); then master is closed and ``close``."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            request()
        except BaseException as exc:  # any outcome is recorded and checked below
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    try:
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), "the request still blocks in write()"
        assert len(outcome) == 1 and isinstance(outcome[0], p.Timeout), outcome
    finally:
        os.close(master)  # unblocks a stuck write, so the thread ends either way
        worker.join(5)
        close()


def test_a_request_to_a_board_that_never_reads_ends_in_timeout() -> None:
    """A board whose agent stopped reading: the request's bytes fill the pty and the
    retries' writes used to block forever (no write timeout), past every request timeout."""
    master, slave = os.openpty()
    tty.setraw(slave)
    port = serial.Serial(os.ttyname(slave), baudrate=921600, timeout=0.05)
    os.close(slave)
    # Four attempts of 6 kB: more than a pty holds (about 16 kB here).
    chain = p.encode_tlv([(p.Tag.CHAIN, b"A" * 6000)])
    _assert_request_times_out(
        lambda: Link(port).request(p.MsgType.PUT_CHAIN, chain, timeout=0.2, retries=3),
        master,
        port.close,
    )


def test_the_agent_survives_a_station_that_stops_reading(tmp_path: Path) -> None:
    """The station sends requests but reads no replies until the pty is full: the agent's
    write times out (Link's write_timeout); it must keep serving, not die."""
    master, slave = os.openpty()
    tty.setraw(slave)
    board_port = serial.Serial(os.ttyname(slave), timeout=0.05)
    os.close(slave)
    agent = Agent(AgentConfig(key_dir=tmp_path / "keys", hardware_id="DEAF-STATION"))
    stop = threading.Event()
    died: list[BaseException] = []

    def serve() -> None:
        try:
            agent.serve(board_port, stop)
        except BaseException as exc:  # recorded: the agent must not end this way
            died.append(exc)

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    try:
        # STATUS replies are ~250 bytes: 200 of them overflow the pty while nobody reads.
        for seq in range(200):
            os.write(master, p.encode_message(p.Message(p.MsgType.STATUS, seq)))
        # Past the agent's first write timeout (5 s): a dropped reply, or a dead agent.
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline and worker.is_alive():
            time.sleep(0.2)
        assert worker.is_alive(), f"the agent stopped serving: {died!r}"
        # The station reads again: everything queued, then a fresh HELLO is answered.
        decoder = p.MessageDecoder()
        os.write(master, p.encode_message(p.Message(p.MsgType.HELLO, 4242)))
        answered = False
        end = time.monotonic() + 15
        while time.monotonic() < end and not answered:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                decoder.feed(os.read(master, 65536))
                answered = any(
                    isinstance(m, p.Message) and m.seq == 4242 and m.type == p.MsgType.HELLO_OK
                    for m in drain(decoder)
                )
        assert answered, "no answer to a HELLO once the station reads again"
    finally:
        stop.set()
        worker.join(10)
        board_port.close()
        os.close(master)


def test_the_stations_own_port_to_a_board_that_never_reads_ends_in_timeout() -> None:
    """The same through open_port_client, which the line uses: its byte-counting
    wrapper hid pyserial's write_timeout from the link, so the line's writes had none."""
    from station.line.driver import open_port_client

    master, slave = os.openpty()
    tty.setraw(slave)
    client = open_port_client(os.ttyname(slave), timeouts={p.MsgType.PUT_CHAIN: 0.2}, retries=3)
    os.close(slave)
    # Four attempts: more than a pty buffers.
    _assert_request_times_out(lambda: client.put_chain(b"A" * 60_000), master, client.close)
