"""The whitelist sync as a loop: the whitelist follows the line within seconds.

``station aws sync-whitelist --watch`` runs it in the foreground; ``station serve``
runs it in one of its workers when ``STATION_AWS_SYNC_INTERVAL`` is set. Each
round syncs the ledger's whitelist to DynamoDB and AWS IoT (``aws_sync``)
and writes what happened to ``DATA_DIR/aws-sync-status.json``, so /metrics, the
health details and the dashboard of every worker (and of a ``station serve``
beside a separate ``--watch`` process) show the same lag and last error.

The lag is the age of the last successful round's start: every board verified
before it is published, so no verified board has waited longer than the lag
(plus one round) for its whitelisting.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from station import aws_iot
from station.errors import StationError
from station.files import write_atomically
from station.ledger import Ledger
from station.publish import aws_sync
from station.publish.aws_state import RevokedInAws
from station.settings import Settings

STATUS_FILE = "aws-sync-status.json"
LOCK_FILE = "aws-sync.lock"


def status_path(settings: Settings) -> Path:
    return settings.data_dir / STATUS_FILE


@dataclass(frozen=True, slots=True)
class SyncStatus:
    """What the last rounds of a sync loop did (the content of the status file)."""

    interval: float
    pid: int
    last_attempt_at: float | None = None  # Unix time
    last_success_at: float | None = None  # when the last successful round ended
    last_success_started_at: float | None = None
    last_error_code: str | None = None  # None after a successful round
    last_error: str | None = None
    last_error_at: float | None = None
    rounds: int = 0
    failures: int = 0
    last_report: dict[str, Any] | None = None

    def lag(self, now: float | None = None) -> float | None:
        """Seconds since the start of the last successful round (None: none yet)."""
        if self.last_success_started_at is None:
            return None
        return max(0.0, (now or time.time()) - self.last_success_started_at)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        def iso(t: float | None) -> str | None:
            return None if t is None else datetime.fromtimestamp(t, UTC).isoformat()

        lag = self.lag(now)
        return {
            "interval_seconds": self.interval,
            "lag_seconds": None if lag is None else round(lag, 3),
            "last_attempt_at": iso(self.last_attempt_at),
            "last_success_at": iso(self.last_success_at),
            "last_error": (
                None
                if self.last_error_code is None
                else {
                    "code": self.last_error_code,
                    "detail": self.last_error,
                    "at": iso(self.last_error_at),
                }
            ),
            "rounds": self.rounds,
            "failures": self.failures,
            "last_report": self.last_report,
        }


def read_status(settings: Settings) -> SyncStatus | None:
    """The status a sync loop last wrote, or None when no loop has run here."""
    try:
        data = json.loads(status_path(settings).read_text())
        return SyncStatus(**data)
    except (OSError, ValueError, TypeError):
        return None


def _write_status(path: Path, status: SyncStatus) -> None:
    # rewritten every round: no fsync (a power cut loses a status, not a fact)
    data = json.dumps(asdict(status), sort_keys=True).encode()
    write_atomically(path, data, mode=0o600, sync=False)  # AWS errors name accounts


def _report_dict(report: aws_sync.SyncReport) -> dict[str, Any]:
    return {
        "added": report.added,
        "updated": report.updated,
        "unchanged": report.unchanged,
        "removed": report.removed,
        "revoked": report.revoked,
        "deactivated": report.deactivated,
        "reactivated": report.reactivated,
        "skipped": len(report.skipped),
        "warnings": [w.code for w in report.warnings],
    }


def sync_once(
    settings: Settings, ledger: Ledger, *, dynamodb: Any, iot: Any
) -> aws_sync.SyncReport:
    """One sync of the whole whitelist, remembering revoked certificates in the ledger."""
    with aws_iot.aws_errors("sync-whitelist"):
        return aws_sync.sync_whitelist(
            dynamodb,
            settings.whitelist_table,
            ledger.whitelist(),
            ledger.delisted_serials(),
            iot=iot,
            revoked=RevokedInAws(ledger.engine),
            policy=aws_sync.DevicePolicy(settings.aws_policy_name, settings.aws_topic_prefix),
        )


class SyncLoop:
    """Sync every ``interval`` seconds until ``stop`` is set; never raises for a failed round."""

    def __init__(
        self,
        settings: Settings,
        interval: float,
        *,
        on_round: Callable[[aws_sync.SyncReport | None, StationError | None], None] | None = None,
    ) -> None:
        self.settings = settings
        self.interval = interval
        self.on_round = on_round
        self.stop = threading.Event()
        self.status = SyncStatus(interval=interval, pid=os.getpid())
        self._clients: tuple[Any, Any] | None = None

    def round(self, ledger: Ledger) -> aws_sync.SyncReport | None:
        started = time.time()
        report: aws_sync.SyncReport | None = None
        error: StationError | None = None
        try:
            if self._clients is None:
                self._clients = (aws_iot.client("dynamodb"), aws_iot.client("iot"))
            dynamodb, iot = self._clients
            report = sync_once(self.settings, ledger, dynamodb=dynamodb, iot=iot)
        except StationError as exc:
            error = exc
        except Exception as exc:  # a round must not kill the loop (database down...)
            error = StationError(f"{type(exc).__name__}: {exc}", code="sync-failed")
        ended = time.time()
        s = self.status
        if error is None and report is not None:
            problem = report.warnings[0] if report.warnings else None
            self.status = SyncStatus(
                interval=s.interval,
                pid=s.pid,
                last_attempt_at=ended,
                last_success_at=ended,
                last_success_started_at=started,
                last_error_code=problem.code if problem else None,
                last_error=problem.message if problem else None,
                last_error_at=ended if problem else None,
                rounds=s.rounds + 1,
                failures=s.failures,
                last_report=_report_dict(report),
            )
        else:
            assert error is not None
            self.status = SyncStatus(
                interval=s.interval,
                pid=s.pid,
                last_attempt_at=ended,
                last_success_at=s.last_success_at,
                last_success_started_at=s.last_success_started_at,
                last_error_code=error.code,
                last_error=error.message[:500],
                last_error_at=ended,
                rounds=s.rounds + 1,
                failures=s.failures + 1,
                last_report=s.last_report,
            )
        with contextlib.suppress(OSError):
            _write_status(status_path(self.settings), self.status)
        if self.on_round is not None:
            self.on_round(report, error)
        return report

    def run(self, ledger: Ledger, *, rounds: int | None = None) -> None:
        done = 0
        while not self.stop.is_set():
            started = time.monotonic()
            self.round(ledger)
            done += 1
            if rounds is not None and done >= rounds:
                return
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - started)))


class LoopLock:
    """One sync loop per data directory: the worker (or process) holding this runs it."""

    def __init__(self, settings: Settings) -> None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(settings.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)

    def acquire(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def close(self) -> None:
        os.close(self._fd)  # releases the lock
