"""The whitelist sync loop `station serve` runs when STATION_AWS_SYNC_INTERVAL is set.

One worker runs it (the one that takes DATA_DIR/aws-sync.lock); with a separate
`station aws sync-whitelist --watch` on the same data directory holding the lock,
no worker runs one. Every worker reads the loop's status file for /metrics, the
health details (/healthz with an operator token) and the dashboard.
"""

from __future__ import annotations

import logging
import threading

from station.ledger import Ledger
from station.publish.whitelist_sync import LoopLock, SyncLoop
from station.settings import Settings

log = logging.getLogger("api.sync")


class ServerSync:
    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self._lock: LoopLock | None = None
        self._loop: SyncLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start the loop in a thread if configured and no one else runs it; True if started."""
        interval = self.settings.aws_sync_interval
        if interval is None:
            return False
        lock = LoopLock(self.settings)
        if not lock.acquire():
            lock.close()
            log.info("another process runs the whitelist sync of %s", self.settings.data_dir)
            return False
        self._lock = lock
        self._loop = SyncLoop(self.settings, interval)
        self._thread = threading.Thread(
            target=self._loop.run, args=(self.ledger,), name="whitelist-sync", daemon=True
        )
        self._thread.start()
        log.info("whitelist sync every %g s", interval)
        return True

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._lock is not None:
            self._lock.close()
        self._loop = self._thread = self._lock = None
