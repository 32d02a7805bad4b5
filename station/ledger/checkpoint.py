"""WAL checkpoints off the write path (SQLite files).

SQLite copies the WAL back into the database file (a checkpoint) from inside the
commit that takes the WAL past 1,000 pages: that commit writes some 4 MB and
syncs the database file before it returns. The group committer holds the
station's write gate (:class:`~station.ledger.db._WriteGate`) across its commit,
so every writer of every process sharing the file stalled behind it, every few
dozen certificates (about 5% of the rate at 32 HTTP clients, docs/benchmarks.md).

Here the group committer's connection commits with automatic checkpoints off,
and a thread of its own checkpoints instead, every so many commits, on a
connection of its own, without the gate: a ``PASSIVE`` checkpoint takes no
lock that writers need, so writing goes on while it copies and syncs (SQLite
syncs the WAL before copying and the database after, as it does for its own
checkpoints). Nothing about durability changes: a frame is durable once the
WAL is synced, which the group committer does before any result leaves.

A checkpoint that runs while writers append cannot catch up with them, and the
WAL only starts over from its beginning when a writer finds it fully copied.
So when the WAL has grown past :data:`WAL_FRAMES_LIMIT` the checkpointer takes
the write gate for one last ``PASSIVE`` pass: the frames appended since its
previous pass, then the next writer starts the WAL over. The WAL stays bounded
at a few times the 4 MB SQLite would have let it reach, at the price of a short
stall once per that many frames instead of a long one every 1,000 pages.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading

from sqlalchemy import Engine

from station.ledger.db import write_gate

log = logging.getLogger(__name__)

# Durable group commits between two checkpoints (a commit writes 5-40 pages).
CHECKPOINT_EVERY = 48
# WAL frames (pages) past which the checkpointer catches up at the write gate.
WAL_FRAMES_LIMIT = 4000


class WalCheckpointer:
    """A daemon thread checkpointing one SQLite file's WAL when told commits happened."""

    def __init__(
        self,
        engine: Engine,
        *,
        every: int = CHECKPOINT_EVERY,
        frames_limit: int = WAL_FRAMES_LIMIT,
    ) -> None:
        path = engine.url.database
        assert path
        self._engine = engine
        self._path = path
        self._every = every
        self._frames_limit = frames_limit
        self._cv = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None  # the running thread's
        self.passes = 0  # checkpoints run, for tests and benchmarks
        self.gated = 0  # of them, catch-ups at the write gate

    def committed(self) -> None:
        """One more durable commit; wakes the thread every ``every`` of them."""
        with self._cv:
            self._pending += 1
            if self._pending < self._every:
                return
            if self._thread is None:  # first use, or first since close()
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._loop, args=(self._stop,), name="ledger-checkpoint", daemon=True
                )
                self._thread.start()
            self._cv.notify()

    def close(self) -> None:
        """Stop the thread (a later commit starts another)."""
        with self._cv:
            thread, stop = self._thread, self._stop
            self._thread = self._stop = None
            if stop is not None:
                stop.set()
            self._cv.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    def _loop(self, stop: threading.Event) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                with self._cv:
                    while self._pending < self._every and not stop.is_set():
                        self._cv.wait()
                    if stop.is_set():
                        return
                    self._pending = 0
                try:
                    if conn is None:
                        conn = sqlite3.connect(
                            self._path, timeout=30.0, isolation_level=None, check_same_thread=False
                        )
                        conn.execute("PRAGMA synchronous=FULL")
                    self.checkpoint(conn)
                except sqlite3.Error as exc:  # the next pass tries again
                    log.warning("WAL checkpoint of %s failed: %s", self._path, exc)
                    if conn is not None:
                        with contextlib.suppress(sqlite3.Error):
                            conn.close()
                    conn = None
        finally:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def checkpoint(self, conn: sqlite3.Connection) -> tuple[int, int, int]:
        """One pass, then a catch-up at the write gate if the WAL is past its limit.

        Returns SQLite's (busy, frames in the WAL, frames copied) of the last pass.
        """
        result = self._passive(conn)
        self.passes += 1
        if result[1] >= self._frames_limit:
            with write_gate(self._engine):
                result = self._passive(conn)
            self.gated += 1
        return result

    @staticmethod
    def _passive(conn: sqlite3.Connection) -> tuple[int, int, int]:
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[0]), int(row[1]), int(row[2])
