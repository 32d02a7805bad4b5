"""The serial codec: COBS, frames, CRC, chunking, TLV, resync, golden vectors."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pytest
import reedsolo
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_hooks.protocol import (
    FLAG_MORE,
    HEADER,
    MAX_ENCODED_FRAME,
    MAX_MESSAGE,
    MAX_PAYLOAD,
    REQUEST_TYPES,
    BadCrc,
    BadFrame,
    BadPayload,
    BoardError,
    ErrorCode,
    Fields,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    Message,
    MessageDecoder,
    MsgType,
    OffsetReassembler,
    ProtocolError,
    Reassembler,
    Tag,
    UnsupportedVersion,
    ack_body,
    board_error,
    cobs_decode,
    cobs_encode,
    decode_frame,
    encode_frame,
    encode_message,
    encode_tlv,
    error_payload,
    frame_bytes,
    response_type,
    split_message,
    v2_ack,
    v2_data_frame,
    v2_nak,
)

VECTORS = Path(__file__).parent / "vectors" / "serial"


# --------------------------------------------------------------------------- references
# Written apart from the codec, byte by byte, as a C programmer would.


def reference_crc32(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def reference_cobs_encode(data: bytes) -> bytes:
    out = bytearray([0])
    code_index, code = 0, 1
    for byte in data:
        if code == 0xFF:
            out[code_index] = code
            code_index, code = len(out), 1
            out.append(0)
        if byte == 0:
            out[code_index] = code
            code_index, code = len(out), 1
            out.append(0)
        else:
            out.append(byte)
            code += 1
    out[code_index] = code
    return bytes(out)


# --------------------------------------------------------------------------- COBS

# The examples of the COBS article (Cheshire & Baker; Wikipedia "Consistent Overhead
# Byte Stuffing"), without the trailing delimiter.
COBS_EXAMPLES = [
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255))),
    (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255))),
    (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
    (bytes(range(2, 256)) + b"\x00", b"\xff" + bytes(range(2, 256)) + b"\x01\x01"),
    (bytes(range(3, 256)) + b"\x00\x01", b"\xfe" + bytes(range(3, 256)) + b"\x02\x01"),
]


@pytest.mark.parametrize(("decoded", "encoded"), COBS_EXAMPLES)
def test_cobs_matches_the_published_examples(decoded: bytes, encoded: bytes) -> None:
    assert cobs_encode(decoded) == encoded
    assert cobs_decode(encoded) == decoded


@settings(deadline=None)
@given(st.binary(max_size=3000))
def test_cobs_round_trips_and_never_emits_zero(data: bytes) -> None:
    encoded = cobs_encode(data)
    assert 0 not in encoded
    assert encoded == reference_cobs_encode(data)
    assert cobs_decode(encoded) == data
    assert len(encoded) <= len(data) + 1 + len(data) // 254


@pytest.mark.parametrize(
    "bad",
    [b"", b"\x05\x11\x22", b"\x03\x11\x00", b"\x02\x11\x00\x01"],
    ids=["empty", "block-past-end", "zero-in-block", "zero-code"],
)
def test_malformed_cobs_is_a_bad_frame(bad: bytes) -> None:
    with pytest.raises(BadFrame):
        cobs_decode(bad)


# --------------------------------------------------------------------------- CRC and frames


def test_crc_is_the_ieee_crc32_with_its_check_value() -> None:
    assert zlib.crc32(b"123456789") == reference_crc32(b"123456789") == 0xCBF43926


def test_frame_layout_is_header_payload_crc_big_endian() -> None:
    raw = frame_bytes(Frame(MsgType.PROVE, 0x1234, b"\xaa\xbb", FLAG_MORE, 3))
    assert raw[:8] == bytes([1, 0x05, 0x12, 0x34, 0x01, 0x03, 0x00, 0x02])
    assert raw[8:10] == b"\xaa\xbb"
    assert raw[10:] == struct.pack(">I", reference_crc32(raw[:10]))


frames = st.builds(
    Frame,
    type=st.integers(0, 255),
    seq=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=MAX_PAYLOAD),
    flags=st.integers(0, 255),
    fragment=st.integers(0, 255),
)


@settings(deadline=None)
@given(frames)
def test_frames_round_trip(frame: Frame) -> None:
    wire = encode_frame(frame)
    assert wire[0] == 0 and wire[-1] == 0 and 0 not in wire[1:-1]
    assert len(wire) - 2 <= MAX_ENCODED_FRAME
    assert decode_frame(wire[1:-1]) == frame


def test_a_payload_above_the_maximum_is_refused_when_encoding() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame(Frame(MsgType.PUT_CHAIN, 1, bytes(MAX_PAYLOAD + 1)))


def _cobs_of(raw: bytes) -> bytes:
    return cobs_encode(raw)


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


def test_a_flipped_bit_is_a_bad_crc() -> None:
    raw = bytearray(frame_bytes(Frame(MsgType.HELLO, 7, b"hello")))
    raw[9] ^= 0x10
    with pytest.raises(BadCrc):
        decode_frame(_cobs_of(bytes(raw)))


def test_a_frame_shorter_than_header_and_crc_is_a_bad_frame() -> None:
    with pytest.raises(BadFrame):
        decode_frame(_cobs_of(b"\x01\x01\x00\x01\x00"))


def test_a_length_field_that_disagrees_with_the_frame_is_a_bad_frame() -> None:
    body = HEADER.pack(1, MsgType.HELLO, 1, 0, 0, 5) + b"abc"
    with pytest.raises(BadFrame):
        decode_frame(_cobs_of(_with_crc(body)))


def test_a_length_field_above_the_maximum_is_frame_too_large() -> None:
    body = HEADER.pack(1, MsgType.HELLO, 1, 0, 0, MAX_PAYLOAD + 1) + b"abc"
    with pytest.raises(FrameTooLarge):
        decode_frame(_cobs_of(_with_crc(body)))


def test_an_encoded_frame_above_the_maximum_is_frame_too_large() -> None:
    with pytest.raises(FrameTooLarge):
        decode_frame(b"\x01" * (MAX_ENCODED_FRAME + 1))


def test_another_version_with_a_good_crc_is_unsupported_version() -> None:
    raw = frame_bytes(Frame(MsgType.HELLO, 0x4242, b"", version=4))
    with pytest.raises(UnsupportedVersion) as caught:
        decode_frame(_cobs_of(raw))
    assert (caught.value.version, caught.value.seq, caught.value.msg_type) == (4, 0x4242, 1)


# --------------------------------------------------------------------------- streaming decoder


def _drain(decoder: FrameDecoder) -> list[Frame | ProtocolError]:
    return list(decoder.frames())


def test_garbage_before_a_frame_is_dropped_and_the_frame_survives() -> None:
    frame = Frame(MsgType.STATUS, 9, b"")
    decoder = FrameDecoder()
    decoder.feed(b"\x13\x37garbage" + encode_frame(frame))
    results = _drain(decoder)
    assert isinstance(results[0], ProtocolError)
    assert results[-1] == frame


def test_a_frame_cut_in_pieces_comes_out_whole() -> None:
    frame = Frame(MsgType.PROVE, 1, bytes(range(200)))
    wire = encode_frame(frame)
    decoder = FrameDecoder()
    out = []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        out += _drain(decoder)
    assert out == [frame]


def test_a_run_without_delimiter_is_frame_too_large_once_then_resyncs() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x01" * (MAX_ENCODED_FRAME + 10))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    decoder.feed(b"\x01" * 5000)
    assert decoder.next_frame() is None  # still inside the oversized chunk: dropped silently
    assert decoder.buffered == 0
    frame = Frame(MsgType.HELLO, 3, b"")
    decoder.feed(b"\x01\x02" + encode_frame(frame))
    assert _drain(decoder) == [frame]


def test_empty_chunks_between_delimiters_are_ignored() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00" * 10)
    assert decoder.next_frame() is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4000))
def test_random_garbage_raises_only_protocol_errors(garbage: bytes) -> None:
    decoder = MessageDecoder()
    decoder.feed(garbage)
    for _ in range(len(garbage) + 2):
        try:
            if decoder.next_message() is None:
                break
        except ProtocolError:
            continue
    message = Message(MsgType.HELLO, 77, b"after the noise")
    decoder.feed(encode_message(message))
    recovered = []
    for _ in range(10):
        try:
            got = decoder.next_message()
        except ProtocolError:
            continue
        if got is None:
            break
        recovered.append(got)
    assert recovered[-1] == message


# --------------------------------------------------------------------------- messages


@given(
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.binary(max_size=5 * MAX_PAYLOAD + 17),
    st.integers(1, 700),
)
@settings(max_examples=60, deadline=None)
def test_messages_of_any_size_round_trip_through_chunks(
    msg_type: int, seq: int, payload: bytes, piece: int
) -> None:
    message = Message(msg_type, seq, payload)
    parts = split_message(message)
    assert len(parts) == max(1, -(-len(payload) // MAX_PAYLOAD))
    assert [p.fragment for p in parts] == list(range(len(parts)))
    assert all(p.more for p in parts[:-1]) and not parts[-1].more
    wire = encode_message(message)
    decoder = MessageDecoder()
    got = []
    for i in range(0, len(wire), piece):
        decoder.feed(wire[i : i + piece])
        while (m := decoder.next_message()) is not None:
            got.append(m)
    assert got == [message]


def test_a_message_above_the_maximum_is_refused() -> None:
    with pytest.raises(FrameTooLarge):
        split_message(Message(MsgType.PUT_CHAIN, 1, bytes(MAX_MESSAGE + 1)))


def test_a_missing_fragment_drops_the_message() -> None:
    frames = split_message(Message(MsgType.PUT_CHAIN, 5, bytes(3 * MAX_PAYLOAD)))
    reassembler = Reassembler()
    assert reassembler.add(frames[0]) is None
    with pytest.raises(BadFrame):
        reassembler.add(frames[2])
    # the next complete message still comes through
    single = Frame(MsgType.HELLO, 6, b"")
    assert reassembler.add(single) == Message(MsgType.HELLO, 6, b"")


def test_a_fragment_of_another_sequence_number_is_a_bad_frame() -> None:
    reassembler = Reassembler()
    reassembler.add(Frame(MsgType.PUT_CHAIN, 1, b"a", FLAG_MORE, 0))
    with pytest.raises(BadFrame):
        reassembler.add(Frame(MsgType.PUT_CHAIN, 2, b"b", 0, 1))


def test_a_new_first_fragment_restarts_reassembly() -> None:
    reassembler = Reassembler()
    reassembler.add(Frame(MsgType.PUT_CHAIN, 1, b"a", FLAG_MORE, 0))
    assert reassembler.add(Frame(MsgType.PUT_CHAIN, 2, b"b", 0, 0)) == Message(
        MsgType.PUT_CHAIN, 2, b"b"
    )


def test_responses_are_requests_with_bit_7() -> None:
    for request in REQUEST_TYPES:
        assert MsgType(response_type(request)).name == request.name + "_OK"
    assert {MsgType.ACK, MsgType.NAK}.isdisjoint(REQUEST_TYPES)  # link control, never answered


# --------------------------------------------------------------------------- TLV


def test_tlv_layout_is_tag_length_value() -> None:
    assert encode_tlv([(Tag.KEY_NAME, "ab"), (Tag.ALGORITHM, 4097), (Tag.NONCE, b"\x00")]) == (
        b"\x11\x00\x02ab" + b"\x14\x00\x02\x10\x01" + b"\x17\x00\x01\x00"
    )


@settings(deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=10))
def test_tlv_round_trips(items: list[tuple[int, bytes]]) -> None:
    assert Fields.decode(encode_tlv(items)).items == tuple(items)


def test_tlv_readers_take_the_first_and_all_repeated_fields() -> None:
    fields = Fields.decode(
        encode_tlv([(Tag.CAPABILITY, "a"), (Tag.CAPABILITY, "b"), (Tag.ALGORITHM, 7), (0xEE, b"?")])
    )
    assert fields.get_str(Tag.CAPABILITY) == "a"
    assert fields.get_all_str(Tag.CAPABILITY) == ["a", "b"]
    assert fields.get_u16(Tag.ALGORITHM) == 7
    assert fields.get_u16(Tag.SUBJECT, 4097) == 4097
    assert fields.get_str(Tag.KEY_NAME, "deviceCert") == "deviceCert"


@pytest.mark.parametrize(
    "payload",
    [b"\x11", b"\x11\x00", b"\x11\x00\x05ab"],
    ids=["tag-only", "half-length", "value-short"],
)
def test_truncated_tlv_is_a_bad_payload(payload: bytes) -> None:
    with pytest.raises(BadPayload):
        Fields.decode(payload)


def test_a_missing_required_field_is_a_bad_payload() -> None:
    with pytest.raises(BadPayload, match="SUBJECT"):
        Fields.decode(b"").get_str(Tag.SUBJECT)


def test_a_non_utf8_text_field_is_a_bad_payload() -> None:
    with pytest.raises(BadPayload):
        Fields.decode(encode_tlv([(Tag.SUBJECT, b"\xff\xfe")])).get_str(Tag.SUBJECT)


def test_a_u16_field_of_the_wrong_size_is_a_bad_payload() -> None:
    with pytest.raises(BadPayload):
        Fields.decode(encode_tlv([(Tag.ALGORITHM, b"\x01")])).get_u16(Tag.ALGORITHM)


def test_tlv_refuses_bools_and_oversized_values() -> None:
    with pytest.raises(TypeError):
        encode_tlv([(Tag.ALGORITHM, True)])
    with pytest.raises(ValueError):
        encode_tlv([(Tag.CHAIN, bytes(0x10000))])


def test_an_error_payload_becomes_a_board_error_with_its_code() -> None:
    error = board_error(error_payload(ErrorCode.KEY_NAME_TOO_LONG, "too long"))
    assert isinstance(error, BoardError) and isinstance(error, ProtocolError)
    assert (error.error_code, error.message) == (ErrorCode.KEY_NAME_TOO_LONG, "too long")
    assert "KEY_NAME_TOO_LONG" in str(error)
    assert "code 999" in str(BoardError(999, "?"))


def test_every_failure_is_a_protocol_error() -> None:
    import firmware_hooks.protocol as protocol

    names = [
        "BadFrame",
        "BadCrc",
        "FrameTooLarge",
        "UnsupportedVersion",
        "BadPayload",
        "Timeout",
        "UnexpectedReply",
        "Disconnected",
        "BoardError",
    ]
    assert all(issubclass(getattr(protocol, name), ProtocolError) for name in names)
    assert len({getattr(protocol, name) for name in names}) == len(names)


# --------------------------------------------------------------------------- golden vectors


def _golden(name: str) -> list[bytes]:
    lines = (VECTORS / f"{name}.hex").read_text().splitlines()
    return [bytes.fromhex(line) for line in lines if line.strip() and not line.startswith("#")]


GOLDEN = {
    "hello-request": Message(MsgType.HELLO, 0x0001, b""),
    "hello-response": Message(
        MsgType.HELLO_OK,
        0x0001,
        encode_tlv(
            [
                (Tag.HARDWARE_ID, "ARTIK-0001"),
                (Tag.AGENT_VERSION, "1.0.0"),
                (Tag.CAPABILITY, "board-ecc"),
                (Tag.CAPABILITY, "see-rsa"),
            ]
        ),
    ),
    "prove-request": Message(MsgType.PROVE, 0x1234, encode_tlv([(Tag.NONCE, bytes(range(16)))])),
    "error-response": Message(
        MsgType.ERROR,
        0x0102,
        encode_tlv([(Tag.ERROR_CODE, 6), (Tag.ERROR_MESSAGE, "key name too long")]),
    ),
    "put-chain-chunked": Message(
        MsgType.PUT_CHAIN, 0xFFFE, encode_tlv([(Tag.CHAIN, bytes(range(256)) * 5)])
    ),
    # Field renewal (section 6d of the spec).
    "renew-key-csr-request": Message(
        MsgType.RENEW_KEY_CSR,
        0x0010,
        encode_tlv(
            [
                (Tag.EXPECTED_ID, "ARTIK-0001"),
                (Tag.SUBJECT, "/O=company/OU=team/CN=ARTIK-0001/C=US"),
            ]
        ),
    ),
    "renew-commit-response": Message(
        MsgType.RENEW_COMMIT_OK, 0x0014, encode_tlv([(Tag.DIGEST, bytes(range(32)))])
    ),
}


# Version 2 (section 6a of the spec): frames, not messages, since pieces are sized
# by the sender. HELLO is always version 1; it offers and chooses version 2.
V2_CHAIN = encode_tlv([(Tag.CHAIN, bytes(range(256)) + b"A" * 41)])  # 300 bytes
GOLDEN_V2: dict[str, list[Frame]] = {
    "v2-hello-request": split_message(
        Message(MsgType.HELLO, 0x0001, encode_tlv([(Tag.PROTOCOL_VERSIONS, 2)]))
    ),
    "v2-hello-response": split_message(
        Message(
            MsgType.HELLO_OK,
            0x0001,
            encode_tlv(
                [
                    (Tag.HARDWARE_ID, "ARTIK-0001"),
                    (Tag.AGENT_VERSION, "1.0.0"),
                    (Tag.CAPABILITY, "board-ecc"),
                    (Tag.PROTOCOL_VERSION, 2),
                ]
            ),
        )
    ),
    "v2-status-request": [v2_data_frame(MsgType.STATUS, 0x0002, 0, b"", more=False)],
    # Every request after HELLO names the board it is meant for; ABORT too.
    "v2-abort-request": [
        v2_data_frame(
            MsgType.ABORT, 0x0005, 0, encode_tlv([(Tag.EXPECTED_ID, "ARTIK-0001")]), more=False
        )
    ],
    "v2-put-chain-pieces": [
        v2_data_frame(MsgType.PUT_CHAIN, 0x0003, offset, piece, more=offset + 100 < 300)
        for offset in (0, 100, 200)
        for piece in [
            encode_tlv([(Tag.CHAIN, bytes(range(256)) + b"A" * 41)])[offset : offset + 100]
        ]
    ],
    "v2-ack": [v2_ack(MsgType.PUT_CHAIN, 0x0003, 200)],
    "v2-nak": [v2_nak()],
    # HELLO is version 1 in every version: this one chooses version 3.
    "v3-hello-response": split_message(
        Message(
            MsgType.HELLO_OK,
            0x0001,
            encode_tlv(
                [
                    (Tag.HARDWARE_ID, "ARTIK-0001"),
                    (Tag.AGENT_VERSION, "1.0.0"),
                    (Tag.CAPABILITY, "board-ecc"),
                    (Tag.PROTOCOL_VERSION, 3),
                ]
            ),
        )
    ),
}

# Version 3 (section 6c): version 2 frames with Reed-Solomon parity after the CRC.
GOLDEN_V3: dict[str, list[Frame]] = {
    "v3-status-request": [v2_data_frame(MsgType.STATUS, 0x0002, 0, b"", more=False, version=3)],
    "v3-put-chain-piece": [
        # 300 bytes in one piece: 8 + 4 + 300 + 4 = 316 data bytes, two blocks
        # (247 + 8 parity, 69 + 4 parity).
        v2_data_frame(MsgType.PUT_CHAIN, 0x0003, 0, V2_CHAIN, more=False, version=3)
    ],
    "v3-ack": [v2_ack(MsgType.PUT_CHAIN, 0x0003, 300, 3)],
    "v3-nak": [v2_nak(version=3)],
}


def test_every_vector_file_is_checked() -> None:
    assert {p.stem for p in VECTORS.glob("*.hex")} == set(GOLDEN) | set(GOLDEN_V2) | set(GOLDEN_V3)


@pytest.mark.parametrize("name", sorted(GOLDEN_V3))
def test_v3_golden_vector_encodes_and_decodes(name: str) -> None:
    stored = _golden(name)
    assert [encode_frame(f) for f in GOLDEN_V3[name]] == stored
    assert [decode_frame(wire[1:-1]) for wire in stored] == GOLDEN_V3[name]
    for wire, frame in zip(stored, GOLDEN_V3[name], strict=True):
        raw = cobs_decode(wire[1:-1])
        assert reference_cobs_encode(raw) == wire[1:-1]
        data = frame_bytes(frame)  # the version 2 layout, then the parity of each block
        assert raw[: len(data)] == data
        assert struct.unpack(">I", data[-4:])[0] == reference_crc32(data[:-4])
        parity, at = raw[len(data) :], 0
        for start in range(0, len(data), 247):
            block = data[start : start + 247]
            codec = reedsolo.RSCodec(2 * -(-len(block) // 64))  # two per started 64 bytes
            expected = bytes(codec.encode(block)[len(block) :])
            assert parity[at : at + len(expected)] == expected
            at += len(expected)
        assert at == len(parity)


@pytest.mark.parametrize("name", sorted(GOLDEN_V3))
def test_a_v3_frame_with_damaged_bytes_in_every_block_decodes_whole(name: str) -> None:
    rng = random.Random(name)
    for wire, frame in zip(_golden(name), GOLDEN_V3[name], strict=True):
        raw = bytearray(cobs_decode(wire[1:-1]))
        # Up to the parity's capacity in each block; a damaged byte never becomes 00
        # here (that cuts the frame in two: a NAK and a resend, section 6a).
        data_len = len(frame_bytes(frame))
        blocks = [(s, min(247, data_len - s)) for s in range(0, data_len, 247)]
        for start, size in blocks:
            for pos in rng.sample(range(start, start + size), min(size, (2 * -(-size // 64)) // 2)):
                raw[pos] ^= rng.randrange(1, 256)
        assert decode_frame(cobs_encode(bytes(raw))) == frame


def test_a_v3_frame_damaged_past_its_parity_is_a_bad_frame_never_another_frame() -> None:
    (wire,) = _golden("v3-ack")
    raw = bytearray(cobs_decode(wire[1:-1]))  # 17 data bytes, 2 parity: one byte is fixable
    raw[3] ^= 0x10
    raw[9] ^= 0x22
    with pytest.raises(ProtocolError):
        decode_frame(cobs_encode(bytes(raw)))


def test_a_v3_frame_whose_version_byte_is_damaged_is_corrected() -> None:
    (wire,) = _golden("v3-status-request")
    raw = bytearray(cobs_decode(wire[1:-1]))
    raw[0] = 0x01  # now it claims version 1, and fails version 1's CRC check
    assert decode_frame(cobs_encode(bytes(raw))) == GOLDEN_V3["v3-status-request"][0]


@pytest.mark.parametrize("name", sorted(GOLDEN_V2))
def test_v2_golden_vector_encodes_and_decodes(name: str) -> None:
    stored = _golden(name)
    assert [encode_frame(f) for f in GOLDEN_V2[name]] == stored
    assert [decode_frame(wire[1:-1]) for wire in stored] == GOLDEN_V2[name]
    for wire in stored:
        raw = cobs_decode(wire[1:-1])
        assert reference_cobs_encode(raw) == wire[1:-1]
        assert struct.unpack(">I", raw[-4:])[0] == reference_crc32(raw[:-4])


def test_v2_put_chain_pieces_reassemble_by_offset_and_are_acknowledged() -> None:
    reassembler = OffsetReassembler()
    frames = GOLDEN_V2["v2-put-chain-pieces"]
    acks = [reassembler.add(f) for f in [frames[0], frames[1], frames[1], frames[2]]]
    assert [ack_body(r.ack) for r in acks] == [(0x04, 100), (0x04, 200), (0x04, 200), (0x04, 300)]
    message = acks[-1].message
    assert message is not None and message.version == 2
    assert Fields.decode(message.payload).get_bytes(Tag.CHAIN) == bytes(range(256)) + b"A" * 41
    assert reassembler.add(frames[2]).repeat  # a repeat of the finished message
    assert ack_body(GOLDEN_V2["v2-ack"][0]) == (0x04, 200)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_vector_encodes_to_the_stored_bytes(name: str) -> None:
    stored = _golden(name)
    assert [encode_frame(f) for f in split_message(GOLDEN[name])] == stored


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_vector_decodes_to_the_message(name: str) -> None:
    decoder = MessageDecoder()
    decoder.feed(b"".join(_golden(name)))
    assert decoder.next_message() == GOLDEN[name]
    assert decoder.next_message() is None


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_vector_agrees_with_the_reference_cobs_and_crc(name: str) -> None:
    for wire in _golden(name):
        raw = cobs_decode(wire[1:-1])
        assert reference_cobs_encode(raw) == wire[1:-1]
        assert struct.unpack(">I", raw[-4:])[0] == reference_crc32(raw[:-4])


def test_the_worked_example_of_the_spec_is_the_hello_vector() -> None:
    spec = (Path(__file__).parent.parent / "docs" / "serial-protocol.md").read_text()
    for name in ("hello-request", "hello-response"):
        (wire,) = _golden(name)
        assert wire.hex(" ") in spec


def test_a_v2_frame_with_one_damaged_byte_is_lost_version_2_has_no_parity() -> None:
    (wire,) = _golden("v2-status-request")
    raw = bytearray(cobs_decode(wire[1:-1]))
    raw[5] ^= 0x10
    with pytest.raises(BadCrc):
        decode_frame(cobs_encode(bytes(raw)))
