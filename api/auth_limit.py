"""Failed authentications per client address, and the refusal past the limit.

Apart from api/auth.py so that the app's context (api/context.py) can hold a
limiter without importing the authorisation rules that depend on it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from station.errors import Kind, StationError


class TooManyAuthFailures(StationError):
    code = "too-many-auth-failures"
    kind = Kind.RATE_LIMITED

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"too many failed authentications from this address; retry in {retry_after} s"
        )
        self.headers = {"Retry-After": str(retry_after)}


class AuthFailureLimiter:
    """Failed authentications per client address in a sliding window of ``window`` s.

    An address with ``limit`` failures in the window is held back until the oldest
    ages out. At most ``max_addresses`` are tracked (those with no failure in the
    window are dropped first; all of them if that is not enough).
    """

    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        *,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or None if it may now."""
        now = self._clock()
        with self._lock:
            seen = self._failures.get(address)
            if seen is None:
                return None
            while seen and seen[0] <= now - self.window:
                seen.popleft()
            if not seen:
                del self._failures[address]
                return None
            if len(seen) < self.limit:
                return None
            return max(1, int(seen[0] + self.window - now + 0.999))

    def failed(self, address: str) -> None:
        now = self._clock()
        with self._lock:
            if address not in self._failures and len(self._failures) >= self.max_addresses:
                self._prune(now)
            seen = self._failures.setdefault(address, deque(maxlen=self.limit))
            seen.append(now)

    def _prune(self, now: float) -> None:
        stale = [a for a, seen in self._failures.items() if seen[-1] <= now - self.window]
        for address in stale:
            del self._failures[address]
        if len(self._failures) >= self.max_addresses:
            self._failures.clear()
