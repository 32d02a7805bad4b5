"""The line on several processes: ports shared out among worker processes.

One Python process provisions on one core at most (the ledger, the HSM calls
and the protocol all take the GIL), so on a machine with several cores a long
line of ports is CPU-bound long before the wire is. ``ProcessLine`` runs a
``LineDriver`` in each of N worker processes and hands each a share of the
ports; it has the driver's interface (``status``, ``records``, ``run``,
``stop``, ``finished_devices``), so the live view and the CLI drive either.

Each worker opens its own ledger engine and its own PKCS#11 session (one
login per process, as the key store wants) and reports every step, outcome
and finished board to the parent over a pipe; the parent keeps the one
``LineStatus`` (live view, ``line-status.json``) and the records, rescans the
ports, and gives a new port to the worker with the fewest (a port that comes
back goes to the worker that had it). A worker that dies has its ports handed
to the others at the next rescan; its board in flight is left as the ledger
recorded it and is provisioned again when plugged in again.

Writers of different processes queue on the ledger's write lock (SQLite's
database lock, PostgreSQL's advisory lock); group commit works within each
worker. Start-up recovery and the station lock stay with the parent.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from station.errors import Kind, StationError
from station.line.driver import (
    RESCAN_INTERVAL,
    BoardRecord,
    ClientFactory,
    LineDriver,
    open_port_client,
)
from station.line.provision import Outcome, ProvisionContext
from station.line.status import LineStatus
from station.settings import Settings

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT = 120.0  # imports, the ledger's engine, the HSM login
WORKER_STOP_TIMEOUT = 60.0  # a worker's ports finish their current request first
_WORKER_RESCAN = 0.2  # a worker's port list is a local list: rescanning it is free
_PUMP_INTERVAL = 0.05


class LineError(StationError):
    """A worker process could not start, or every worker died."""

    code = "line-worker"
    kind = Kind.UNAVAILABLE


@dataclass(frozen=True)
class WorkerStats:
    """What a worker reports when it stops (CPU seconds since it was ready)."""

    pid: int
    cpu_seconds: float
    ledger_seconds: float = 0.0  # inside the line's ledger calls, wall (measure_ledger)
    ledger_cpu_seconds: float = 0.0  # the same calls, CPU of the calling threads


class ForwardingStatus(LineStatus):
    """A worker's LineStatus: every report goes to the parent, which keeps the real one.

    Steps are queued here and sent together by ``forward()`` (the worker's tick,
    ten times a second): a pipe message per step would cost the worker more than
    the step. A board's verdict is not left waiting for the tick: ``finished()``
    forwards at once, with the board's record (``record()``, queued just before)
    and the steps queued ahead of it, so a worker killed a moment later has
    already handed the parent every board it finished. ``send`` is the pipe."""

    def __init__(self, batch: str, send: Callable[[tuple[str, Any]], None]) -> None:
        super().__init__(batch)
        self._queue: list[tuple[str, Any]] = []
        self._queue_lock = threading.Lock()
        # Held across take-and-send: batches reach the parent in the order queued.
        self._forward_lock = threading.Lock()
        self._forward_to = send
        self._noise: dict[str, tuple[int, int, int]] = {}  # last forwarded, per port

    def _send(self, message: tuple[str, Any]) -> None:
        with self._queue_lock:
            self._queue.append(message)

    def take(self) -> list[tuple[str, Any]]:
        with self._queue_lock:
            queued, self._queue = self._queue, []
        return queued

    def forward(self) -> None:
        """Send the parent what is queued, as one message."""
        with self._forward_lock:
            queued = self.take()
            if queued:
                self._forward_to(("batch", queued))

    def record(self, record: BoardRecord) -> None:
        self._send(("record", record))

    def port_added(self, port: str) -> None:
        self._send(("status", ("port_added", (port,))))

    def port_gone(self, port: str) -> None:
        self._send(("status", ("port_gone", (port,))))

    def step(self, port: str, step: str, device_id: str | None = None) -> None:
        self._send(("status", ("step", (port, step, device_id))))

    def port_error(self, port: str, message: str) -> None:
        self._send(("status", ("port_error", (port, message))))
        self.forward()  # an operator waits for it: not left for the tick

    def noise(self, port: str, bad_frames: int, resends: int, corrected: int = 0) -> None:
        # Reported after every poll of an idle port: forwarded only when it changed.
        now = (bad_frames, resends, corrected)
        with self._queue_lock:
            if self._noise.get(port) == now:
                return
            self._noise[port] = now
        self._send(("status", ("noise", (port, *now))))

    def issued(self) -> None:
        self._send(("status", ("issued", ())))

    def finished(
        self, port: str, device_id: str, result: str, code: str = "", message: str = ""
    ) -> None:
        self._send(("status", ("finished", (port, device_id, result, code, message))))
        self.forward()


_LINE_CALLS = frozenset(
    ("get_device", "register_device", "mark_key_ready", "issue", "mark_installed",
     "create_challenge", "verify_proof", "mark_failed")
)  # fmt: skip


class _TimedLedger:
    """The ledger with the time spent inside the line's calls added up (for benchmarks)."""

    def __init__(self, ledger: Any) -> None:
        self._ledger = ledger
        self._lock = threading.Lock()
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._ledger, name)
        if name not in _LINE_CALLS:
            return value

        def timed(*args: Any, **kwargs: Any) -> Any:
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return value(*args, **kwargs)
            finally:
                wall, used = time.perf_counter() - started, time.thread_time() - cpu
                with self._lock:
                    self.seconds += wall
                    self.cpu_seconds += used

        return timed


@dataclass(frozen=True)
class _WorkerSpec:
    settings: Settings
    batch: str
    client_factory: ClientFactory  # picklable: a module-level function or a partial of one
    measure_ledger: bool
    renew: bool = False  # station line run --renew


def _worker_main(conn: Connection, spec: _WorkerSpec) -> None:
    """A worker process: a LineDriver on the ports the parent gives it."""
    # Ctrl-C reaches the whole process group: the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    send_lock = threading.Lock()

    def send(message: tuple[str, Any]) -> None:
        # OSError: the parent is gone; the tick notices and stops the driver.
        with send_lock, contextlib.suppress(OSError):
            conn.send(message)

    from station.ca import open_ca
    from station.ledger import Ledger

    try:
        ledger = Ledger.from_settings(spec.settings)
    except Exception as exc:
        send(("error", f"{type(exc).__name__}: {exc}"))
        return
    try:
        try:
            ca = open_ca(spec.settings)
            batch = ledger.get_batch(spec.batch)
        except Exception as exc:
            send(("error", f"{type(exc).__name__}: {exc}"))
            return
        timed = _TimedLedger(ledger) if spec.measure_ledger else None
        assigned: list[str] = []
        status = ForwardingStatus(spec.batch, send)
        driver = LineDriver(
            ProvisionContext(timed or ledger, ca, batch, renew=spec.renew),  # type: ignore[arg-type]
            lambda: list(assigned),
            status=status,
            client_factory=spec.client_factory,
            rescan_interval=_WORKER_RESCAN,
            on_record=status.record,
        )

        def tick() -> None:
            status.forward()
            try:
                while conn.poll():
                    kind, value = conn.recv()
                    if kind == "ports":
                        assigned[:] = value
                    elif kind == "stop":
                        driver.stop()
            except (EOFError, OSError):  # the parent is gone
                driver.stop()

        cpu0 = time.process_time()
        send(("ready", os.getpid()))
        try:
            driver.run(tick=tick)
        finally:
            status.forward()
            send(
                (
                    "done",
                    WorkerStats(
                        os.getpid(),
                        time.process_time() - cpu0,
                        timed.seconds if timed else 0.0,
                        timed.cpu_seconds if timed else 0.0,
                    ),
                )
            )
    finally:
        ledger.close()


@dataclass
class _Worker:
    index: int
    process: Any  # multiprocessing's SpawnProcess
    conn: Connection
    ports: frozenset[str] = frozenset()
    ready: bool = False
    done: bool = False
    dead: bool = False
    stats: WorkerStats | None = None

    @property
    def serving(self) -> bool:
        return self.ready and not self.done and not self.dead


class ProcessLine:
    """Every port of the line, provisioned by ``processes`` worker processes.

    ``settings`` and ``batch`` (a name) are what each worker opens its ledger, CA
    and batch from; ``ports`` is rescanned like the driver's. ``client_factory``
    must be picklable (``open_port_client`` or a ``functools.partial`` of it).
    ``measure_ledger`` has workers time their ledger calls (``worker_stats``).
    ``on_record`` and ``on_port_error`` are the driver's: called (in the parent,
    in the thread that runs ``run``) for each board a worker finished and each port
    a worker could not open, as they arrive.
    """

    def __init__(
        self,
        settings: Settings,
        batch: str,
        ports: Callable[[], Iterable[str]],
        *,
        processes: int,
        status: LineStatus | None = None,
        client_factory: ClientFactory = open_port_client,
        rescan_interval: float = RESCAN_INTERVAL,
        measure_ledger: bool = False,
        renew: bool = False,
        on_record: Callable[[BoardRecord], None] | None = None,
        on_port_error: Callable[[str, str], None] | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.settings = settings
        self.batch = batch
        self.ports = ports
        self.processes = processes
        self.status = status or LineStatus(batch)
        self.client_factory = client_factory
        self.rescan_interval = rescan_interval
        self.measure_ledger = measure_ledger
        self.renew = renew
        self.on_record = on_record
        self.on_port_error = on_port_error
        self.records: list[BoardRecord] = []
        self.worker_stats: list[WorkerStats] = []
        self._workers: list[_Worker] = []
        self._home: dict[str, int] = {}  # port -> the worker that had it last
        self._stop = threading.Event()

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        self._stop.set()

    def finished_devices(self) -> dict[str, Outcome]:
        """The last outcome of every board handled so far."""
        return {r.outcome.device_id: r.outcome for r in self.records}

    def shares(self) -> dict[int, list[str]]:
        """Worker process id -> the ports it serves now (live workers only)."""
        return {w.process.pid: sorted(w.ports) for w in self._workers if w.serving}

    def start(self) -> None:
        """Start the workers and wait until each has its ledger and CA open."""
        if self._workers:
            return
        context = multiprocessing.get_context("spawn")
        spec = _WorkerSpec(
            self.settings, self.batch, self.client_factory, self.measure_ledger, self.renew
        )
        try:
            for index in range(self.processes):
                parent_conn, child_conn = context.Pipe()
                process = context.Process(
                    target=_worker_main,
                    args=(child_conn, spec),
                    name=f"line-worker-{index}",
                    daemon=True,
                )
                process.start()
                child_conn.close()
                self._workers.append(_Worker(index, process, parent_conn))
            deadline = time.monotonic() + WORKER_START_TIMEOUT
            while not all(w.ready for w in self._workers):
                if time.monotonic() > deadline:
                    raise LineError("a line worker did not start in time")
                self._pump(_PUMP_INTERVAL, starting=True)
        except BaseException:
            self._shutdown()
            raise

    def run(
        self,
        *,
        until: Callable[[ProcessLine], bool] | None = None,
        timeout: float | None = None,
        tick: Callable[[], None] | None = None,
    ) -> list[BoardRecord]:
        """Drive the line until stopped, ``until(self)`` is true, or ``timeout`` seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.start()
            next_scan = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_scan:
                    self._rescan()
                    next_scan = now + self.rescan_interval
                self._pump(_PUMP_INTERVAL)
                if not any(w.serving for w in self._workers):
                    raise LineError("every line worker process has died")
                self.status.flush()
                if tick is not None:
                    tick()
                if until is not None and until(self):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    log.warning("line run timed out after %.0f s", timeout)
                    break
        finally:
            self._stop.set()
            self._shutdown()
            self.status.running = False  # the last write tells the dashboard
            self.status.flush(force=True)
        return self.records

    # ------------------------------------------------------------------ workers

    def _rescan(self) -> None:
        try:
            present = set(self.ports())
        except OSError:
            log.exception("cannot list ports")
            return
        serving = [w for w in self._workers if w.serving]
        if not serving:
            return
        wanted = {w.index: set(w.ports & present) for w in serving}
        taken = set().union(*wanted.values())
        for path in sorted(present - taken):
            home = self._home.get(path)
            if home not in wanted:
                home = min(wanted, key=lambda i: (len(wanted[i]), i))
            wanted[home].add(path)
            self._home[path] = home
        for worker in serving:
            ports = frozenset(wanted[worker.index])
            if ports != worker.ports:
                worker.ports = ports
                self._send(worker, ("ports", sorted(ports)))

    def _send(self, worker: _Worker, message: tuple[str, Any]) -> None:
        try:
            worker.conn.send(message)
        except OSError:
            self._lost(worker)

    def _lost(self, worker: _Worker) -> None:
        if worker.dead or worker.done:
            return
        worker.dead = True
        worker.ports = frozenset()
        code = worker.process.exitcode
        log.error(
            "line worker %d (pid %s) died (exit code %s)", worker.index, worker.process.pid, code
        )

    def _pump(self, timeout: float, *, starting: bool = False) -> None:
        """Apply what the workers reported, waiting up to ``timeout`` for the first report."""
        live = {w.conn: w for w in self._workers if not w.dead and not w.done}
        if not live:
            time.sleep(timeout)
            return
        for conn in wait(list(live), timeout):
            self._drain(live[conn])  # type: ignore[index]
        for worker in live.values():
            if not worker.done and not worker.dead and not worker.process.is_alive():
                self._drain(worker)  # what it sent before it exited
                self._lost(worker)
            if starting and worker.dead:
                raise LineError(f"line worker {worker.index} stopped while starting")

    def _drain(self, worker: _Worker) -> None:
        try:
            while not worker.done and not worker.dead and worker.conn.poll():
                self._apply(worker, worker.conn.recv())
        except (EOFError, OSError):
            self._lost(worker)

    def _apply(self, worker: _Worker, message: tuple[str, Any]) -> None:
        kind, value = message
        if kind == "batch":
            for queued in value:
                self._apply(worker, queued)
        elif kind == "status":
            method, args = value
            getattr(self.status, method)(*args)
            if method == "port_error" and self.on_port_error is not None:
                self.on_port_error(*args)
        elif kind == "record":
            self.records.append(value)
            if self.on_record is not None:
                self.on_record(value)
        elif kind == "ready":
            worker.ready = True
        elif kind == "done":
            worker.done, worker.stats = True, value
            self.worker_stats.append(value)
        elif kind == "error":
            worker.dead = True
            raise LineError(f"line worker {worker.index} could not start: {value}")

    def _shutdown(self) -> None:
        for worker in self._workers:
            if not worker.dead and not worker.done:
                self._send(worker, ("stop", None))
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT
        while any(not w.dead and not w.done for w in self._workers):
            if time.monotonic() > deadline:
                log.error("line workers did not stop in %.0f s", WORKER_STOP_TIMEOUT)
                break
            try:
                self._pump(_PUMP_INTERVAL)
            except LineError:
                continue
        for worker in self._workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
