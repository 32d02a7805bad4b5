"""One error vocabulary: every error speaks a reason code and a kind; the edges map kinds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import hsm.errors
from api.problems import STATUS_OF_KIND, http_status
from station.cli.common import (
    EXIT_IN_USE,
    EXIT_NOT_CONFIGURED,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    exit_code,
)
from station.errors import Kind, StationError, kind_of

ROOT = Path(__file__).resolve().parent.parent


def test_every_kind_has_an_http_status() -> None:
    assert set(STATUS_OF_KIND) == set(Kind)
    assert all(400 <= status < 600 for status in STATUS_OF_KIND.values())


@pytest.mark.parametrize("kind", list(Kind))
def test_exit_codes_by_kind(kind: Kind) -> None:
    # 3 set the station up, 4 something it depends on does not answer, 5 a port is
    # taken, 1 every refusal of the request (README's table).
    expected = {
        Kind.NOT_CONFIGURED: EXIT_NOT_CONFIGURED,
        Kind.UNAVAILABLE: EXIT_UNAVAILABLE,
        Kind.UPSTREAM: EXIT_UNAVAILABLE,
        Kind.IN_USE: EXIT_IN_USE,
    }.get(kind, EXIT_REFUSED)
    assert exit_code(StationError("x", code="c", kind=kind)) == expected


def _hsm_errors() -> list[type[hsm.errors.HsmError]]:
    found = [hsm.errors.HsmError]
    for cls in found:
        found.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", _hsm_errors(), ids=lambda c: c.__name__)
def test_every_hsm_error_speaks_the_vocabulary(cls: type[hsm.errors.HsmError]) -> None:
    exc = cls("detail")
    assert re.fullmatch(r"hsm-[a-z0-9-]+", exc.code)
    assert kind_of(exc) is not None
    assert http_status(exc) >= 400


def test_an_error_outside_the_vocabulary_is_a_500() -> None:
    assert kind_of(ValueError("x")) is None
    assert http_status(ValueError("x")) == 500


def test_no_http_status_below_the_api() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("station", "hsm")
        for path in (ROOT / package).rglob("*.py")
        if "http_status" in path.read_text()
    ]
    assert offenders == []
