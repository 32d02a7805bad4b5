"""Transport and request/response layer over any pyserial-like port.

Works on ``serial.Serial`` (a USB gadget port, a pty) and on the objects
``serial.serial_for_url`` returns (``loop://``, ``socket://``). Reads are sized
(``read(in_waiting or 1)`` under a short port timeout), never ``readline()`` or
``read_until()``, which cost one system call per byte.
"""

from __future__ import annotations

import collections
import logging
import math
import secrets
import time
from collections.abc import Callable, Collection
from typing import Protocol

from firmware_hooks.protocol import (
    CONTROL_TYPES,
    MAX_V2_PIECE,
    PROTOCOL_V2,
    PROTOCOL_VERSION,
    RESPONSE_BIT,
    SUPPORTED_VERSIONS,
    BadCrc,
    Disconnected,
    Frame,
    Message,
    MessageDecoder,
    MsgType,
    OffsetReassembler,
    ProtocolError,
    Timeout,
    UnexpectedReply,
    UnsupportedVersion,
    ack_body,
    board_error,
    encode_frame,
    encode_message,
    response_type,
    v2_data_frame,
    v2_nak,
)

try:
    from termios import error as _TermiosError  # tcdrain on a pty whose other end closed
except ImportError:  # pragma: no cover - not a POSIX host

    class _TermiosError(Exception):  # type: ignore[no-redef]
        pass


# What a serial port raises when the cable goes: SerialException is an OSError,
# pyserial's flush() surfaces termios.error, a closed port ValueError or TypeError.
_TRANSPORT_ERRORS = (OSError, ValueError, TypeError, _TermiosError)

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.05
# A write that cannot hand its bytes to the port for this long means the far end
# stopped reading (its buffer is full): without it write() blocks forever, past
# every request timeout. Generous: a full pty buffer drains in ~1.5 s at 115200 baud.
WRITE_TIMEOUT = 5.0
# Version 2: how long past a frame's line time a sender waits for its ACK before it
# sends the frame again (the far end's turnaround: reading, decoding, answering).
ACK_SLACK = 0.05
ACK_WIRE = 22  # bytes of an ACK frame on the wire, delimiters included (version 2: 20)
V2_FRAME_TRIES = 16  # sends of one frame before the message is given up
# Sends of a request's last frame before the host just waits for the reply (which
# acknowledges it too: the board may be busy running the command, not reading).
FINAL_FRAME_TRIES = 4
QUICK_RESENDS = 8  # version 1: resends of a request on a damaged reply, per attempt
_NAKED = -1  # what _await_ack returns for a NAK
MIN_V2_PIECE = 32  # bytes: the smallest piece a noisy line shrinks frames to
# A frame's fixed cost in bytes of line time: header, CRC, offset, COBS and
# delimiters (~20), its ACK (~20) and the turnaround of the far end (~5 ms).
FRAME_COST = 100
LOSS_MEMORY = 0.97  # per frame: the loss rate is that of the last ~30 frames
NAK_GAP = 0.005  # seconds after a NAK during which further bad chunks get none

try:
    from serial import SerialTimeoutException as _WriteTimeout
except ImportError:  # pragma: no cover - the codec and link work on any port-like object

    class _WriteTimeout(Exception):  # type: ignore[no-redef]
        pass


class SerialLike(Protocol):
    """What the link needs of a port; ``serial.Serial`` and ``serial_for_url`` objects fit."""

    timeout: float | None

    @property
    def in_waiting(self) -> int: ...

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes, /) -> int | None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _type_name(msg_type: int) -> str:
    try:
        return MsgType(msg_type).name
    except ValueError:
        return f"{msg_type:#04x}"


class Link:
    """Messages in and out of one port.

    ``receive()`` drops bad frames (remembering the last error in
    ``last_error``) and returns the next good message; ``request()`` adds
    sequence matching, a timeout per attempt and bounded retries. Retries
    resend the same bytes with the same sequence number: the board replays its
    cached reply to a duplicate request instead of running it twice (see the
    spec), which is what makes every command safe to retry.

    Version 2 (``version = 2``, negotiated in HELLO): every data frame is
    acknowledged at once (ACK) and every bad chunk answered with NAK, so a lost
    frame costs a resend of that frame, not a command's timeout; pieces shrink
    when frames are lost and grow back when they get through.
    """

    def __init__(
        self,
        port: SerialLike,
        *,
        baudrate: int | None = None,
        poll_interval: float = POLL_INTERVAL,
        write_timeout: float = WRITE_TIMEOUT,
        versions: Collection[int] = SUPPORTED_VERSIONS,
    ) -> None:
        self.port = port
        # The versions this side speaks: a good frame in another is UnsupportedVersion
        # (a board that speaks 1 and 2 refuses a version 3 frame as section 3 says).
        self.versions = frozenset(versions)
        self.baudrate = baudrate if baudrate is not None else getattr(port, "baudrate", None)
        port.timeout = poll_interval
        if hasattr(port, "write_timeout"):
            port.write_timeout = write_timeout
        # A port may offer read_available() (what it holds, waiting up to its
        # timeout for the first byte), a cheaper way to the same bytes.
        self._read_available: Callable[[], bytes] | None = getattr(port, "read_available", None)
        self._decoder = MessageDecoder()
        self._seq = secrets.randbelow(0x10000)
        self.last_error: ProtocolError | None = None
        self.bad_frames = 0
        # Version 2 state.
        self.version = PROTOCOL_VERSION  # frames this side sends its messages in
        self.peer_version = PROTOCOL_VERSION  # of the last good data frame received
        self.piece = MAX_V2_PIECE  # bytes per data frame now; shrinks on a noisy line
        self.resends = 0  # version 2 frames sent again (NAK or no ACK in time)
        self._offsets = OffsetReassembler()
        self._inbox: collections.deque[Message] = collections.deque()
        self._acks: collections.deque[Frame] = collections.deque()  # ACK and NAK frames
        self._data_seen: tuple[int, int] | None = None  # (type, seq) of the last data frame
        self._answered: int | None = None  # seq of the last answer the peer acknowledged
        self._last_message = Message(0, 0)  # the last message completed in version 2
        self._carried = 0.0  # wire bytes of version 2 data frames sent, decaying
        self._lost = 0.0  # of them lost (NAK or no ACK), decaying the same way
        self._sending = False  # a version 2 message is out, waiting for its ACKs
        self._seen_at_send: tuple[int, int] | None = None
        self._nak_quiet_until = 0.0  # no second NAK before a good frame or this time

    # ------------------------------------------------------------------ transport

    def write(self, data: bytes) -> None:
        try:
            self.port.write(data)
            self.port.flush()
        except _WriteTimeout as exc:  # before _TRANSPORT_ERRORS: it is an OSError too
            raise Timeout(
                f"the port took no bytes for {getattr(self.port, 'write_timeout', '?')} s: "
                "the far end is not reading"
            ) from exc
        except _TRANSPORT_ERRORS as exc:
            raise Disconnected(f"write failed: {exc}") from exc

    def send(self, message: Message) -> bytes:
        """Write a whole message in version 1 frames; returns the bytes written."""
        data = encode_message(message)
        self.write(data)
        return data

    def _read_some(self) -> bytes:
        """What the port holds; when it holds nothing, wait (up to the port timeout)
        for the first byte and take whatever came with it."""
        try:
            if self._read_available is not None:
                return self._read_available()
            port = self.port
            waiting = port.in_waiting
            if waiting:
                return port.read(waiting)
            data = port.read(1)
            if data and (waiting := port.in_waiting):
                data += port.read(waiting)
            return data
        except _TRANSPORT_ERRORS as exc:
            raise Disconnected(f"read failed: {exc}") from exc

    def _drain(self) -> None:
        """Decode every complete frame buffered: messages to the inbox, ACK/NAK to
        the sender's queue, version 2 data frames acknowledged, bad chunks NAKed."""
        frames = self._decoder.frames
        while True:
            try:
                frame = frames.next_frame()
            except UnsupportedVersion:
                raise
            except ProtocolError as exc:
                self.last_error = exc
                self.bad_frames += 1
                log.debug("dropped a bad frame: %s", exc)
                if self._sending:
                    # Most likely the ACK we wait for, damaged: send the frame again now.
                    self._acks.append(v2_nak())
                elif (version := max(self.peer_version, self.version)) >= PROTOCOL_V2:
                    # One NAK per damaged frame: a byte turned into 0x00 cuts a frame
                    # into two bad chunks, and a second NAK would cost a second resend.
                    now = time.monotonic()
                    if now >= self._nak_quiet_until:
                        self._nak_quiet_until = now + NAK_GAP
                        self.write(encode_frame(v2_nak(version=version)))
                continue
            if frame is None:
                return
            if frame.version not in self.versions:
                raise UnsupportedVersion(frame.version, frame.seq, frame.type)
            if frame.version >= PROTOCOL_V2 and frame.type in CONTROL_TYPES:
                self._acks.append(frame)
                continue
            self._data_seen = (frame.type, frame.seq)
            self.peer_version = frame.version
            self._nak_quiet_until = 0.0
            if frame.version < PROTOCOL_V2:
                try:
                    message = self._decoder.add_frame(frame)
                except ProtocolError as exc:
                    self.last_error = exc
                    self.bad_frames += 1
                    continue
                if message is not None:
                    self._inbox.append(message)
                continue
            try:
                got = self._offsets.add(frame)
            except ProtocolError as exc:
                self.last_error = exc
                self.bad_frames += 1
                self.write(encode_frame(v2_nak(frame.seq, frame.version)))
                continue
            self.write(encode_frame(got.ack))
            if got.message is not None:
                self._inbox.append(got.message)
                self._last_message = got.message
            elif (
                got.repeat
                and frame.type < RESPONSE_BIT
                and self._answered != frame.seq
                and self._last_message not in self._inbox
            ):
                # The peer repeats a request whose answer did not get through: hand
                # it up again (the board replays its cached answer, never reruns it).
                self._inbox.append(self._last_message)

    def _pump(self, timeout: float) -> None:
        """Process what is buffered, then wait up to ``timeout`` for more bytes."""
        before = (len(self._inbox), len(self._acks), self._data_seen)
        self._drain()
        if (len(self._inbox), len(self._acks), self._data_seen) != before:
            return  # something new to look at before waiting for more bytes
        data = self._read_some() if timeout > 0 else b""
        if data:
            self._decoder.feed(data)
            self._drain()

    def receive(self, timeout: float | None, *, until_bad: bool = False) -> Message | None:
        """The next good message, or None after ``timeout`` seconds (None: wait forever;
        ``until_bad``: or as soon as a bad frame arrives).

        Bad frames are dropped and counted; UnsupportedVersion propagates because
        it needs an answer (board side) or ends the conversation (host side)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bad = self.bad_frames
        while True:
            if self._inbox:
                return self._inbox.popleft()
            self._acks.clear()  # nobody waits for them now
            if deadline is not None and time.monotonic() >= deadline:
                return None
            if until_bad and self.bad_frames != bad:
                return None
            self._pump(1.0 if deadline is None else max(deadline - time.monotonic(), 0.001))

    @property
    def corrected_frames(self) -> int:
        """Version 3 frames that arrived damaged and were corrected by their parity."""
        return self._decoder.frames.corrected

    def start_session(self) -> None:
        """A new HELLO: back to version 1 until the board chooses, so that a damaged
        reply from the next board (maybe a version 1 one) gets no NAK of the last
        board's version. The piece size and loss estimate stay: they are the cable's."""
        self.version = self.peer_version = PROTOCOL_VERSION

    def transmit_time(self, nbytes: int) -> float:
        """Seconds the line needs for nbytes (8N1: 10 bits a byte), 0 if the baud is unknown."""
        return nbytes * 10 / self.baudrate if self.baudrate else 0.0

    # ------------------------------------------------------------------ version 2 sending

    def send_message(
        self, message: Message, *, tries: int = V2_FRAME_TRIES, final_tries: int | None = None
    ) -> bool:
        """Send a message in this link's version: version 1 frames back to back, or
        version 2 data frames each acknowledged before the next (stop and wait).

        Version 2: a frame is sent again at once on NAK, or when no ACK came within
        its line time plus ``ACK_SLACK``; after ``tries`` sends of one frame, Timeout.
        A data frame from the peer that answers this message (its reply; for an
        answer, the peer's next request) counts as the acknowledgement of the rest.
        ``final_tries``: after that many sends of the last frame without an ACK,
        return False instead (a request's reply acknowledges it too, and the peer
        may be busy running it). True when the whole message was acknowledged."""
        if message.version < PROTOCOL_V2:
            self.send(message)
            return True
        self._sending = True
        try:
            return self._send_v2(message, tries, final_tries)
        finally:
            self._sending = False

    def _send_v2(self, message: Message, tries: int, final_tries: int | None) -> bool:
        payload, total = message.payload, len(message.payload)
        offset, sent, silent = 0, 0, 0  # sends of this frame, of them unanswered
        self._acks.clear()
        self._seen_at_send = self._data_seen
        answer = message.type >= RESPONSE_BIT
        while True:
            piece = payload[offset : offset + self.piece]
            more = offset + len(piece) < total
            wire = encode_frame(
                v2_data_frame(
                    message.type, message.seq, offset, piece, more=more, version=message.version
                )
            )
            if not more and final_tries is not None and silent >= final_tries:
                return False
            if sent >= tries:
                raise Timeout(
                    f"{_type_name(message.type)} seq {message.seq}: no acknowledgement of "
                    f"the frame at byte {offset} after {tries} sends"
                )
            if sent:
                self.resends += 1
            sent += 1
            self.write(wire)
            now = time.monotonic()
            deadline = now + self.transmit_time(len(wire) + ACK_WIRE) + ACK_SLACK
            # A NAK about this frame cannot come before the frame has crossed the line:
            # one that does is about earlier damage (a cut delimiter, a damaged ACK).
            earliest_nak = now + 0.8 * self.transmit_time(len(wire))
            outcome = self._await_ack(message, answer, deadline, earliest_nak, offset)
            self._adapt(len(wire), lost=outcome is None or outcome == _NAKED)
            if outcome is None:  # no answer: lost, or the peer is busy running a request
                silent += 1
                continue
            if outcome == _NAKED:  # damaged on the way: send it again (in the piece size now)
                continue
            if outcome >= total and (not more or outcome > offset):
                if answer:
                    self._answered = message.seq
                return True
            if outcome > offset:
                offset, sent, silent = outcome, 0, 0
            else:  # the receiver holds less than we sent: go back to what it holds
                offset = outcome

    def _adapt(self, wire_bytes: int, *, lost: bool) -> None:
        """Size the next pieces for the loss seen lately: with a loss rate of p per
        byte, pieces of about sqrt(FRAME_COST / p) bytes waste least (a frame's fixed
        cost against the chance that a longer frame is lost); no loss, the largest."""
        self._carried = self._carried * LOSS_MEMORY + wire_bytes
        self._lost = self._lost * LOSS_MEMORY + (1.0 if lost else 0.0)
        rate = self._lost / self._carried
        best = int(math.sqrt(FRAME_COST / rate)) if rate > 0 else MAX_V2_PIECE
        # A loss halves the piece at once (the estimate needs a few losses to learn a
        # bad line); a success lets it double, up to what the estimate allows.
        piece = self.piece // 2 if lost else self.piece * 2
        self.piece = max(MIN_V2_PIECE, min(MAX_V2_PIECE, best, piece))

    def _await_ack(
        self, message: Message, answer: bool, deadline: float, earliest_nak: float, offset: int
    ) -> int | None:
        """Bytes the peer holds of ``message`` per its ACK; ``_NAKED`` on NAK (or a
        damaged answer), None when nothing came in time."""
        seen = self._seen_at_send
        while True:
            while self._acks:
                frame = self._acks.popleft()
                if frame.type == MsgType.NAK:
                    if time.monotonic() < earliest_nak:
                        continue  # stale: about damage before this frame
                    return _NAKED
                try:
                    msg_type, held = ack_body(frame)
                except ProtocolError:
                    continue
                if frame.seq == message.seq and msg_type == message.type:
                    if held == offset and offset < len(message.payload):
                        continue  # a late ACK of the frame before (or of a resend of it)
                    return held
            if self._data_seen != seen and self._data_seen is not None:
                peer_type, peer_seq = self._data_seen
                replied = not answer and peer_seq == message.seq and peer_type >= RESPONSE_BIT
                moved_on = answer and peer_type < RESPONSE_BIT and peer_seq != message.seq
                if replied or moved_on:
                    return len(message.payload)  # the peer got it all and went on
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._pump(remaining)

    # ------------------------------------------------------------------ request / response

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        return self._seq

    def request(
        self,
        msg_type: int,
        payload: bytes = b"",
        *,
        timeout: float,
        retries: int = 0,
        version: int | None = None,
    ) -> Message:
        """Send a request and return its successful reply.

        Raises BoardError for an ERROR reply, UnexpectedReply for a reply of
        the wrong type, Timeout when no valid reply came after 1 + retries
        attempts (each allowed ``timeout`` seconds plus the line time of the
        request), Disconnected when the port goes away. ``version`` overrides the
        link's version for this request (HELLO always goes in version 1)."""
        seq = self.next_seq()
        version = self.version if version is None else version
        message = Message(msg_type, seq, payload, version)
        wire_size = len(encode_message(Message(msg_type, seq, payload)))
        expected = response_type(msg_type)
        attempt_timeout = timeout + self.transmit_time(wire_size)
        self.last_error = None
        self._inbox.clear()
        for attempt in range(retries + 1):
            if attempt:
                log.info(
                    "retrying %s seq %d (attempt %d of %d, last error: %s)",
                    _type_name(msg_type),
                    seq,
                    attempt + 1,
                    retries + 1,
                    self.last_error,
                )
            self.send_message(message, final_tries=FINAL_FRAME_TRIES)
            deadline = time.monotonic() + attempt_timeout
            quick = 0
            while (remaining := deadline - time.monotonic()) > 0:
                # Version 1: a damaged frame while the reply is due is most likely the
                # reply: ask again at once (the board answers a repeated request from
                # its replay cache) instead of waiting out the timeout.
                eager = version < PROTOCOL_V2 and quick < QUICK_RESENDS
                bad = self.bad_frames
                reply = self.receive(remaining, until_bad=eager)
                if reply is None:
                    if eager and self.bad_frames != bad:
                        quick += 1
                        self.resends += 1
                        self.send_message(message)
                        continue
                    break
                if reply.seq != seq:
                    log.debug("ignoring a stale reply (seq %d, expecting %d)", reply.seq, seq)
                    continue
                if reply.type == MsgType.ERROR:
                    raise board_error(reply.payload)
                if reply.type != expected:
                    raise UnexpectedReply(
                        f"{_type_name(msg_type)} seq {seq} answered with "
                        f"{_type_name(reply.type)}, expected {_type_name(expected)}"
                    )
                return reply
        detail = f" (last error: {self.last_error})" if self.last_error else ""
        timeout_error = Timeout(
            f"no valid reply to {_type_name(msg_type)} seq {seq} after {retries + 1} "
            f"attempt(s) of {attempt_timeout:.2f} s{detail}",
            code="serial-crc" if isinstance(self.last_error, BadCrc) else None,
        )
        timeout_error.msg_type, timeout_error.attempts = msg_type, retries + 1
        raise timeout_error from self.last_error
