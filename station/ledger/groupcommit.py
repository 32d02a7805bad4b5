"""Group commit: concurrent writers share one transaction and one disk sync.

A certificate must be on disk before it leaves the station, and a disk sync
costs milliseconds while everything else about a certificate costs well under
one (docs/benchmarks.md has the figures). When several threads issue at once (HTTP
workers, serial ports), the first to arrive leads: it takes every write queued
so far, runs each in its own savepoint inside one transaction and commits once,
durably if any of them needs it; writes that arrive meanwhile form the next
group. A lone caller pays what it would without grouping: nothing waits for
company. Results are handed out only after the commit returned.

On a SQLite file the disk sync is also taken out of the write lock: a group
commits with ``synchronous=NORMAL`` (its frames are written to the WAL, not yet
synced), hands the lead to the next group, and only then syncs the WAL file
itself (:func:`~station.ledger.db.sync_log`) before its callers get their
results. That is what ``synchronous=FULL`` does at commit, moved to where the
next group can write meanwhile; a sync that fails fails every job of the
group (``ledger-sync-failed``), so nothing is handed out undurable. WAL
checkpoints leave the write lock too: the kept connection commits with
automatic checkpoints off and a thread checkpoints beside the writers
(:mod:`station.ledger.checkpoint`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine

from station.errors import Kind, StationError
from station.ledger.checkpoint import WalCheckpointer
from station.ledger.db import (
    adopt_lock,
    fork_generation,
    pipelined_sync,
    sync_log,
    write_transaction,
)
from station.ledger.rawsql import Raw

T = TypeVar("T")

# A kept connection idle longer than this goes back to the pool, whose checkout
# tests it (a PostgreSQL restart would otherwise fail the next group).
_IDLE_SECONDS = 5.0
# SQLite's default, for a connection going back to the pool.
_SQLITE_AUTOCHECKPOINT = 1000


def _driver(conn: Connection) -> Any:
    raw = conn.connection.driver_connection
    assert raw is not None
    return raw


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


def _sync_failed(cause: str) -> StationError:
    return StationError(
        f"the ledger could not sync its log to disk ({cause}); it takes no more writes "
        "until the station is restarted",
        code="ledger-sync-failed",
        kind=Kind.UNAVAILABLE,
    )


@dataclass
class _Job:
    fn: Callable[[Connection], Any]
    durable: bool
    result: Any = None
    error: BaseException | None = None
    done: bool = False
    # Held until the job is done or its thread must lead; released to wake it.
    # One lock per job, so a finished group wakes its own threads and the next
    # leader, not every waiting thread.
    wake: threading.Lock = field(default_factory=_held_lock)


class GroupCommitter:
    """Runs ``fn(conn)`` write jobs of many threads in shared transactions."""

    def __init__(self, engine: Engine, *, max_group: int = 64) -> None:
        self._engine = engine
        self._max = max_group
        self._pipelined = pipelined_sync(engine)
        # Set by the first failed log sync, for good: see _sync().
        self._failure: str | None = None
        self.syncs = 0
        self.groups = 0  # commits made, for benchmarks and tests
        self.jobs = 0
        self._start()

    @property
    def failure(self) -> str | None:
        """Why this committer takes no more writes (its log sync failed), or None."""
        return self._failure

    def _start(self) -> None:
        """The per-process state: locks, queue, kept connection, sync counters."""
        self._queue: list[_Job] = []
        self._busy = False
        self._leading = 0  # groups between taking the lead and waking their callers
        self._mutex = threading.Lock()
        # The leader's connection, kept between groups (only a leader uses it);
        # dropped after any failure so a broken one is never reused.
        self._conn: Connection | None = None
        self._gen = fork_generation()
        self._used = 0.0
        self.checkpointer = WalCheckpointer(self._engine) if self._pipelined else None
        self._sync_cv = threading.Condition()
        self._commit_no = 0  # durable-pending commits made (pipelined mode)
        self._synced_no = 0  # the last of them known to be on disk
        self._syncing = False

    def _adopt(self) -> None:
        """In a forked child, start afresh: the parent's state is not this process's.

        Its threads are gone: one may have held the mutex, been syncing or
        leading when the process forked, and nobody would ever release, finish
        or hand on. Its connection is the parent's, its checkpointer thread the
        parent's. Jobs the parent had queued are the parent's to run.
        """
        with adopt_lock():
            if self._gen != fork_generation():
                self._start()

    def close(self) -> None:
        """Give the kept connection back (Ledger.close calls this).

        Waits for groups in flight, their log syncs included, so nothing of
        this committer runs after it returns.
        """
        if self._gen != fork_generation():
            self._adopt()
        while True:
            with self._mutex:
                idle = not self._busy and not self._leading
                if idle:
                    self._drop()
                    checkpointer = self.checkpointer
            if idle:
                if checkpointer is not None:
                    checkpointer.close()
                return
            time.sleep(0.01)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or self._gen != fork_generation():
            return
        try:
            if self._pipelined:  # back to the pool as every other connection is
                _driver(conn).execute("PRAGMA synchronous=FULL")
                _driver(conn).execute(f"PRAGMA wal_autocheckpoint={_SQLITE_AUTOCHECKPOINT}")
        except Exception:
            conn.invalidate()  # never pooled in a state that would skip syncs
        with contextlib.suppress(Exception):
            conn.close()

    def submit(self, fn: Callable[[Connection], T], *, durable: bool) -> T:
        """Run fn inside a write transaction; return its result once committed.

        With ``durable=True`` (and on a SQLite file for every job that shares a
        sync with one), only once the log is synced past the commit.
        """
        if self._gen != fork_generation():
            self._adopt()
        if self._failure is not None:
            raise _sync_failed(self._failure)
        job = _Job(fn, durable)
        with self._mutex:
            self._queue.append(job)
            lead = not self._busy
            self._busy = True
        if not lead:
            job.wake.acquire()  # done, or handed the lead (oldest job waiting)
        if not job.done:
            self._lead(job)
        if job.error is not None:
            raise job.error
        return job.result

    def run_alone(self, fn: Callable[[Connection], T]) -> T:
        """A rare write (a batch, a token) in a durable transaction of its own.

        Through the same write gate as the groups, refused like every job after a
        failed log sync, but never grouped: nothing waits on it but its caller.
        """
        if self._failure is not None:
            raise _sync_failed(self._failure)
        with write_transaction(self._engine) as conn:
            return fn(conn)

    def _lead(self, own: _Job) -> None:
        """Commit the oldest waiting jobs (the leader's own among them) as one group."""
        group: list[_Job] = []
        handed = False
        try:
            with self._mutex:
                group = self._queue[: self._max]
                del self._queue[: len(group)]
                self._leading += 1
            commit_no = self._run(group)
            # The next group may write while this one waits for the disk.
            self._hand_off()
            handed = True
            if commit_no:
                self._sync(group, commit_no)
                if self.checkpointer is not None:
                    self.checkpointer.committed()
        finally:
            if not handed:
                self._hand_off()
            with self._mutex:
                for j in group:
                    j.done = True
                self.groups += 1
                self.jobs += len(group)
                self._leading -= 1
            for j in group:
                if j is not own:
                    j.wake.release()

    def _hand_off(self) -> None:
        with self._mutex:
            successor = self._queue[0] if self._queue else None
            self._busy = successor is not None
        if successor is not None:
            successor.wake.release()

    def _sync(self, group: list[_Job], commit_no: int) -> None:
        """Wait until the log is synced past commit ``commit_no``; one sync covers many.

        One thread syncs at a time, covering every commit made before it
        started; groups that committed meanwhile wait for it to end, then one
        of them syncs for all of them.

        A sync that fails fails every group it was to cover, and every write
        after it, until the ledger is opened again (the station restarted): on
        Linux a failed ``fdatasync`` may have dropped the pages it could not
        write and reports that once, so a later sync that succeeds proves
        nothing about the frames before it. PostgreSQL stops for the same
        reason. Opening the ledger again lets SQLite check the WAL's frames
        against their checksums and keep the valid ones.
        """
        try:
            with self._sync_cv:
                while self._synced_no < commit_no:
                    if self._failure is not None:
                        raise _sync_failed(self._failure)
                    if self._syncing:
                        self._sync_cv.wait()
                        continue
                    self._syncing = True
                    target = self._commit_no
                    self._sync_cv.release()
                    try:
                        sync_log(self._engine)
                    except BaseException as exc:
                        self._failure = self._failure or f"{exc.__class__.__name__}: {exc}"
                        raise
                    finally:
                        self._sync_cv.acquire()
                        self._syncing = False
                        self._sync_cv.notify_all()
                    self._synced_no = max(self._synced_no, target)
                    self.syncs += 1
        except BaseException as exc:  # whatever it was, nothing of the group is durable
            error = _sync_failed(self._failure or f"{exc.__class__.__name__}: {exc}")
            for job in group:
                job.error = job.error or error
            if not isinstance(exc, Exception):
                raise

    def _connection(self) -> Connection:
        now = time.monotonic()
        if self._conn is not None and now - self._used > _IDLE_SECONDS:
            self._drop()  # idle a while: let the pool check it (pre-ping) before reuse
        if self._conn is None:
            self._conn = self._engine.connect()
            if self._pipelined:  # commits unsynced; _sync() follows (restored in _drop)
                _driver(self._conn).execute("PRAGMA synchronous=NORMAL")
                # Checkpoints by self.checkpointer, off the write lock (restored in _drop).
                _driver(self._conn).execute("PRAGMA wal_autocheckpoint=0")
        self._used = now
        return self._conn

    def _run(self, group: list[_Job]) -> int:
        """Run and commit the group; its commit number when it still needs the log synced.

        Pipelined (SQLite), jobs that arrive while the group runs join it
        (``group`` grows) up to the group limit: one commit, one sync and one
        hand-off serve them all, where each would otherwise cost a round of
        thread wake-ups.
        """
        if self._failure is not None:  # queued before the sync failed: not written
            error = _sync_failed(self._failure)
            for job in group:
                job.error = error
            return 0
        results: list[tuple[_Job, Any]] = []
        durable = any(j.durable for j in group)
        try:
            # Pipelined, the kept connection is already synchronous=NORMAL:
            # no per-transaction switch (durable=True), the sync comes after.
            with write_transaction(
                self._engine,
                durable=durable or self._pipelined,
                connection=self._connection(),
            ) as conn:
                if len(group) == 1:  # alone: its failure rolls back the transaction itself
                    results.append((group[0], group[0].fn(conn)))
                    batch: list[_Job] = []
                else:
                    batch = group
                # Savepoints on the driver cursor: SQLAlchemy's begin_nested()
                # costs an execution context per statement, twice per job.
                cur = Raw(conn)
                while True:
                    for job in batch:
                        cur.run("SAVEPOINT ledger_job")
                        try:
                            value = job.fn(conn)
                        except Exception as exc:  # that job alone fails; the rest commit
                            cur.run("ROLLBACK TO SAVEPOINT ledger_job")
                            cur.run("RELEASE SAVEPOINT ledger_job")
                            job.error = exc
                        else:
                            cur.run("RELEASE SAVEPOINT ledger_job")
                            results.append((job, value))
                    if not self._pipelined:
                        break
                    with self._mutex:
                        batch = self._queue[: self._max - len(group)]
                        del self._queue[: len(batch)]
                    if not batch:
                        break
                    group.extend(batch)
                    durable = durable or any(j.durable for j in batch)
        except BaseException as exc:  # a lone job's refusal, or the commit itself failed
            self._drop()
            for job in group:
                job.error = job.error or exc
            return 0
        for job, value in results:
            job.result = value
        if not (durable and self._pipelined):
            return 0
        with self._sync_cv:
            self._commit_no += 1
            return self._commit_no
