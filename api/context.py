"""Per-app state: settings, the ledger and the CA (opened lazily, per process), activity.

The CA is opened on first use inside the worker process that uses it (and in
the lifespan), never before a fork: python-pkcs11 sessions must not cross a fork.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.engine import make_url

from api.auth_limit import AuthFailureLimiter
from api.line_view import FILE_NAME, LineView
from api.metrics import Metrics, TimedCA
from api.token_cache import TokenCache
from hsm.errors import HsmError, KeyMismatch, KeyNotFound
from station.ca import CertificateAuthority, open_ca
from station.errors import Kind, StationError
from station.ledger import Ledger
from station.ledger.db import ping
from station.ledger.records import RecoveryReport
from station.ledger.tallies import tallies
from station.publish.ocsp import Responder
from station.publish.whitelist_sync import SyncStatus, read_status
from station.recovery import StationLock, recover_at_startup
from station.settings import Settings
from station.timefmt import rfc3339, utc_now

RATE_WINDOW_S = 60.0


@dataclass(frozen=True)
class Failure:
    at: str
    device_id: str | None
    batch: str | None
    code: str
    detail: str


class Activity:
    """Recent issuances (for the rate) and refusals (for the dashboard), in this process."""

    def __init__(self, keep: int = 50) -> None:
        self._lock = threading.Lock()
        self._issued: deque[float] = deque()
        self._failures: deque[Failure] = deque(maxlen=keep)

    def issued(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._issued.append(now)
            self._trim(now)

    def failed(self, device_id: str | None, batch: str | None, code: str, detail: str) -> None:
        at = rfc3339(utc_now())
        with self._lock:
            self._failures.append(Failure(at, device_id, batch, code, detail[:300]))

    def _trim(self, now: float) -> None:
        while self._issued and self._issued[0] < now - RATE_WINDOW_S:
            self._issued.popleft()

    def rate_per_minute(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return len(self._issued) * 60.0 / RATE_WINDOW_S

    def failures(self) -> list[Failure]:
        with self._lock:
            return list(reversed(self._failures))


# Threads of the certificate route's executor. Issuance blocks on the disk sync and
# the HSM, not on the GIL: more concurrent issuers make larger group commits.
ISSUE_THREADS = 64


class AppContext:
    """The station as one API process holds it (settings, ledger, CA, metrics,
    line view, activity): what every route needs, built once per app by create_app()."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._issue_executor: ThreadPoolExecutor | None = None
        self._ledger: Ledger | None = None
        self._ca: CertificateAuthority | None = None
        self._station_lock: StationLock | None = None
        self._ocsp: Responder | None = None
        self._recovering = threading.Lock()  # one thread recovers for the others
        self.line = LineView(settings.data_dir / FILE_NAME)
        self.metrics = Metrics(
            lambda: self.ledger.counts(),
            lambda: tallies(self.ledger.engine),
            self.line.snapshot,
            self.sync_status,
        )
        self.activity = Activity()
        self.token_cache = TokenCache()
        self.auth_limiter = AuthFailureLimiter(settings.auth_failures_per_minute, 60.0)

    @property
    def ledger(self) -> Ledger:
        with self._lock:
            if self._ledger is None:
                self._ledger = Ledger.from_settings(self.settings)
            return self._ledger

    @property
    def ca(self) -> CertificateAuthority:
        with self._lock:
            if self._ca is None:
                self._ca = TimedCA(open_ca(self.settings), self.metrics.hsm_sign_seconds.observe)
            return self._ca

    def sync_status(self) -> SyncStatus | None:
        """What the whitelist sync loop (of any process on this data directory) last did."""
        return read_status(self.settings)

    def ocsp_responder(self) -> Responder:
        """The OCSP responder of the CA open now (a new one after the CA was reopened)."""
        ca, engine = self.ca, self.ledger.engine
        with self._lock:
            if self._ocsp is None or self._ocsp.ca is not ca or self._ocsp.engine is not engine:
                self._ocsp = Responder(engine, ca)
            return self._ocsp

    @property
    def issue_executor(self) -> ThreadPoolExecutor:
        """Certificate requests run here, apart from the threadpool every other sync
        route shares: a burst of issuance does not queue the dashboard, and the
        other way round."""
        with self._lock:
            if self._issue_executor is None:
                self._issue_executor = ThreadPoolExecutor(ISSUE_THREADS, thread_name_prefix="issue")
            return self._issue_executor

    def issuing_ca(self) -> CertificateAuthority:
        """The CA, for issuing: only once this process holds the station's lock.

        A worker whose start-up recovery could not run (the token not there yet,
        the ledger refusing) recovers before its first certificate instead:
        without the lock, a process of this station starting later would take
        this one's intents for a dead run's and resolve them under it.
        """
        if self._station_lock is None:
            with self._recovering:
                if self._station_lock is None:
                    try:
                        self.recover()
                    except (StationError, HsmError):
                        raise
                    except Exception as exc:
                        raise StationError(
                            f"this worker could not recover its station's intents: {exc}",
                            code="recovery-failed",
                            kind=Kind.UNAVAILABLE,
                        ) from exc
        return self.ca

    def recover(self) -> RecoveryReport:
        """Start-up recovery of the intents a killed process of this station left.

        Holds the station's shared lock until close(), so a worker that starts
        later leaves this one's young intents alone (station.recovery).
        """
        report, lock = recover_at_startup(self.ledger, self.ca, self.settings.data_dir)
        with self._lock:
            if self._station_lock is not None:
                self._station_lock.close()
            self._station_lock = lock
        return report

    def forget_ca(self) -> None:
        """Drop the open CA after an HSM failure: the next use opens it again, so a
        key and certificate replaced meanwhile (`station init --force`) are picked up
        without a restart."""
        with self._lock:
            self._ca = None

    def close(self) -> None:
        with self._lock:
            executor, self._issue_executor = self._issue_executor, None
        if executor is not None:
            executor.shutdown(wait=True)  # requests in flight finish before the ledger closes
        with self._lock:
            if self._station_lock is not None:
                self._station_lock.close()
                self._station_lock = None
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None
            self._ca = None

    # ------------------------------------------------------------- health
    def health(self) -> dict[str, dict[str, str]]:
        """Each part (token, key, database) with status ok or its failure code and detail."""
        checks: dict[str, dict[str, str]] = {}
        ok = {"status": "ok"}
        try:
            try:
                self.ca.health()
            except (KeyNotFound, KeyMismatch):
                # Perhaps only the open CA is stale (key and certificate replaced).
                self.forget_ca()
                self.ca.health()
            checks["token"] = ok
            checks["key"] = ok
        except (KeyNotFound, KeyMismatch) as exc:
            checks["token"] = ok
            checks["key"] = {"status": "failing", "code": exc.code, "detail": str(exc)}
        except HsmError as exc:
            self.forget_ca()
            checks["token"] = {"status": "failing", "code": exc.code, "detail": str(exc)}
            checks["key"] = {"status": "unknown"}
        except StationError as exc:
            checks["token"] = {"status": "unknown"}
            checks["key"] = {"status": "failing", "code": exc.code, "detail": exc.message}
        try:
            self._check_database()
            checks["database"] = ok
        except Exception as exc:
            checks["database"] = {
                "status": "failing",
                "code": "database-unreachable",
                "detail": f"{type(exc).__name__}: {exc}"[:300],
            }
        else:
            failure = self.ledger.write_failure
            if failure is not None:  # this process writes no more until restarted
                checks["database"] = {
                    "status": "failing",
                    "code": "ledger-sync-failed",
                    "detail": f"a sync of the ledger's log to disk failed ({failure}); "
                    "restart the station"[:300],
                }
        return checks

    def _check_database(self) -> None:
        url = make_url(self.settings.resolved_database_url())
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            # A fresh connection, not the pool's: a pooled one keeps a removed file alive.
            uri = Path(str(url.database)).resolve().as_uri() + "?mode=rw"
            conn = sqlite3.connect(uri, uri=True, timeout=5.0)
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                conn.close()
        ping(self.ledger.engine)


async def get_station(request: Request) -> AppContext:
    # async: a sync dependency costs a threadpool round trip on every request.
    station: AppContext = request.app.state.station
    return station


ContextDep = Annotated[AppContext, Depends(get_station)]


def jsonable(obj: Any) -> Any:
    """A frozen ledger record as a JSON-ready dict."""
    from dataclasses import asdict

    return asdict(obj)
