"""Transport and request/response layer over any pyserial-like port.

Works on ``serial.Serial`` (a USB gadget port, a pty) and on the objects
``serial.serial_for_url`` returns (``loop://``, ``socket://``). Reads are sized
(``read(in_waiting or 1)`` under a short port timeout), never ``readline()`` or
``read_until()``, which cost one system call per byte.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Protocol

from firmware_hooks.protocol import (
    BadCrc,
    Disconnected,
    Message,
    MessageDecoder,
    MsgType,
    ProtocolError,
    Timeout,
    UnexpectedReply,
    UnsupportedVersion,
    board_error,
    encode_message,
    response_type,
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
    """

    def __init__(
        self,
        port: SerialLike,
        *,
        baudrate: int | None = None,
        poll_interval: float = POLL_INTERVAL,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self.port = port
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
        """Write a whole message; returns the bytes written (for replay caches)."""
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

    def receive(self, timeout: float | None) -> Message | None:
        """The next good message, or None after ``timeout`` seconds (None: wait forever).

        Bad frames are dropped and counted; UnsupportedVersion propagates because
        it needs an answer (board side) or ends the conversation (host side)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                message = self._decoder.next_message()
            except UnsupportedVersion:
                raise
            except ProtocolError as exc:
                self.last_error = exc
                self.bad_frames += 1
                log.debug("dropped a bad frame: %s", exc)
                continue
            if message is not None:
                return message
            if deadline is not None and time.monotonic() >= deadline:
                return None
            data = self._read_some()
            if data:
                self._decoder.feed(data)

    def transmit_time(self, nbytes: int) -> float:
        """Seconds the line needs for nbytes (8N1: 10 bits a byte), 0 if the baud is unknown."""
        return nbytes * 10 / self.baudrate if self.baudrate else 0.0

    # ------------------------------------------------------------------ request / response

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        return self._seq

    def request(
        self, msg_type: int, payload: bytes = b"", *, timeout: float, retries: int = 0
    ) -> Message:
        """Send a request and return its successful reply.

        Raises BoardError for an ERROR reply, UnexpectedReply for a reply of
        the wrong type, Timeout when no valid reply came after 1 + retries
        attempts (each allowed ``timeout`` seconds plus the line time of the
        request), Disconnected when the port goes away."""
        seq = self.next_seq()
        wire = encode_message(Message(msg_type, seq, payload))
        expected = response_type(msg_type)
        attempt_timeout = timeout + self.transmit_time(len(wire))
        self.last_error = None
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
            self.write(wire)
            deadline = time.monotonic() + attempt_timeout
            while (remaining := deadline - time.monotonic()) > 0:
                reply = self.receive(remaining)
                if reply is None:
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
        raise Timeout(
            f"no valid reply to {_type_name(msg_type)} seq {seq} after {retries + 1} "
            f"attempt(s) of {attempt_timeout:.2f} s{detail}",
            code="serial-crc" if isinstance(self.last_error, BadCrc) else None,
        ) from self.last_error
