"""The request/response layer over a real pty, against a scripted far end."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import serial

from firmware_hooks.link import QUICK_RESENDS, Link
from firmware_hooks.protocol import (
    BadCrc,
    BoardError,
    Disconnected,
    ErrorCode,
    Frame,
    Message,
    MessageDecoder,
    MsgType,
    ProtocolError,
    Tag,
    Timeout,
    UnexpectedReply,
    UnsupportedVersion,
    cobs_decode,
    encode_frame,
    encode_message,
    encode_tlv,
    error_payload,
    frame_bytes,
    v2_ack,
    v2_data_frame,
)

Script = Callable[[Message, int], bytes]


class ScriptedPeer:
    """The far end of a pty: answers each request with what the script returns
    (given the request and how many times that sequence number was seen)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        self.requests: list[Message] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        decoder = MessageDecoder()
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                decoder.feed(os.read(self.master, 4096))
            except OSError:
                return
            while True:
                try:
                    request = decoder.next_message()
                except ProtocolError:
                    continue
                if request is None:
                    break
                self.requests.append(request)
                seen = sum(1 for r in self.requests if r.seq == request.seq)
                answer = self.script(request, seen)
                if answer:
                    os.write(self.master, answer)

    def hang_up(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self.master)

    def close(self) -> None:
        if not self._stop.is_set():
            self.hang_up()
        os.close(self.slave)


@pytest.fixture
def peer_link() -> Iterator[Callable[[Script], tuple[ScriptedPeer, Link]]]:
    opened: list[tuple[ScriptedPeer, serial.Serial]] = []

    def make(script: Script) -> tuple[ScriptedPeer, Link]:
        peer = ScriptedPeer(script)
        port = serial.Serial(peer.path, 115200, timeout=0.05)
        opened.append((peer, port))
        return peer, Link(port)

    yield make
    for peer, port in opened:
        port.close()
        peer.close()


def ok(request: Message, payload: bytes = b"") -> bytes:
    return encode_message(Message(request.type | 0x80, request.seq, payload))


def test_the_reply_with_the_request_sequence_number_is_returned(peer_link) -> None:
    def script(request: Message, seen: int) -> bytes:
        stale = encode_message(Message(MsgType.HELLO_OK, (request.seq - 1) & 0xFFFF, b"old"))
        return stale + ok(request, b"new")

    _, link = peer_link(script)
    reply = link.request(MsgType.HELLO, timeout=1.0)
    assert reply.payload == b"new"


def test_sequence_numbers_advance_and_wrap(peer_link) -> None:
    peer, link = peer_link(lambda request, seen: ok(request))
    link._seq = 0xFFFE
    for _ in range(3):
        link.request(MsgType.STATUS, timeout=1.0)
    assert [r.seq for r in peer.requests] == [0xFFFF, 0x0000, 0x0001]


def test_silence_is_a_timeout_after_the_bounded_retries(peer_link) -> None:
    peer, link = peer_link(lambda request, seen: b"")
    started = time.monotonic()
    with pytest.raises(Timeout):
        link.request(MsgType.HELLO, timeout=0.2, retries=2)
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed < 1.5
    assert len(peer.requests) == 3
    assert len({r.seq for r in peer.requests}) == 1  # retries resend the same request


def test_a_lost_reply_is_recovered_by_a_retry(peer_link) -> None:
    peer, link = peer_link(lambda request, seen: ok(request, b"x") if seen >= 2 else b"")
    assert link.request(MsgType.PROVE, b"", timeout=0.2, retries=1).payload == b"x"
    assert len(peer.requests) == 2


def test_a_corrupted_reply_ends_in_a_timeout_caused_by_the_bad_crc(peer_link) -> None:
    def script(request: Message, seen: int) -> bytes:
        wire = bytearray(ok(request, b"payload"))
        wire[12] ^= 0x01
        return bytes(wire)

    _, link = peer_link(script)
    with pytest.raises(Timeout) as caught:
        link.request(MsgType.HELLO, timeout=0.2, retries=1)
    assert isinstance(caught.value.__cause__, BadCrc)
    # Each attempt: the request, then a quick resend after each damaged reply.
    assert link.bad_frames == 2 * (1 + QUICK_RESENDS)
    assert link.resends == 2 * QUICK_RESENDS


def test_a_damaged_reply_is_asked_for_again_at_once_not_after_the_timeout(peer_link) -> None:
    def script(request: Message, seen: int) -> bytes:
        wire = bytearray(ok(request, b"payload"))
        if seen <= 1:  # the first answer is damaged on the line
            wire[12] ^= 0x01
        return bytes(wire)

    _, link = peer_link(script)
    started = time.monotonic()
    reply = link.request(MsgType.HELLO, timeout=10.0, retries=0)
    assert reply.type == MsgType.HELLO_OK
    assert time.monotonic() - started < 2.0  # not the 10 s timeout
    assert link.bad_frames == 1 and link.resends == 1


def test_an_error_reply_is_a_board_error_and_is_not_retried(peer_link) -> None:
    def script(request: Message, seen: int) -> bytes:
        payload = error_payload(ErrorCode.BAD_STATE, "no key")
        return encode_message(Message(MsgType.ERROR, request.seq, payload))

    peer, link = peer_link(script)
    with pytest.raises(BoardError) as caught:
        link.request(MsgType.PROVE, timeout=1.0, retries=3)
    assert caught.value.error_code == ErrorCode.BAD_STATE
    assert len(peer.requests) == 1


def test_a_reply_of_the_wrong_type_is_unexpected(peer_link) -> None:
    _, link = peer_link(
        lambda request, seen: encode_message(Message(MsgType.STATUS_OK, request.seq))
    )
    with pytest.raises(UnexpectedReply):
        link.request(MsgType.HELLO, timeout=1.0)


def test_a_reply_in_another_protocol_version_is_unsupported(peer_link) -> None:
    def script(request: Message, seen: int) -> bytes:
        return encode_frame(Frame(MsgType.HELLO_OK, request.seq, b"", version=4))

    _, link = peer_link(script)
    with pytest.raises(UnsupportedVersion):
        link.request(MsgType.HELLO, timeout=1.0, retries=3)


def test_a_hung_up_line_is_disconnected(peer_link) -> None:
    peer, link = peer_link(lambda request, seen: b"")
    peer.hang_up()
    with pytest.raises(Disconnected):
        link.request(MsgType.HELLO, timeout=1.0)


def test_loop_url_echoes_the_request_which_is_unexpected() -> None:
    port = serial.serial_for_url("loop://", timeout=0.05)
    try:
        with pytest.raises(UnexpectedReply):
            Link(port).request(MsgType.HELLO, timeout=0.5)
    finally:
        port.close()


def test_a_large_message_crosses_the_pty_in_sized_reads(peer_link) -> None:
    big = os.urandom(200_000)
    _, link = peer_link(lambda request, seen: ok(request, request.payload[::-1]))
    started = time.monotonic()
    reply = link.request(MsgType.PUT_CHAIN, big, timeout=5.0)
    assert reply.payload == big[::-1]
    assert time.monotonic() - started < 3.0


def test_frame_bytes_of_a_request_are_what_the_peer_decodes(peer_link) -> None:
    peer, link = peer_link(lambda request, seen: ok(request))
    link.request(MsgType.ABORT, b"\x00\x01", timeout=1.0)
    (request,) = peer.requests
    assert frame_bytes(Frame(request.type, request.seq, request.payload))[:2] == b"\x01\x07"


def _damaged_once(wire: bytes) -> bytes:
    """``wire`` (one frame) with one byte flipped that COBS still decodes as one
    damaged byte: what a single corrupted byte on the cable usually does."""
    raw = cobs_decode(wire[1:-1])
    for at in range(len(wire) // 2, len(wire) - 1):
        damaged = bytearray(wire)
        damaged[at] ^= 0x5A
        if damaged[at] == 0:
            continue
        try:
            got = cobs_decode(bytes(damaged[1:-1]))
        except ProtocolError:
            continue
        if len(got) == len(raw) and sum(a != b for a, b in zip(got, raw, strict=True)) == 1:
            return bytes(damaged)
    raise AssertionError("no byte of this frame damages exactly one byte")


def test_version_3_repairs_a_damaged_reply_without_a_nak_or_a_resend(peer_link) -> None:
    answer = b"\x01\x00\x05ready"

    def script(request: Message, seen: int) -> bytes:
        if request.type != MsgType.STATUS:
            return b""  # the host's ACK of our reply
        reply = v2_data_frame(MsgType.STATUS | 0x80, request.seq, 0, answer, more=False, version=3)
        ack = encode_frame(v2_ack(MsgType.STATUS, request.seq, 0, 3))
        return _damaged_once(ack) + _damaged_once(encode_frame(reply))

    peer, link = peer_link(script)
    link.version = 3
    reply = link.request(MsgType.STATUS, timeout=2.0)
    assert reply.payload == answer and reply.version == 3
    assert (link.corrected_frames, link.bad_frames, link.resends) == (2, 0, 0)
    assert [r.type for r in peer.requests].count(MsgType.STATUS) == 1


def test_a_new_hello_after_a_version_3_board_sends_no_version_3_nak(peer_link) -> None:
    """The port's client outlives the board: after a version 3 board, a damaged
    HELLO_OK from the next board (maybe a version 1 one, which has no NAK) must not be
    answered with a version 3 NAK."""
    from firmware_hooks.host import BoardClient

    hello_ok = encode_tlv([(Tag.HARDWARE_ID, "BOARD2"), (Tag.AGENT_VERSION, "1.0.0")])

    def script(request: Message, seen: int) -> bytes:
        if request.type != MsgType.HELLO:
            return b""
        good = encode_message(Message(MsgType.HELLO_OK, request.seq, hello_ok))
        return _damaged_once(good) if seen == 1 else good

    peer, link = peer_link(script)
    client = BoardClient(link.port, retries=2, timeouts={MsgType.HELLO: 0.5})
    client.link.version = client.link.peer_version = 3  # the last board spoke version 3
    assert client.hello().hardware_id == "BOARD2"
    assert [r.version for r in peer.requests] == [1] * len(peer.requests)
    assert MsgType.NAK not in [r.type for r in peer.requests]
