"""The serial wire protocol: a pure codec (bytes in, frames and messages out, no I/O).

Layers, bottom up (the full specification is ``docs/serial-protocol.md``):

1. Framing: every frame is COBS-encoded and sent between 0x00 delimiters
   (``00 <cobs bytes> 00``), so a receiver resynchronises at the next 0x00
   after any garbage.
2. Frame: an 8-byte big-endian header (version, type, sequence number, flags,
   fragment index, payload length), at most ``MAX_PAYLOAD`` bytes of payload,
   and a CRC-32 (the zlib / IEEE 802.3 CRC) over header and payload.
3. Message: a payload larger than ``MAX_PAYLOAD`` is split into fragments that
   share type and sequence number; every fragment but the last has ``FLAG_MORE``.
4. Payload: a list of TLV fields (tag u8, length u16 big-endian, value).

Every decode failure raises its own subclass of ``ProtocolError``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum

from firmware_hooks import fec

PROTOCOL_VERSION = 1  # the version every HELLO is sent in, and the default
PROTOCOL_V2 = 2  # acknowledged fragments at byte offsets, negotiated in HELLO
PROTOCOL_V3 = 3  # version 2 with Reed-Solomon parity on every frame (firmware_hooks/fec.py)
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION, PROTOCOL_V2, PROTOCOL_V3})
DELIMITER = 0x00

HEADER = struct.Struct(">BBHBBH")  # version, type, seq, flags, fragment, length
HEADER_SIZE = HEADER.size  # 8
CRC = struct.Struct(">I")
CRC_SIZE = CRC.size  # 4
MAX_PAYLOAD = 1024
MAX_FRAGMENTS = 256
MAX_MESSAGE = MAX_PAYLOAD * MAX_FRAGMENTS  # 256 KiB
MAX_RAW_FRAME = HEADER_SIZE + MAX_PAYLOAD + CRC_SIZE  # 1036
# Version 3 appends Reed-Solomon parity: 4 full blocks of 247 + 8, then 48 + 2.
MAX_PROTECTED_FRAME = fec.protected_size(MAX_RAW_FRAME)  # 1070
# COBS adds one byte per started block of 254 bytes.
MAX_ENCODED_FRAME = MAX_PROTECTED_FRAME + (MAX_PROTECTED_FRAME + 253) // 254  # 1075

FLAG_MORE = 0x01
RESPONSE_BIT = 0x80

TLV_HEADER = struct.Struct(">BH")
MAX_TLV_VALUE = 0xFFFF


# --------------------------------------------------------------------------- errors


class ProtocolError(Exception):
    """Base of every error of the serial protocol, on either side of the line.

    Every subclass carries a stable reason ``code`` (kebab-case, what the station
    records for a board that fails with it) and a ``kind``, spelled as a value of
    the station's ``Kind`` (this package cannot import the station). An instance
    may narrow its code (``code=``), e.g. a timeout whose last error was a bad CRC."""

    code: str = "serial-protocol"
    kind: str = "bad-input"

    def __init__(self, *args: object, code: str | None = None) -> None:
        super().__init__(*args)
        if code is not None:
            self.code = code


class BadFrame(ProtocolError):
    """A delimited chunk is not a frame: bad COBS, too short, length mismatch."""


class BadCrc(ProtocolError):
    """A frame's CRC-32 does not match its header and payload."""

    code = "serial-crc"

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"CRC mismatch: frame says {expected:#010x}, computed {actual:#010x}")
        self.expected = expected
        self.actual = actual


class FrameTooLarge(ProtocolError):
    """More bytes than the largest legal frame arrived without a delimiter,
    a header announced a payload above MAX_PAYLOAD, or a message above MAX_MESSAGE."""


class UnsupportedVersion(ProtocolError):
    """A frame with a valid CRC carries a protocol version this side does not speak."""

    code = "unsupported-version"
    kind = "refused"

    def __init__(self, version: int, seq: int, msg_type: int) -> None:
        super().__init__(
            f"unsupported protocol version {version} (this side speaks "
            f"{', '.join(str(v) for v in sorted(SUPPORTED_VERSIONS))})"
        )
        self.version = version
        self.seq = seq
        self.msg_type = msg_type


class BadPayload(ProtocolError):
    """A message's payload is not well-formed TLV or lacks a required field."""


class Timeout(ProtocolError, TimeoutError):
    """No valid reply arrived in time (after all retries)."""

    code = "serial-timeout"
    kind = "unavailable"
    msg_type: int | None = None  # the request that went unanswered, when known
    attempts: int = 0


class UnexpectedReply(ProtocolError):
    """A valid frame arrived, but it is not an answer to the request sent."""

    code = "unexpected-reply"


class Disconnected(ProtocolError, ConnectionError):
    """The port went away (closed, unplugged, pty hung up)."""

    code = "disconnected"
    kind = "unavailable"


class BoardError(ProtocolError):
    """The board answered with an ERROR message; ``error_code`` is its ``ErrorCode``."""

    code = "board-error"
    kind = "refused"

    def __init__(self, error_code: int, message: str) -> None:
        try:
            name = ErrorCode(error_code).name
        except ValueError:
            name = f"code {error_code}"
        super().__init__(
            f"board error {name} ({error_code}): {message}",
            # Another board answers on the port than the one the host said HELLO to.
            code="board-changed" if error_code == ErrorCode.WRONG_BOARD else None,
        )
        self.error_code = error_code
        self.message = message


# --------------------------------------------------------------------------- vocabulary


class MsgType(IntEnum):
    """Message types. A response is its request's type with bit 7 set."""

    HELLO = 0x01
    GEN_KEY_CSR = 0x02
    PUT_SECURE_KEY = 0x03
    PUT_CHAIN = 0x04
    PROVE = 0x05
    STATUS = 0x06
    ABORT = 0x07
    # Field renewal of a provisioned board (capability "renew"): a new key and CSR
    # beside the live ones, then PUT_CHAIN and PROVE of the renewal, then the commit.
    RENEW_KEY_CSR = 0x08
    RENEW_COMMIT = 0x09

    HELLO_OK = 0x81
    GEN_KEY_CSR_OK = 0x82
    PUT_SECURE_KEY_OK = 0x83
    PUT_CHAIN_OK = 0x84
    PROVE_OK = 0x85
    STATUS_OK = 0x86
    ABORT_OK = 0x87
    RENEW_KEY_CSR_OK = 0x88
    RENEW_COMMIT_OK = 0x89

    # Version 2 link control: never answered, never part of a message.
    ACK = 0x70
    NAK = 0x71

    ERROR = 0xFF


CONTROL_TYPES = frozenset({MsgType.ACK, MsgType.NAK})
REQUEST_TYPES = frozenset(t for t in MsgType if t < RESPONSE_BIT) - CONTROL_TYPES


def response_type(request: int) -> int:
    """The type of the successful reply to a request type."""
    return request | RESPONSE_BIT


class Tag(IntEnum):
    """TLV field tags (one registry for all messages; see the spec for who sends which)."""

    HARDWARE_ID = 0x01  # utf-8
    AGENT_VERSION = 0x02  # utf-8
    CAPABILITY = 0x03  # utf-8, repeated
    PROTOCOL_VERSIONS = 0x04  # u16, repeated: the versions the host speaks (HELLO)
    PROTOCOL_VERSION = 0x05  # u16: the version the board chose (HELLO_OK)
    EXPECTED_ID = 0x06  # utf-8: the hardware id the host is talking to (every request)
    SUBJECT = 0x10  # utf-8, OpenSSL-style "/O=.../CN=..."
    KEY_NAME = 0x11  # utf-8
    CSR = 0x12  # DER
    KEY_DER = 0x13  # DER private key
    ALGORITHM = 0x14  # u16, ARTIK SE algorithm id (4097 = RSA-2048)
    CHAIN = 0x15  # PEM bytes
    DIGEST = 0x16  # 32 bytes, SHA-256
    NONCE = 0x17  # bytes
    SIGNATURE = 0x18  # bytes
    SIG_ALG = 0x19  # utf-8: "ecdsa-sha256" | "rsa-pkcs1v15-sha256"
    STATUS_ITEM = 0x20  # utf-8 "key=value", repeated
    ERROR_CODE = 0x30  # u16
    ERROR_MESSAGE = 0x31  # utf-8


class ErrorCode(IntEnum):
    """Codes of ERROR messages (u16). Stable: never renumbered."""

    BAD_REQUEST = 1  # payload malformed or a required field missing
    UNKNOWN_COMMAND = 2
    UNSUPPORTED_VERSION = 3
    BAD_STATE = 4  # e.g. PROVE before any key is installed
    INVALID_ARGUMENT = 5  # a field is present but its value is refused
    KEY_NAME_TOO_LONG = 6  # SE key names are at most 20 characters
    KEYGEN_FAILED = 7  # openssl failed to make the key or the CSR
    SEE_FAILED = 8  # see_test failed; message carries its exit code and output
    STORAGE_FAILED = 9  # writing to the key directory failed
    SIGN_FAILED = 10
    WRONG_BOARD = 11  # EXPECTED_ID names another board: refused, nothing done
    INTERNAL = 255


SIG_ECDSA_SHA256 = "ecdsa-sha256"
SIG_RSA_PKCS1V15_SHA256 = "rsa-pkcs1v15-sha256"


# --------------------------------------------------------------------------- COBS


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the result contains no 0x00 byte.

    Matches the reference encoder (a block of 254 non-zero bytes at the very
    end is not followed by an empty block)."""
    out = bytearray()
    pieces = data.split(b"\x00")
    last_index = len(pieces) - 1
    for index, piece in enumerate(pieces):
        start = 0
        while len(piece) - start >= 254:
            out.append(0xFF)
            out += piece[start : start + 254]
            start += 254
        rest = piece[start:]
        if index == last_index and start > 0 and not rest:
            break
        out.append(len(rest) + 1)
        out += rest
    return bytes(out)


def cobs_decode(encoded: bytes) -> bytes:
    """Inverse of ``cobs_encode``; raises BadFrame on malformed input."""
    out = bytearray()
    i = 0
    n = len(encoded)
    if n == 0:
        raise BadFrame("empty COBS data")
    while i < n:
        code = encoded[i]
        if code == 0:
            raise BadFrame(f"zero byte inside COBS data at offset {i}")
        i += 1
        end = i + code - 1
        if end > n:
            raise BadFrame(f"COBS block at offset {i - 1} runs past the end")
        block = encoded[i:end]
        if 0 in block:
            raise BadFrame("zero byte inside a COBS block")
        out += block
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class Frame:
    """One frame on the wire (one fragment of a message)."""

    type: int
    seq: int
    payload: bytes = b""
    flags: int = 0
    fragment: int = 0
    version: int = PROTOCOL_VERSION

    @property
    def more(self) -> bool:
        return bool(self.flags & FLAG_MORE)


def frame_bytes(frame: Frame) -> bytes:
    """Header + payload + CRC, before COBS (what the CRC and COBS are defined on)."""
    if len(frame.payload) > MAX_PAYLOAD:
        raise FrameTooLarge(f"payload of {len(frame.payload)} bytes > {MAX_PAYLOAD}")
    if not (0 <= frame.seq <= 0xFFFF):
        raise ValueError(f"sequence number {frame.seq} out of range 0..65535")
    header = HEADER.pack(
        frame.version, frame.type, frame.seq, frame.flags, frame.fragment, len(frame.payload)
    )
    body = header + frame.payload
    return body + CRC.pack(zlib.crc32(body))


def encode_frame(frame: Frame) -> bytes:
    """The exact bytes to write: ``00 COBS(header + payload + crc) 00``; in version 3
    ``00 COBS(header + payload + crc + parity) 00``."""
    raw = frame_bytes(frame)
    if frame.version == PROTOCOL_V3:
        raw = fec.protect(raw)
    return b"\x00" + cobs_encode(raw) + b"\x00"


def decode_frame(encoded: bytes) -> Frame:
    """Decode one frame from the bytes between two delimiters.

    Checks, in order: COBS, minimum size, CRC, version, length field. A frame that
    fails a check after COBS is tried as a damaged version 3 frame: corrected with
    its parity, it must then pass every check and say version 3."""
    return decode_frame_corrected(encoded)[0]


def decode_frame_corrected(encoded: bytes) -> tuple[Frame, bool]:
    """``decode_frame``, and whether the frame needed its parity (version 3)."""
    if len(encoded) > MAX_ENCODED_FRAME:
        raise FrameTooLarge(f"{len(encoded)} encoded bytes > {MAX_ENCODED_FRAME}")
    raw = cobs_decode(encoded)
    try:
        if raw[:1] == bytes([PROTOCOL_V3]):
            return _decode_v3(raw), False
        return _decode_raw(raw), False
    except UnsupportedVersion:
        raise
    except ProtocolError:
        corrected = _corrected_v3(raw)
        if corrected is None:
            raise
        return corrected, True


def _decode_v3(raw: bytes) -> Frame:
    """A version 3 frame as it came: the data before the parity, checked like any frame."""
    if len(raw) < HEADER_SIZE + CRC_SIZE:
        raise BadFrame(f"frame of {len(raw)} bytes is shorter than header and CRC")
    length = HEADER.unpack_from(raw)[-1]
    data_len = HEADER_SIZE + length + CRC_SIZE
    if fec.protected_size(data_len) != len(raw):
        raise BadFrame(f"version 3 frame of {len(raw)} bytes does not hold {length} payload bytes")
    return _decode_raw(raw[:data_len])


def _corrected_v3(raw: bytes) -> Frame | None:
    """The frame a damaged version 3 frame was, or None if its parity cannot tell."""
    try:
        data = fec.recover(raw)
    except fec.Uncorrectable:
        return None
    if data[:1] != bytes([PROTOCOL_V3]):
        return None
    try:
        return _decode_raw(data)
    except ProtocolError:
        return None


def _decode_raw(raw: bytes) -> Frame:
    """Header + payload + CRC: the checks every version shares."""
    if len(raw) < HEADER_SIZE + CRC_SIZE:
        raise BadFrame(f"frame of {len(raw)} bytes is shorter than header and CRC")
    body, (crc,) = raw[:-CRC_SIZE], CRC.unpack(raw[-CRC_SIZE:])
    actual = zlib.crc32(body)
    if crc != actual:
        raise BadCrc(crc, actual)
    version, msg_type, seq, flags, fragment, length = HEADER.unpack(body[:HEADER_SIZE])
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(version, seq, msg_type)
    if length > MAX_PAYLOAD:
        raise FrameTooLarge(f"header announces {length} payload bytes > {MAX_PAYLOAD}")
    payload = body[HEADER_SIZE:]
    if len(payload) != length:
        raise BadFrame(f"header announces {length} payload bytes, frame holds {len(payload)}")
    return Frame(msg_type, seq, payload, flags, fragment, version)


class FrameDecoder:
    """Streaming decoder: feed it bytes as they come, pull frames out.

    ``next_frame()`` returns the next complete frame, None when more bytes are
    needed, or raises a ProtocolError for a bad frame, which it has already
    dropped, so the caller simply calls it again. Garbage between frames is
    dropped up to the next delimiter; empty chunks (``00 00``) are ignored."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skipping = False  # inside an oversized chunk: drop to the next 0x00
        self.corrected = 0  # version 3 frames that arrived damaged and were corrected

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def reset(self) -> None:
        self._buffer.clear()
        self._skipping = False

    def next_frame(self) -> Frame | None:
        while True:
            end = self._buffer.find(DELIMITER)
            if end < 0:
                if not self._skipping and len(self._buffer) > MAX_ENCODED_FRAME:
                    self._buffer.clear()
                    self._skipping = True
                    raise FrameTooLarge(f"more than {MAX_ENCODED_FRAME} bytes without a delimiter")
                if self._skipping:
                    self._buffer.clear()
                return None
            chunk = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False
                continue
            if not chunk:
                continue
            frame, corrected = decode_frame_corrected(chunk)
            self.corrected += corrected
            return frame

    def frames(self) -> Iterator[Frame | ProtocolError]:
        """Every complete frame buffered so far; bad frames come out as exception objects."""
        while True:
            try:
                frame = self.next_frame()
            except ProtocolError as exc:
                yield exc
                continue
            if frame is None:
                return
            yield frame


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    """One request or response: a type, a sequence number and a (TLV) payload of any size."""

    type: int
    seq: int
    payload: bytes = b""
    version: int = PROTOCOL_VERSION  # the frames it came in (version 2: acknowledged)


def split_message(message: Message) -> list[Frame]:
    """Frames of a message: fragments of MAX_PAYLOAD bytes, FLAG_MORE on all but the last."""
    if len(message.payload) > MAX_MESSAGE:
        raise FrameTooLarge(f"message of {len(message.payload)} bytes > {MAX_MESSAGE}")
    chunks = [
        message.payload[i : i + MAX_PAYLOAD] for i in range(0, len(message.payload), MAX_PAYLOAD)
    ] or [b""]
    last = len(chunks) - 1
    return [
        Frame(message.type, message.seq, chunk, FLAG_MORE if i < last else 0, i)
        for i, chunk in enumerate(chunks)
    ]


def encode_message(message: Message) -> bytes:
    """The exact bytes to write for a whole message."""
    return b"".join(encode_frame(frame) for frame in split_message(message))


class Reassembler:
    """Joins fragments into messages; a fragment out of order drops the partial message."""

    def __init__(self) -> None:
        self._first: Frame | None = None
        self._parts: list[bytes] = []

    def add(self, frame: Frame) -> Message | None:
        if frame.fragment == 0:
            self._first, self._parts = None, []
            if not frame.more:
                return Message(frame.type, frame.seq, frame.payload)
            self._first, self._parts = frame, [frame.payload]
            return None
        first = self._first
        if (
            first is None
            or frame.type != first.type
            or frame.seq != first.seq
            or frame.fragment != len(self._parts)
        ):
            self._first, self._parts = None, []
            raise BadFrame(
                f"fragment {frame.fragment} of type {frame.type:#04x} seq {frame.seq} out of order"
            )
        self._parts.append(frame.payload)
        if frame.more:
            if len(self._parts) >= MAX_FRAGMENTS:
                self._first, self._parts = None, []
                raise FrameTooLarge(f"message of more than {MAX_FRAGMENTS} fragments")
            return None
        payload = b"".join(self._parts)
        self._first, self._parts = None, []
        return Message(first.type, first.seq, payload)


class MessageDecoder:
    """Streaming decoder for whole messages (frames + reassembly)."""

    def __init__(self) -> None:
        self.frames = FrameDecoder()
        self._reassembler = Reassembler()

    def feed(self, data: bytes) -> None:
        self.frames.feed(data)

    def add_frame(self, frame: Frame) -> Message | None:
        """Reassemble a version 1 frame decoded elsewhere; the message it completes."""
        return self._reassembler.add(frame)

    def next_message(self) -> Message | None:
        """The next complete message, None if more bytes are needed; raises (and has
        already dropped the offending bytes) on a bad frame."""
        while True:
            frame = self.frames.next_frame()
            if frame is None:
                return None
            message = self._reassembler.add(frame)
            if message is not None:
                return message


# --------------------------------------------------------------------------- version 2
#
# Version 2 frames keep the version 1 header and CRC. A data frame's payload is a
# u32 byte offset followed by a piece of the message payload; pieces may be of any
# size (the sender shrinks them on a noisy line) and MORE is set on all but the
# last. Every data frame is answered at once with ACK (u8 message type, u32 bytes
# held) and a bad chunk with NAK, so the sender resends after a frame, not after a
# command's timeout. See docs/serial-protocol.md, section 6a.

OFFSET = struct.Struct(">I")
ACK_BODY = struct.Struct(">BI")  # message type acknowledged, payload bytes held
MAX_V2_PIECE = MAX_PAYLOAD - OFFSET.size  # 1020


def v2_data_frame(
    msg_type: int, seq: int, offset: int, piece: bytes, *, more: bool, version: int = PROTOCOL_V2
) -> Frame:
    """One version 2 (or 3) data frame: ``piece`` of a message payload at ``offset``."""
    if len(piece) > MAX_V2_PIECE:
        raise FrameTooLarge(f"a piece of {len(piece)} bytes > {MAX_V2_PIECE}")
    return Frame(
        msg_type,
        seq,
        OFFSET.pack(offset) + piece,
        FLAG_MORE if more else 0,
        (offset // max(len(piece), 1)) & 0xFF if piece else 0,  # informative only
        version,
    )


def v2_ack(msg_type: int, seq: int, held: int, version: int = PROTOCOL_V2) -> Frame:
    """ACK: the receiver holds ``held`` bytes of message (``msg_type``, ``seq``); sent in
    the version of the data frame it answers."""
    return Frame(MsgType.ACK, seq, ACK_BODY.pack(msg_type, held), 0, 0, version)


def v2_nak(seq: int = 0, version: int = PROTOCOL_V2) -> Frame:
    """NAK: a bad chunk arrived; whoever is waiting for an ACK resends at once."""
    return Frame(MsgType.NAK, seq, b"", 0, 0, version)


def ack_body(frame: Frame) -> tuple[int, int]:
    """(message type, bytes held) of an ACK frame."""
    if len(frame.payload) != ACK_BODY.size:
        raise BadFrame(f"ACK of {len(frame.payload)} bytes, {ACK_BODY.size} expected")
    msg_type, held = ACK_BODY.unpack(frame.payload)
    return msg_type, held


@dataclass(frozen=True)
class Received:
    """What one version 2 data frame gave the receiver: the ACK to send back, the
    message it completed (if any), and whether it repeated a completed message."""

    ack: Frame
    message: Message | None = None
    repeat: bool = False


class OffsetReassembler:
    """Joins version 2 data frames by byte offset into messages.

    One message in reassembly; a frame at offset 0 of another (type, seq) starts a
    new one. A frame past the bytes held, or of a message not in reassembly, is
    answered with an ACK of what is held (the sender rewinds to it); a frame of the
    last completed message is acknowledged whole (``repeat``)."""

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._data = bytearray()
        self.last_done: tuple[int, int, int] | None = None  # type, seq, total bytes

    def add(self, frame: Frame) -> Received:
        if len(frame.payload) < OFFSET.size:
            raise BadFrame("version 2 data frame without an offset")
        (offset,) = OFFSET.unpack_from(frame.payload)
        piece = frame.payload[OFFSET.size :]
        key = (frame.type, frame.seq)
        done = self.last_done
        version = frame.version
        if done is not None and key == done[:2]:
            return Received(v2_ack(frame.type, frame.seq, done[2], version), repeat=True)
        if key != self._key:
            if offset != 0:
                return Received(v2_ack(frame.type, frame.seq, 0, version))
            self._key, self._data = key, bytearray()
        held = len(self._data)
        end = offset + len(piece)
        if offset > held:
            return Received(v2_ack(frame.type, frame.seq, held, version))
        if end > MAX_MESSAGE:
            self._key, self._data = None, bytearray()
            raise FrameTooLarge(f"message of more than {MAX_MESSAGE} bytes")
        if end > held:
            self._data += piece[held - offset :]
        if frame.more or end < len(self._data):
            return Received(v2_ack(frame.type, frame.seq, len(self._data), version))
        message = Message(frame.type, frame.seq, bytes(self._data), version)
        self.last_done = (frame.type, frame.seq, len(self._data))
        self._key, self._data = None, bytearray()
        return Received(v2_ack(frame.type, frame.seq, len(message.payload), version), message)


# --------------------------------------------------------------------------- TLV payloads

FieldValue = bytes | str | int


def _value_bytes(tag: int, value: FieldValue) -> bytes:
    if isinstance(value, bool):
        raise TypeError(f"tag {tag:#04x}: bool is not a TLV value")
    if isinstance(value, int):
        return struct.pack(">H", value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


def encode_tlv(fields: Iterable[tuple[int, FieldValue]]) -> bytes:
    """Encode fields: str as UTF-8, int as u16 big-endian, bytes as is."""
    out = bytearray()
    for tag, value in fields:
        raw = _value_bytes(tag, value)
        if not (0 <= tag <= 0xFF):
            raise ValueError(f"tag {tag} out of range")
        if len(raw) > MAX_TLV_VALUE:
            raise ValueError(f"tag {tag:#04x}: value of {len(raw)} bytes > {MAX_TLV_VALUE}")
        out += TLV_HEADER.pack(tag, len(raw)) + raw
    return bytes(out)


@dataclass(frozen=True)
class Fields:
    """Decoded TLV fields, in order. Unknown tags are kept (and ignored by readers)."""

    items: tuple[tuple[int, bytes], ...] = field(default=())

    @classmethod
    def decode(cls, payload: bytes) -> Fields:
        items: list[tuple[int, bytes]] = []
        i = 0
        while i < len(payload):
            if len(payload) - i < TLV_HEADER.size:
                raise BadPayload(f"truncated TLV header at offset {i}")
            tag, length = TLV_HEADER.unpack_from(payload, i)
            i += TLV_HEADER.size
            if i + length > len(payload):
                raise BadPayload(
                    f"TLV {tag:#04x} announces {length} bytes, {len(payload) - i} left"
                )
            items.append((tag, payload[i : i + length]))
            i += length
        return cls(tuple(items))

    def encode(self) -> bytes:
        return encode_tlv(self.items)

    def has(self, tag: int) -> bool:
        return any(t == tag for t, _ in self.items)

    def get_all_bytes(self, tag: int) -> list[bytes]:
        return [v for t, v in self.items if t == tag]

    def get_bytes(self, tag: int, default: bytes | None = None) -> bytes:
        for t, v in self.items:
            if t == tag:
                return v
        if default is not None:
            return default
        raise BadPayload(f"required field {_tag_name(tag)} missing")

    def get_str(self, tag: int, default: str | None = None) -> str:
        if default is not None and not self.has(tag):
            return default
        try:
            return self.get_bytes(tag).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadPayload(f"field {_tag_name(tag)} is not UTF-8") from exc

    def get_all_str(self, tag: int) -> list[str]:
        try:
            return [v.decode("utf-8") for v in self.get_all_bytes(tag)]
        except UnicodeDecodeError as exc:
            raise BadPayload(f"field {_tag_name(tag)} is not UTF-8") from exc

    def get_u16(self, tag: int, default: int | None = None) -> int:
        if default is not None and not self.has(tag):
            return default
        raw = self.get_bytes(tag)
        if len(raw) != 2:
            raise BadPayload(f"field {_tag_name(tag)} must be 2 bytes, got {len(raw)}")
        value: int = struct.unpack(">H", raw)[0]
        return value


def _tag_name(tag: int) -> str:
    try:
        return Tag(tag).name
    except ValueError:
        return f"{tag:#04x}"


def error_payload(code: int, message: str) -> bytes:
    """Payload of an ERROR message; the message is truncated to fit one TLV."""
    text = message.encode("utf-8")[:4000].decode("utf-8", "ignore")
    return encode_tlv([(Tag.ERROR_CODE, int(code)), (Tag.ERROR_MESSAGE, text)])


def board_error(payload: bytes) -> BoardError:
    """The BoardError an ERROR message's payload describes."""
    fields = Fields.decode(payload)
    return BoardError(fields.get_u16(Tag.ERROR_CODE), fields.get_str(Tag.ERROR_MESSAGE, ""))


# --------------------------------------------------------------------------- proof of possession

# What a board signs to prove it holds its key, on the serial line (PROVE) and over
# HTTP (/v1/devices/{id}/proof): never bytes of the station's choosing, which would
# make the board a signing oracle (a TLS 1.3 CertificateVerify input is 64 spaces, a
# context string, a zero and a hash: 130 bytes), but this fixed layout:
#
#   PROOF_CONTEXT (40 bytes, ends in 0x00) | u8 n | device id (n bytes, UTF-8) | nonce (32)
PROOF_CONTEXT = b"artik-provisioning proof-of-possession\x00\x01"
PROOF_NONCE_SIZE = 32
MAX_DEVICE_ID = 64


def proof_message(device_id: str, nonce: bytes) -> bytes:
    """The bytes a board signs to prove ``device_id`` holds its key for ``nonce``."""
    raw_id = device_id.encode("utf-8")
    if not 1 <= len(raw_id) <= MAX_DEVICE_ID:
        raise ValueError(f"device id of {len(raw_id)} bytes: 1 to {MAX_DEVICE_ID}")
    if len(nonce) != PROOF_NONCE_SIZE:
        raise ValueError(f"nonce of {len(nonce)} bytes: exactly {PROOF_NONCE_SIZE}")
    return PROOF_CONTEXT + bytes([len(raw_id)]) + raw_id + nonce


def parse_proof_message(message: bytes) -> tuple[str, bytes]:
    """(device id, nonce) of a proof message; BadPayload for anything else."""
    if not message.startswith(PROOF_CONTEXT):
        raise BadPayload("not a proof message: wrong context")
    rest = message[len(PROOF_CONTEXT) :]
    if not rest or not 1 <= rest[0] <= MAX_DEVICE_ID:
        raise BadPayload("proof message: bad device id length")
    n = rest[0]
    if len(rest) != 1 + n + PROOF_NONCE_SIZE:
        raise BadPayload(
            f"proof message: {len(rest) - 1 - n} nonce bytes, exactly {PROOF_NONCE_SIZE} wanted"
        )
    try:
        device_id = rest[1 : 1 + n].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadPayload("proof message: device id is not UTF-8") from exc
    return device_id, rest[1 + n :]
