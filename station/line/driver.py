"""Every port at once: a thread per port, each waiting for a board, provisioning it,
reporting, and waiting for the next.

Ports come from a callable (fixed list, a glob, simulated boards) rescanned
about every second, so a USB adapter plugged in or pulled out while the line
runs gets a worker or loses it. All workers share one ``Ledger`` (one engine)
and one CA; the key store serialises HSM access.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from firmware_hooks.host import BoardClient, BoardHello
from firmware_hooks.protocol import Disconnected, MsgType, ProtocolError
from station.errors import StationError
from station.ledger import DeviceState
from station.line.provision import (
    STEP_HELLO,
    Outcome,
    ProvisionContext,
    provision_board,
    refuse_hello,
)
from station.line.status import WAITING, LineStatus

log = logging.getLogger(__name__)

DEFAULT_BAUD = 115200
RESCAN_INTERVAL = 1.0
POLL_INTERVAL = 0.5  # between hellos on an idle port
WAIT_HELLO_TIMEOUT = 1.0
ABSENT_AFTER = 3  # unanswered hellos before a finished board counts as unplugged
_READ_CHUNK = 4096


class CountingPort:
    """A pyserial port that counts the bytes the station sent and received."""

    def __init__(self, port: Any) -> None:
        self._port = port
        self.tx = 0
        self.rx = 0
        # pyserial's POSIX Serial keeps its descriptor non-blocking (O_NONBLOCK).
        self._direct = type(port).__module__ == "serial.serialposix"

    @property
    def timeout(self) -> float | None:
        return self._port.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._port.timeout = value

    # The link sets a write timeout only on a port that has one: without this the
    # line's writes to a board that stopped reading blocked forever.
    @property
    def write_timeout(self) -> float | None:
        return self._port.write_timeout

    @write_timeout.setter
    def write_timeout(self, value: float | None) -> None:
        self._port.write_timeout = value

    @property
    def in_waiting(self) -> int:
        return self._port.in_waiting

    def read(self, size: int = 1) -> bytes:
        data: bytes = self._port.read(size)
        self.rx += len(data)
        return data

    def read_available(self) -> bytes:
        """Whatever the port holds, waiting up to ``timeout`` for the first byte.

        On a POSIX port (a tty, a pty) straight on its non-blocking descriptor:
        one ``select`` and one ``read`` per burst, where pyserial's ``read`` spends
        more Python per call than the bytes cost; the line calls this for every
        burst of every port. Disconnection raises as pyserial's ``read`` does."""
        port = self._port
        fd = getattr(port, "fd", None) if self._direct else None
        if fd is None:
            data: bytes = port.read(port.in_waiting or 1)
            if data and (waiting := port.in_waiting):
                data += port.read(waiting)
        else:
            # pyserial sets VMIN = VTIME = 0: an empty read means nothing yet, not EOF.
            try:
                data = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                data = b""
            if not data:
                ready, _, _ = select.select([fd], [], [], port.timeout)
                if not ready:
                    return b""
                data = os.read(fd, _READ_CHUNK)
                if not data:  # what a tty whose device went away does
                    raise OSError(f"{port.port}: ready to read but no data (unplugged?)")
        self.rx += len(data)
        return data

    def write(self, data: bytes, /) -> int | None:
        written: int | None = self._port.write(data)
        self.tx += len(data) if written is None else written
        return written

    def flush(self) -> None:
        self._port.flush()

    def close(self) -> None:
        self._port.close()


ClientFactory = Callable[[str], BoardClient]


def open_port_client(
    path: str,
    *,
    baudrate: int = DEFAULT_BAUD,
    timeouts: Mapping[MsgType, float] | None = None,
    retries: int = 2,
) -> BoardClient:
    """A BoardClient on a device path or pyserial URL, counting its bytes (``client.port``)."""
    return BoardClient.open(
        path, baudrate=baudrate, timeouts=timeouts, retries=retries, wrap=CountingPort
    )


def glob_ports(pattern: str) -> Callable[[], list[str]]:
    return lambda: sorted(glob.glob(pattern))


@dataclass
class BoardRecord:
    """One board handled on one port, for reports and the bench."""

    port: str
    outcome: Outcome
    seconds: float
    tx: int
    rx: int
    started: float = 0.0  # time.monotonic() at the board's hello


@dataclass
class _Worker:
    path: str
    thread: threading.Thread
    stop: threading.Event = field(default_factory=threading.Event)


class LineDriver:
    """Runs provisioning on every port ``ports()`` lists until ``stop()`` or ``until``."""

    def __init__(
        self,
        ctx: ProvisionContext,
        ports: Callable[[], Iterable[str]],
        *,
        status: LineStatus | None = None,
        client_factory: ClientFactory | None = None,
        rescan_interval: float = RESCAN_INTERVAL,
        poll_interval: float = POLL_INTERVAL,
        on_record: Callable[[BoardRecord], None] | None = None,
        on_port_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.ports = ports
        self.status = status or LineStatus(ctx.batch.name)
        self.client_factory = client_factory or open_port_client
        self.rescan_interval = rescan_interval
        self.poll_interval = poll_interval
        self.on_record = on_record  # called in the port's thread as each board finishes
        self.on_port_error = on_port_error  # (port, message) when a port cannot be opened
        self.records: list[BoardRecord] = []
        self._records_lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        # Ports that could not be opened, with the error: retried at every rescan, and
        # reported again only when the error changes (not once a rescan, as noise).
        self._port_errors: dict[str, str] = {}
        self._stop = threading.Event()

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        self._stop.set()

    def run(
        self,
        *,
        until: Callable[[LineDriver], bool] | None = None,
        timeout: float | None = None,
        tick: Callable[[], None] | None = None,
    ) -> list[BoardRecord]:
        """Drive the line in this thread (workers in their own) until stopped,
        ``until(self)`` is true, or ``timeout`` seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        next_scan = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_scan:
                    self._rescan()
                    next_scan = now + self.rescan_interval
                self.status.flush()
                if tick is not None:
                    self._tick(tick)
                if until is not None and until(self):
                    break
                if deadline is not None and now >= deadline:
                    log.warning("line run timed out after %.0f s", timeout)
                    break
                self._stop.wait(0.1)
        finally:
            self._stop.set()
            for worker in list(self._workers.values()):
                worker.stop.set()
            for worker in list(self._workers.values()):
                worker.thread.join(timeout=30)
            self.status.running = False  # the last write tells the dashboard
            self.status.flush(force=True)
        return self.records

    _tick_logged = 0.0

    def _tick(self, tick: Callable[[], None]) -> None:
        """The caller's tick (the live view, a worker's pipe): its failure is logged
        (at most every 30 s), never the end of the line."""
        try:
            tick()
        except Exception:
            now = time.monotonic()
            if now - self._tick_logged >= 30.0:
                self._tick_logged = now
                log.exception("the line's tick failed; the line goes on")

    def finished_devices(self) -> dict[str, Outcome]:
        """The last outcome of every board handled so far."""
        with self._records_lock:
            return {r.outcome.device_id: r.outcome for r in self.records}

    # ------------------------------------------------------------------ ports

    def _rescan(self) -> None:
        try:
            present = set(self.ports())
        except OSError:
            log.exception("cannot list ports")
            return
        for path, worker in list(self._workers.items()):
            if not worker.thread.is_alive():
                del self._workers[path]
                if path not in present:
                    self._port_errors.pop(path, None)
                    self.status.port_gone(path)
            elif path not in present:
                worker.stop.set()  # pulled out: its worker ends at its next read
        for path in sorted(present - self._workers.keys()):
            worker = _Worker(path, threading.Thread(name=f"line-{path}", daemon=True))
            worker.thread = threading.Thread(
                target=self._serve_port, args=(worker,), name=f"line-{path}", daemon=True
            )
            self._workers[path] = worker
            if path not in self._port_errors:  # a retry of a port in error is not news
                self.status.port_added(path)
            worker.thread.start()

    def _stopping(self, worker: _Worker) -> bool:
        return self._stop.is_set() or worker.stop.is_set()

    def _serve_port(self, worker: _Worker) -> None:
        path = worker.path
        try:
            client = self.client_factory(path)
        except (OSError, ValueError) as exc:  # SerialException is an OSError
            message = f"cannot open the port: {exc}"
            if self._port_errors.get(path) != message:
                self._port_errors[path] = message
                log.error("%s: %s", path, message)
                self.status.port_error(path, message)
                if self.on_port_error is not None:
                    self.on_port_error(path, message)
            return
        self._port_errors.pop(path, None)
        try:
            self._port_loop(worker, client)
        except Exception:
            log.exception("%s: worker stopped", path)
        finally:
            with contextlib.suppress(Exception):
                client.close()

    def _port_loop(self, worker: _Worker, client: BoardClient) -> None:
        path = worker.path
        counter = client.port if isinstance(client.port, CountingPort) else None
        wait_timeout = min(client.timeouts[MsgType.HELLO], WAIT_HELLO_TIMEOUT)
        last_board: str | None = None  # the board we finished and that is still plugged in
        finished_here: str | None = None  # the last board finished here, plugged in or not
        missed = 0
        self.status.step(path, WAITING)
        while not self._stopping(worker):
            tx0, rx0 = (counter.tx, counter.rx) if counter else (0, 0)
            started = time.monotonic()
            bad_before = client.link.bad_frames
            try:
                hello = self._hello(client, wait_timeout)
            except Disconnected as exc:
                log.info("%s: port went away: %s", path, exc)
                self.status.step(path, WAITING)
                return  # the rescan opens it again if it is still there
            self._noise(path, client)
            if hello is None:
                # Damaged frames are a board on a noisy cable, not an empty port.
                missed += client.link.bad_frames == bad_before
                # Several silent polls in a row, not one lost frame, mean unplugged.
                if last_board is not None and missed >= ABSENT_AFTER:
                    last_board = None
                    self.status.step(path, WAITING)
                self._stop.wait(0.05)
                continue
            missed = 0
            if hello.hardware_id == last_board or self._verified_again(hello, finished_here):
                last_board = hello.hardware_id
                self._stop.wait(self.poll_interval)
                continue
            refused = refuse_hello(hello)
            if refused is not None:
                # A hardware id the ledger would refuse is refused here, before it is
                # shown or used anywhere: the port goes on with the next board.
                outcome, device_id = refused, refused.device_id
                log.warning("%s: board refused: %s %s", path, outcome.code, outcome.message)
            else:
                device_id = hello.hardware_id
                self.status.step(path, STEP_HELLO, device_id)
                log.info(
                    "%s: board %s (agent %s, %s)",
                    path,
                    device_id,
                    hello.agent_version[:40],
                    ", ".join(sorted(c[:40] for c in hello.capabilities)[:16]),
                )
                outcome = provision_board(
                    client,
                    hello,
                    self.ctx,
                    report=functools.partial(self.status.step, path, device_id=device_id),
                    on_issued=self.status.issued,
                )
            seconds = time.monotonic() - started
            self._noise(path, client)
            tx, rx = (counter.tx - tx0, counter.rx - rx0) if counter else (0, 0)
            record = BoardRecord(path, outcome, seconds, tx, rx, started)
            with self._records_lock:
                self.records.append(record)
            if self.on_record is not None:
                self.on_record(record)
            self.status.finished(path, device_id, outcome.result, outcome.code, outcome.message)
            log.info(
                "%s: %s %s %s %s", path, device_id, outcome.result, outcome.code, outcome.message
            )
            last_board = hello.hardware_id
            # A board whose run failed here (a renewal leaves it verified) is retried
            # when it is plugged in again, not taken for the same verified board.
            finished_here = None if outcome.result == "failed" else hello.hardware_id
            if outcome.code == "disconnected":
                return  # the port went away; the rescan opens it again if it comes back

    def _verified_again(self, hello: BoardHello, finished_here: str | None) -> bool:
        """The board this port verified, heard again after silent polls.

        On a noisy cable a few lost HELLO replies look like an unplugged board; the
        same verified board answering next is that, not a new plug to record again
        as skipped over its verified outcome. A board that failed here is retried.
        """
        if hello.hardware_id != finished_here:
            return False
        try:
            device = self.ctx.ledger.get_device(hello.hardware_id)
        except StationError:
            return False
        return device.state == DeviceState.VERIFIED.value

    def _noise(self, path: str, client: BoardClient) -> None:
        link = client.link
        self.status.noise(path, link.bad_frames, link.resends, link.corrected_frames)

    @staticmethod
    def _hello(client: BoardClient, timeout: float) -> BoardHello | None:
        """The board on the port, or None when nothing (valid) answers.

        One attempt, no retries: the port loop polls again anyway, and a worker
        stuck in retries on an empty port would hold up ``stop()`` for seconds."""
        saved, saved_retries = client.timeouts[MsgType.HELLO], client.retries
        client.timeouts[MsgType.HELLO], client.retries = timeout, 0
        try:
            return client.hello()
        except Disconnected:
            raise
        except ProtocolError:
            return None
        finally:
            client.timeouts[MsgType.HELLO], client.retries = saved, saved_retries
