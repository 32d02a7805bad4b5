"""Who a bearer token is, and the cache of accepted tokens.

Apart from api/auth.py so that the app's context (api/context.py) can hold a
cache without importing the authorisation rules that depend on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from station.ledger.tokens import Role

CACHE_TTL_S = 5.0


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role


class TokenCache:
    """Accepted tokens for ``ttl`` seconds from their lookup, keyed by the token's SHA-256.

    An entry is never extended by a hit: ``ttl`` bounds how long a token revoked
    in the ledger keeps working. At most ``max_entries`` are kept (all are dropped
    when full: a flood of valid tokens is not a case worth an LRU).
    """

    def __init__(
        self,
        ttl: float = CACHE_TTL_S,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, key: str) -> Principal | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            if hit[0] <= self._clock():
                del self._entries[key]
                return None
            return hit[1]

    def put(self, key: str, principal: Principal, expires_at: datetime | None = None) -> None:
        """Remember ``principal`` for ``ttl`` seconds, or until its token expires if sooner."""
        ttl = self.ttl
        if expires_at is not None:
            ttl = min(ttl, (expires_at - datetime.now(UTC)).total_seconds())
        if ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = (self._clock() + ttl, principal)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
