"""Durations as people write them: ``90s``, ``30m``, ``12h``, ``30d``, ``2w`` (or plain seconds)."""

from __future__ import annotations

import re
from datetime import timedelta

from station.errors import PolicyError

_DURATION = re.compile(r"\A\s*(\d{1,9})\s*([smhdw]?)\s*\Z")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION = timedelta(days=3660)


def parse_duration(text: str) -> timedelta:
    """Code: bad-duration (not a positive count of s, m, h, d or w; or over ten years)."""
    match = _DURATION.fullmatch(text or "")
    seconds = int(match[1]) * _UNIT[match[2]] if match else 0
    if not 0 < seconds <= MAX_DURATION.total_seconds():
        raise PolicyError(
            f"{text!r} is not a duration such as 90s, 30m, 12h, 30d or 2w (at most ten years)",
            code="bad-duration",
        )
    return timedelta(seconds=seconds)
