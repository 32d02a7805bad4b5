"""Group commit: concurrent writers share one transaction and one disk sync.

A certificate must be on disk before it leaves the station, and a disk sync
costs milliseconds (4 ms on the development VM) while everything else about a
certificate costs well under one. When several threads issue at once (HTTP
workers, serial ports), the first to arrive leads: it takes every write queued
so far, runs each in its own savepoint inside one transaction and commits once,
durably if any of them needs it; writes that arrive meanwhile form the next
group. A lone caller pays what it would without grouping: nothing waits for
company. Results are handed out only after the commit returned.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine

from station.ledger.db import write_transaction

T = TypeVar("T")


@dataclass
class _Job:
    fn: Callable[[Connection], Any]
    durable: bool
    result: Any = None
    error: BaseException | None = None
    done: bool = False


class GroupCommitter:
    """Runs ``fn(conn)`` write jobs of many threads in shared transactions."""

    def __init__(self, engine: Engine, *, max_group: int = 64) -> None:
        self._engine = engine
        self._max = max_group
        self._queue: list[_Job] = []
        self._busy = False
        self._cv = threading.Condition()
        self.groups = 0  # commits made, for benchmarks and tests
        self.jobs = 0

    def submit(self, fn: Callable[[Connection], T], *, durable: bool) -> T:
        """Run fn inside a write transaction; return its result once committed."""
        job = _Job(fn, durable)
        with self._cv:
            self._queue.append(job)
            while not job.done:
                if self._busy:
                    self._cv.wait()
                    continue
                self._busy = True
                group = self._queue[: self._max]
                del self._queue[: len(group)]
                self._cv.release()
                try:
                    self._run(group)
                finally:
                    self._cv.acquire()
                    for j in group:
                        j.done = True
                    self._busy = False
                    self.groups += 1
                    self.jobs += len(group)
                    self._cv.notify_all()
        if job.error is not None:
            raise job.error
        return job.result

    def _run(self, group: list[_Job]) -> None:
        results: list[tuple[_Job, Any]] = []
        try:
            with write_transaction(self._engine, durable=any(j.durable for j in group)) as conn:
                if len(group) == 1:  # alone: its failure rolls back the transaction itself
                    results.append((group[0], group[0].fn(conn)))
                else:
                    for job in group:
                        savepoint = conn.begin_nested()
                        try:
                            value = job.fn(conn)
                        except Exception as exc:  # that job alone fails; the rest commit
                            savepoint.rollback()
                            job.error = exc
                        else:
                            savepoint.commit()
                            results.append((job, value))
        except BaseException as exc:  # a lone job's refusal, or the commit itself failed
            for job in group:
                job.error = job.error or exc
            return
        for job, value in results:
            job.result = value
