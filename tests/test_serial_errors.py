"""The serial protocol speaks the station's error vocabulary: a code and a kind on every error."""

from __future__ import annotations

import re

import pytest
from cryptography.exceptions import InvalidSignature

import firmware_hooks.protocol as protocol
from firmware_hooks.protocol import (
    BadCrc,
    BadFrame,
    BadPayload,
    BoardError,
    Disconnected,
    ErrorCode,
    FrameTooLarge,
    MsgType,
    ProtocolError,
    Timeout,
    UnexpectedReply,
    UnsupportedVersion,
)
from station.errors import Kind, StationError, kind_of
from station.line.provision import failure_code, operator_message

SUBCLASSES = [
    obj
    for obj in vars(protocol).values()
    if isinstance(obj, type) and issubclass(obj, ProtocolError)
]


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_every_protocol_error_has_a_stable_code_and_a_kind(cls: type[ProtocolError]) -> None:
    assert isinstance(cls.code, str) and cls.code
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", cls.code)
    assert Kind(cls.kind)  # a value of the station's Kind, spelled as a string


# The reason codes the line recorded before the vocabulary: unchanged.
CASES = [
    (Timeout("no reply"), "serial-timeout", Kind.UNAVAILABLE),
    (BadCrc(1, 2), "serial-crc", Kind.BAD_INPUT),
    (Disconnected("gone"), "disconnected", Kind.UNAVAILABLE),
    (BoardError(ErrorCode.BAD_STATE, "no key"), "board-error", Kind.REFUSED),
    (UnexpectedReply("wrong type"), "unexpected-reply", Kind.BAD_INPUT),
    (UnsupportedVersion(9, 1, 1), "unsupported-version", Kind.REFUSED),
    (BadFrame("cobs"), "serial-protocol", Kind.BAD_INPUT),
    (FrameTooLarge("big"), "serial-protocol", Kind.BAD_INPUT),
    (BadPayload("tlv"), "serial-protocol", Kind.BAD_INPUT),
]


@pytest.mark.parametrize(("exc", "code", "kind"), CASES, ids=lambda v: str(v)[:20])
def test_failure_code_is_the_errors_own_code(exc: ProtocolError, code: str, kind: Kind) -> None:
    assert failure_code(exc) == code
    assert kind_of(exc) is kind


def test_a_timeout_whose_last_error_was_a_bad_crc_says_serial_crc() -> None:
    exc = Timeout("no valid reply", code="serial-crc")
    assert failure_code(exc) == "serial-crc"
    assert Timeout.code == "serial-timeout"  # the instance narrowed, not the class


def test_the_boards_own_error_number_stays_apart_from_the_reason_code() -> None:
    exc = BoardError(ErrorCode.KEY_NAME_TOO_LONG, "21 characters")
    assert exc.error_code == ErrorCode.KEY_NAME_TOO_LONG
    assert exc.code == "board-error"


def test_other_failures_keep_their_codes() -> None:
    assert failure_code(StationError("x", code="bad-device-id")) == "bad-device-id"
    assert failure_code(InvalidSignature()) == "bad-proof"
    assert failure_code(OSError("eio")) == "disconnected"
    assert failure_code(RuntimeError("?")) == "internal"


def test_a_timeout_reads_as_advice_not_protocol_detail() -> None:
    exc = Timeout(
        "no valid reply to GEN_KEY_CSR seq 4422 after 3 attempt(s) of 20.01 s "
        "(last error: COBS block at offset 248 runs past the end)"
    )
    exc.msg_type, exc.attempts = MsgType.GEN_KEY_CSR, 3
    text = operator_message(exc)
    assert text == "board did not answer key generation, 3 tries: check the cable and the board"
    assert "seq" not in text and "COBS" not in text


def test_the_reason_code_is_not_repeated_inside_the_message() -> None:
    exc = StationError("the CSR names dev-2, the board is dev-1", code="device-id-mismatch")
    assert str(exc).startswith("device-id-mismatch: ")  # as the CLI prints it
    assert operator_message(exc) == "the CSR names dev-2, the board is dev-1"
    assert "board-error" not in operator_message(BoardError(ErrorCode.SEE_FAILED, "status 2"))
