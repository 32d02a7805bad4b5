"""Start-up recovery: resolve the intents a killed run of this station left behind.

A station killed between recording an intent and committing its certificate
leaves an ``intent`` row, and the ledger refuses that board
(``issuance-in-progress``) until :meth:`Ledger.recover` signs the intent again
or marks it failed. Every station process (``station line run``, each worker
of ``station serve``, ``station sign``) recovers when it starts.

It must not resolve an intent that a live process of the same station is still
signing (that process would then lose its certificate with
``intent-resolved``). Every such process holds a shared ``flock`` on
``DATA_DIR/station-<station id>.lock`` for as long as it runs; the kernel drops
it when the process dies, SIGKILL included. A process that gets the lock
exclusively is the only one of its station alive, so every intent of the
station is orphaned and is recovered at once; otherwise only intents older than
``RECOVERY_GRACE`` are. Processes of one station id must share the data
directory (the default: one station per host); other stations' intents are
theirs to recover.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from station.ca import CertificateAuthority
from station.filemodes import private_dir
from station.ledger import Ledger
from station.ledger.records import RecoveryReport

log = logging.getLogger(__name__)

# An intent at least this old belongs to a dead run, not to a live process of
# this station that is still signing it (a signature takes milliseconds).
RECOVERY_GRACE = timedelta(seconds=30)


@dataclass
class StationLock:
    """The shared lock a running station process holds; ``close()`` drops it."""

    path: Path
    fd: int | None

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def lock_path(data_dir: Path, station_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", station_id)[:100] or "_"
    return data_dir / f"station-{safe}.lock"


def recover_at_startup(
    ledger: Ledger,
    ca: CertificateAuthority,
    data_dir: Path,
    *,
    grace: timedelta = RECOVERY_GRACE,
) -> tuple[RecoveryReport, StationLock]:
    """Recover this station's orphaned intents; returns the report and the lock to hold.

    Keep the lock until the process ends (or ``close()`` it when it stops
    issuing): while it is held, a station process starting beside this one
    leaves this one's young intents alone.
    """
    path = lock_path(data_dir, ledger.station_id)
    try:
        private_dir(data_dir)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.warning("cannot open %s (%s); recovering intents older than %s only", path, exc, grace)
        return ledger.recover(ca, older_than=grace), StationLock(path, None)
    lock = StationLock(path, fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Another process of this station runs: it may be signing right now.
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while one recovers alone
            report = ledger.recover(ca, older_than=grace)
        else:
            report = ledger.recover(ca)
            fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        lock.close()
        raise
    if report.resigned or report.failed:
        log.warning(
            "start-up recovery: %d intent(s) signed again, %d marked failed %s",
            len(report.resigned),
            len(report.failed),
            list(report.failed),
        )
    return report, lock
