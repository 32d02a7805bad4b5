"""A simulated board: the real agent behind a pseudo-terminal, for tests and demos.

::

    with SimulatedBoard() as board:              # agent in a subprocess
        client = BoardClient.open(board.port)     # board.port is a /dev/pts/N path
        client.hello().hardware_id == board.hardware_id

Two pty pairs and a relay thread sit between the station and the agent::

    station --serial.Serial(board.port)-- pty A == relay == pty B --agent (--port /dev/pts/M)

The agent opens its end by path exactly as on a board (``--port``), and the
relay in this process plays the cable: it throttles to a baud rate (a pty
ignores baud) and injects faults (``Faults``: corrupted or dropped bytes,
delays, a disconnect after N bytes, a board that answers nonsense). Faults can
be changed while the board runs (``board.faults = Faults(...)``).

The agent uses the stand-in ``see_test`` (``firmware_hooks.see_test``) with a
key store in ``board.see_store``, for both loading keys and signing with them.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import os
import random
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tty
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from firmware_hooks.protocol import (
    CONTROL_TYPES,
    MAX_ENCODED_FRAME,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    SUPPORTED_VERSIONS,
    Message,
    MessageDecoder,
    MsgType,
    ProtocolError,
    decode_frame,
    encode_message,
)

PACKAGE_PARENT = Path(__file__).resolve().parent.parent
DEFAULT_BAUD = 115200
_PIECE = 64  # bytes written at a time when throttling, so the far end sees a stream
_STREAM_SLACK = 0.002  # seconds: data read this soon after the line freed continues the stream


@dataclass(frozen=True)
class Faults:
    """What the simulated cable does wrong. Probabilities are per byte."""

    corrupt: float = 0.0  # flip a byte to another value
    drop: float = 0.0  # lose a byte
    delay: float = 0.0  # seconds added before each chunk is delivered
    disconnect_after: int | None = None  # hang up after this many bytes (both directions)
    nonsense: bool = False  # the board answers every request with a well-formed wrong reply
    direction: Literal["both", "to-board", "to-host"] = "both"  # where corrupt/drop apply
    garble_replies: int = 0  # flip a byte in each of the board's next N writes (lost replies)
    seed: int | None = None  # for reproducible faults


NO_FAULTS = Faults()


def board_rng(seed: int | None, hardware_id: str) -> random.Random:
    """The noise of one board's cable: derived from the run's ``seed`` and the board's
    id, so boards sharing one ``Faults(seed=...)`` see different faults (one seed
    for all made a run all-or-nothing), each reproducible. None: unseeded."""
    if seed is None:
        return random.Random()  # noqa: S311 - simulated line noise
    return random.Random(f"{seed}:{hardware_id}")  # noqa: S311 - simulated line noise


def _control_only(data: bytes) -> bool:
    """Whether ``data`` holds only version 2 ACK/NAK frames (the cable's turnaround
    figures are request to reply, not frame to acknowledgement)."""
    pieces = [piece for piece in data.split(b"\x00") if piece]
    if not pieces:
        return False
    for piece in pieces:
        try:
            frame = decode_frame(piece)
        except ProtocolError:
            return False
        if frame.type not in CONTROL_TYPES:
            return False
    return True


def see_test_command() -> str:
    """Shell words running the stand-in see_test with this interpreter."""
    return f"{shlex.quote(sys.executable)} -m firmware_hooks.see_test"


def se_sign_template() -> str:
    """The agent's ``--se-sign`` template for the stand-in (plays the artiksee engine)."""
    return see_test_command() + " -K sign -k {key} -I {in} -O {out}"


class SimulatedBoard:
    """The real agent on a pty pair; ``port`` is the device path the station opens.

    ``mode="subprocess"`` (default) runs ``python -m firmware_hooks.agent`` as on a
    board; ``mode="thread"`` runs the same ``Agent.serve`` loop in a thread.
    ``baudrate=None`` turns throttling off. Directories not given are made in a
    temporary directory removed by ``close()``.
    """

    def __init__(
        self,
        *,
        hardware_id: str | None = None,
        key_dir: Path | None = None,
        see_store: Path | None = None,
        mode: Literal["subprocess", "thread"] = "subprocess",
        baudrate: int | None = DEFAULT_BAUD,
        faults: Faults | None = None,
        agent_args: Sequence[str] = (),
        ready_timeout: float = 20.0,
        wait: bool = True,
        keys: Any = None,
    ) -> None:
        self.hardware_id = hardware_id or f"SIM-{uuid.uuid4().hex[:12].upper()}"
        self._work = Path(tempfile.mkdtemp(prefix="simboard-"))
        self.key_dir = key_dir or self._work / "keys"
        self.see_store = see_store or self._work / "see-store"
        self.key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.see_store.mkdir(mode=0o700, parents=True, exist_ok=True)
        if keys is not None and mode != "thread":
            raise ValueError("a key backend (keys=) runs in-process: use mode='thread'")
        self.keys = keys  # firmware_hooks.agent.KeyBackend for the board-ecc key (thread mode)
        self.mode = mode
        self.baudrate = baudrate
        self.faults = faults or NO_FAULTS
        self.ready_timeout = ready_timeout
        self.bytes_relayed = 0
        self.disconnected = False
        # Board turnarounds seen by the cable: (monotonic time the last byte of a request
        # reached the board, seconds until the board's first reply byte). The board's own
        # work (agent, key generation, signing) is in there; the wire and the station are not.
        self.turnarounds: list[tuple[float, float]] = []
        self._request_done: float | None = None
        self._stop = threading.Event()
        self._closed = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._agent_thread: threading.Thread | None = None
        self._agent_port: Any = None
        self._log_path = self._work / "agent.log"

        self._host_master, self._host_slave = os.openpty()
        self._board_master, self._board_slave = os.openpty()
        for fd in (self._host_slave, self._board_slave):
            tty.setraw(fd)  # no echo, no line editing before anyone opens the port
        for fd in (self._host_master, self._board_master):
            os.set_blocking(fd, False)
        self.port = os.ttyname(self._host_slave)
        self._board_port = os.ttyname(self._board_slave)

        self._relay_thread = threading.Thread(
            target=self._relay, name=f"relay-{self.hardware_id}", daemon=True
        )
        self._relay_thread.start()
        try:
            if mode == "subprocess":
                self._start_subprocess(agent_args)
            elif mode == "thread":
                self._start_thread()
            else:
                raise ValueError(f"mode must be 'subprocess' or 'thread', not {mode!r}")
            if wait:
                self.wait_ready()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ agent

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SEE_TEST_STORE"] = str(self.see_store)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p
        )
        return env

    def _start_subprocess(self, agent_args: Sequence[str]) -> None:
        command = [
            sys.executable,
            "-m",
            "firmware_hooks.agent",
            "--port",
            self._board_port,
            "--key-dir",
            str(self.key_dir),
            "--hardware-id",
            self.hardware_id,
            "--see-test",
            see_test_command(),
            "--se-sign",
            se_sign_template(),
            "--exit-on-disconnect",
            "--notify-ready",
            *agent_args,
        ]
        with open(self._log_path, "wb") as log_file:
            self._proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log_file, env=self._env()
            )

    def _start_thread(self) -> None:
        import serial

        from firmware_hooks.agent import Agent, AgentConfig

        agent = Agent(
            AgentConfig(
                key_dir=self.key_dir,
                hardware_id=self.hardware_id,
                see_test=tuple(shlex.split(see_test_command())),
                se_sign=tuple(shlex.split(se_sign_template())),
                env=self._env(),
                keys=self.keys,
            )
        )
        self._agent_port = serial.Serial(self._board_port, timeout=0.05)

        def run() -> None:
            with contextlib.suppress(ProtocolError, OSError, ValueError):
                agent.serve(self._agent_port, self._stop)

        self._agent_thread = threading.Thread(
            target=run, name=f"agent-{self.hardware_id}", daemon=True
        )
        self._agent_thread.start()

    def wait_ready(self) -> None:
        """Block until the agent has its port open (subprocess mode)."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        deadline = time.monotonic() + self.ready_timeout
        buffer = b""
        while b"READY" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or proc.poll() is not None:
                raise RuntimeError(f"simulated agent did not start:\n{self.agent_log()}")
            ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 0.1))
            if ready:
                buffer += os.read(proc.stdout.fileno(), 1024)

    def agent_log(self) -> str:
        """What the agent subprocess wrote to stderr so far."""
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    def board_seconds(self, start: float = 0.0, end: float = float("inf")) -> float:
        """Seconds the board spent answering requests that reached it between
        ``start`` and ``end`` (monotonic): its own compute, seen from the cable."""
        return sum(s for t, s in list(self.turnarounds) if start <= t <= end)

    @property
    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._agent_thread is not None and self._agent_thread.is_alive()

    # ------------------------------------------------------------------ cable

    def _relay(self) -> None:
        rng = board_rng(self.faults.seed, self.hardware_id)
        seed_seen = self.faults.seed
        nonsense = MessageDecoder()
        line_free = {self._host_master: 0.0, self._board_master: 0.0}
        sources = [self._host_master, self._board_master]
        faults_seen, garbled = self.faults, 0
        while not self._stop.is_set():
            try:
                readable, _, _ = select.select(sources, [], [], 0.1)
            except (OSError, ValueError):
                return
            for src in readable:
                try:
                    data = os.read(src, 4096)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.EIO:  # nobody has that end open right now
                        time.sleep(0.01)
                        continue
                    return
                if not data:
                    continue
                faults = self.faults
                if faults.seed != seed_seen:
                    rng, seed_seen = board_rng(faults.seed, self.hardware_id), faults.seed
                if faults is not faults_seen:
                    faults_seen, garbled = faults, 0
                to_board = src == self._host_master
                control = _control_only(data)  # version 2 ACK/NAK: not a request or a reply
                if not to_board and self._request_done is not None and not control:
                    now = time.monotonic()
                    self.turnarounds.append((self._request_done, now - self._request_done))
                    self._request_done = None
                if not to_board and garbled < faults.garble_replies:
                    garbled += 1
                    data = (
                        data[:-3] + bytes([data[-3] ^ 0x55]) + data[-2:] if len(data) > 3 else data
                    )
                dst = self._board_master if to_board else self._host_master
                if faults.nonsense:
                    if not to_board:
                        continue  # the real agent's answers are lost
                    self._answer_nonsense(nonsense, data, rng)
                if faults.direction == "both" or (faults.direction == "to-board") == to_board:
                    data = self._damage(data, faults, rng)
                if faults.disconnect_after is not None:
                    left = faults.disconnect_after - self.bytes_relayed
                    if len(data) >= left:
                        self._deliver(dst, data[: max(left, 0)], faults, line_free)
                        self.bytes_relayed += max(left, 0)
                        self._hang_up()
                        return
                self._deliver(dst, data, faults, line_free)
                self.bytes_relayed += len(data)
                if to_board and not control:
                    self._request_done = time.monotonic()

    @staticmethod
    def _damage(data: bytes, faults: Faults, rng: random.Random) -> bytes:
        if not faults.corrupt and not faults.drop:
            return data
        out = bytearray()
        for byte in data:
            if faults.drop and rng.random() < faults.drop:
                continue
            if faults.corrupt and rng.random() < faults.corrupt:
                byte ^= rng.randrange(1, 256)
            out.append(byte)
        return bytes(out)

    def _answer_nonsense(self, decoder: MessageDecoder, data: bytes, rng: random.Random) -> None:
        decoder.feed(data)
        while True:
            try:
                request = decoder.next_message()
            except ProtocolError:
                continue
            if request is None:
                return
            wrong = MsgType.STATUS_OK if request.type != MsgType.STATUS else MsgType.HELLO_OK
            garbage = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 40)))
            reply = encode_message(Message(wrong, request.seq, rng.randbytes(8)))
            self._write_all(self._host_master, b"\x00" + garbage + reply)

    def _deliver(self, dst: int, data: bytes, faults: Faults, line_free: dict[int, float]) -> None:
        if faults.delay:
            time.sleep(faults.delay)
        if not self.baudrate:
            self._write_all(dst, data)
            return
        # Each piece is due when its last bit has crossed the line, counted from where the
        # line became free: a late wake-up (sleep overshoot, a busy CPU) does not push the
        # later pieces back, so the relay does not add its own latency to the wire time.
        now = time.monotonic()
        free = line_free[dst]
        start = free if now - free < _STREAM_SLACK else now
        per_byte = 10 / self.baudrate
        for i in range(0, len(data), _PIECE):
            piece = data[i : i + _PIECE]
            pause = start + (i + len(piece)) * per_byte - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            self._write_all(dst, piece)
        line_free[dst] = start + len(data) * per_byte

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._stop.is_set():
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                select.select([], [fd], [], 0.1)
                continue
            except OSError:
                return
            view = view[written:]

    def _hang_up(self) -> None:
        """Pull the cable: both ends see the line go away."""
        self.disconnected = True
        for fd in (self._host_master, self._board_master):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._host_master = self._board_master = -1

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop the agent and the relay, remove temporary directories. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._relay_thread.is_alive():
            self._relay_thread.join(timeout=2.0)
        if self._agent_thread is not None:
            self._agent_thread.join(timeout=2.0)
        if self._agent_port is not None:
            with contextlib.suppress(Exception):
                self._agent_port.close()
        if not self.disconnected:
            self._hang_up()
        if self._proc is not None:
            try:
                self._proc.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        for fd in (self._host_slave, self._board_slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> SimulatedBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SimulatedBoard(port={self.port!r}, hardware_id={self.hardware_id!r})"


@contextlib.contextmanager
def simulate_boards(
    n: int,
    *,
    base_dir: Path | None = None,
    id_prefix: str = "SIM",
    **options: Any,
) -> Iterator[list[SimulatedBoard]]:
    """Start ``n`` simulated boards at once (hardware ids ``<id_prefix>-0000``...).

    ``options`` are SimulatedBoard's keyword arguments; with ``base_dir`` each board
    keeps its key directory and SE store in ``base_dir/<hardware id>/``."""
    boards: list[SimulatedBoard] = []
    try:
        for i in range(n):
            hardware_id = f"{id_prefix}-{i:04d}"
            home = base_dir / hardware_id if base_dir is not None else None
            boards.append(
                SimulatedBoard(
                    hardware_id=hardware_id,
                    key_dir=home / "keys" if home else None,
                    see_store=home / "see-store" if home else None,
                    wait=False,
                    **options,
                )
            )
        for board in boards:
            board.wait_ready()
        yield boards
    finally:
        for board in boards:
            board.close()


# ---------------------------------------------------------------- many ports, one cable thread


class _BoardEnd:
    """The board's end of one simulated cable, as a pyserial-like port for the agent's
    own ``Agent.serve`` loop and its ``Link`` (so the rig speaks the protocol exactly
    as the agent does, version 2 included, and follows every change to it).

    The line's thread ``feed``s it the bytes that crossed the cable; what the agent
    writes goes to the line's thread, which throttles it to the station. ``close``
    pulls the plug: the agent's next read or write fails and its loop ends."""

    def __init__(self, line: SimulatedLine, port: _HubPort) -> None:
        self._line = line
        self._port = port
        self.timeout: float | None = 0.05  # the Link sets its poll interval here
        self.baudrate = line.baudrate  # the Link times its ACK waits by it
        self._cond = threading.Condition()
        self._buffer = bytearray()
        self._closed = False
        self.cpu_seconds = 0.0  # of the agent's thread so far
        self._cpu0: float | None = None

    # -- the agent's side (its own thread)

    @property
    def in_waiting(self) -> int:
        with self._cond:
            return len(self._buffer)

    def _take(self, size: int | None) -> bytes:
        with self._cond:
            if not self._buffer and not self._closed:
                self._cond.wait(self.timeout)
            if self._closed:
                raise OSError(errno.EIO, "the board was unplugged")
            size = len(self._buffer) if size is None else min(size, len(self._buffer))
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
        now = time.thread_time()
        if self._cpu0 is None:
            self._cpu0 = now
        self.cpu_seconds = now - self._cpu0
        return data

    def read_available(self) -> bytes:
        return self._take(None)

    def read(self, size: int = 1) -> bytes:
        return self._take(size)

    def write(self, data: bytes, /) -> int:
        if self._closed:
            raise OSError(errno.EIO, "the board was unplugged")
        self._line.from_board(self._port, self, bytes(data), time.monotonic())
        return len(data)

    def flush(self) -> None:
        if self._closed:
            raise OSError(errno.EIO, "the board was unplugged")

    # -- the line's side

    def feed(self, data: bytes) -> None:
        with self._cond:
            self._buffer += data
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


@functools.cache
def _timed_agent_class() -> Any:
    """The real Agent with ``handle`` timed into ``compute_seconds`` (the board's own time)."""
    from firmware_hooks.agent import Agent

    class TimedAgent(Agent):
        compute_seconds: dict[str, float] = {}  # replaced per instance

        def handle(self, request: Message) -> Message:
            started = time.perf_counter()
            try:
                return super().handle(request)
            finally:
                hardware_id = self.config.hardware_id
                self.compute_seconds[hardware_id] = self.compute_seconds.get(hardware_id, 0.0) + (
                    time.perf_counter() - started
                )

    return TimedAgent


class _HubPort:
    """One port of a SimulatedLine: a pty, the board on it now, the boards still to come."""

    def __init__(self, line: SimulatedLine, hardware_ids: list[str]) -> None:
        self.line = line
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.waiting = collections.deque(hardware_ids)  # boards not plugged in yet
        self.plugged: list[str] = []  # every board that has been on this port, in order
        self.board: _BoardEnd | None = None
        self.hardware_id: str | None = None
        self.thread: threading.Thread | None = None
        self.worked = False  # the board on the port got a command beyond HELLO / STATUS
        self.pending = bytearray()  # bytes that crossed the line, short of a delimiter
        self.to_board_free = 0.0
        self.to_host_free = 0.0
        self.inbound: collections.deque[tuple[float, bytes]] = collections.deque()
        self.outbound: collections.deque[tuple[float, bytes]] = collections.deque()
        self.next_board()

    def next_board(self) -> None:
        """Unplug the board on the port and plug in the next one (if any is left)."""
        from firmware_hooks.agent import AgentConfig

        if self.board is not None:
            self.board.close()  # its agent's loop ends at its next read or write
        self.board, self.hardware_id, self.worked = None, None, False
        if not self.waiting:
            return
        hardware_id = self.waiting.popleft()
        home = self.line.base_dir / hardware_id
        config = AgentConfig(
            key_dir=home / "keys",
            hardware_id=hardware_id,
            see_test=tuple(shlex.split(see_test_command())),
            se_sign=tuple(shlex.split(se_sign_template())),
            env={**os.environ, "SEE_TEST_STORE": str(home / "see-store")},
            keys=self.line.keys,
            protocol_versions=self.line.protocol_versions,
        )
        board = _BoardEnd(self.line, self)
        self.board, self.hardware_id = board, hardware_id
        self.plugged.append(hardware_id)
        self.line.compute_seconds[hardware_id] = 0.0
        self.line.boards.append(board)
        self.thread = threading.Thread(
            target=self.line.run_agent, args=(config, board), name=f"agent-{hardware_id}",
            daemon=True,
        )  # fmt: skip
        self.thread.start()

    def _schedule(self, data: bytes, now: float, free: float) -> tuple[float, float]:
        """(start, end) on a line last free at ``free``, as the relay of SimulatedBoard."""
        baud = self.line.baudrate
        if not baud:
            return now, now
        start = free if now - free < _STREAM_SLACK else max(now, free)
        return start, start + len(data) * 10 / baud

    def arrive(self, data: bytes, now: float) -> None:
        """Bytes the station wrote; the board sees them once they have crossed the line."""
        data = self.line.damage(data)
        _, end = self._schedule(data, now, self.to_board_free)
        self.to_board_free = end
        self.inbound.append((end, data))

    def run_due(self, now: float) -> None:
        while self.inbound and self.inbound[0][0] <= now:
            _, data = self.inbound.popleft()
            self.deliver(data)
        self.flush(now)

    def deliver(self, data: bytes) -> None:
        """Hand the board what crossed the line, one delimited chunk at a time: a HELLO
        after the station worked with the board means the operator swapped it, and
        that HELLO goes to the next board."""
        self.pending += data
        while (end := self.pending.find(0)) >= 0:
            chunk = bytes(self.pending[: end + 1])
            del self.pending[: end + 1]
            if end:
                self._watch(chunk[:-1])
            if self.board is not None:
                self.board.feed(chunk)
        if len(self.pending) > 2 * MAX_ENCODED_FRAME:
            # No delimiter for that long: the board's own resynchronisation deals with it.
            if self.board is not None:
                self.board.feed(bytes(self.pending))
            self.pending.clear()

    def _watch(self, chunk: bytes) -> None:
        try:
            frame = decode_frame(chunk)
        except ProtocolError:
            return  # damaged: the board will not take it for anything either
        if frame.type == MsgType.HELLO and self.worked:
            self.next_board()  # the station is done with this board: the operator swaps it
        elif frame.type in REQUEST_TYPES and frame.type not in (MsgType.HELLO, MsgType.STATUS):
            self.worked = True

    def from_board(self, data: bytes, written: float) -> None:
        """Bytes the board wrote (at ``written``), on their way to the station."""
        wire = self.line.damage(data)
        start, _ = self._schedule(wire, written, self.to_host_free)
        baud = self.line.baudrate
        if not baud:
            self.outbound.append((start, wire))
            return
        self.to_host_free = start + len(wire) * 10 / baud
        for i in range(0, len(wire), _PIECE):
            piece = wire[i : i + _PIECE]
            self.outbound.append((start + (i + len(piece)) * 10 / baud, piece))

    def flush(self, now: float) -> None:
        while self.outbound and self.outbound[0][0] <= now:
            due, piece = self.outbound[0]
            try:
                written = os.write(self.master, piece)
            except BlockingIOError:
                # The station is not reading: try again a little later, not in a busy loop.
                self.outbound[0] = (now + 0.005, piece)
                return
            except OSError:
                self.outbound.clear()
                return
            if written < len(piece):
                self.outbound[0] = (due, piece[written:])
                return
            self.outbound.popleft()

    def next_due(self) -> float:
        dues = [q[0][0] for q in (self.inbound, self.outbound) if q]
        return min(dues) if dues else float("inf")

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class SimulatedLine:
    """Many simulated ports on one cable thread, boards swapped in as the station finishes them.

    ::

        with SimulatedLine(ports=64, boards_per_port=16, keys=CryptographyKeys()) as line:
            driver = LineDriver(ctx, lambda: line.ports, ...)

    Each port is a pty the station opens by path, throttled to ``baudrate`` like
    SimulatedBoard's relay. Behind it is the real agent: ``Agent.serve``, its
    own port loop (its ``Link``, replay cache and replies), on an in-memory
    board end in a thread of its own, so the rig speaks every protocol version
    the agent speaks and follows every change to the link. One thread plays
    every cable (the ptys, the baud rate, the noise) instead of a relay thread
    and an agent process per board, so that the rig costs little next to the
    station: the measure of the station at 32 or 64 ports. When the station
    says HELLO after it has worked with a board, that board is unplugged and the
    next one of the port's queue plugged in; a port whose queue is empty goes
    quiet. ``boards_per_port`` is one count for every port or a count per port.
    Boards keep their files under ``base_dir`` (default: the temporary
    directory; /dev/shm keeps their fsyncs off the disk). ``keys`` is the
    agent's key backend (``station.line.simkeys``; None: the OpenSSL CLI).
    ``max_protocol`` is the highest version the boards agree to in HELLO (1:
    version 1 boards; default: every version the agent speaks). ``corrupt``
    flips bytes with that probability, both directions.
    ``compute_seconds[hardware_id]`` is the board's own time in
    ``Agent.handle``; ``cpu_seconds`` the CPU time of the rig's threads so far.
    """

    def __init__(
        self,
        ports: int,
        boards_per_port: int | Sequence[int] = 1,
        *,
        id_prefix: str = "SIM",
        baudrate: int | None = DEFAULT_BAUD,
        keys: Any = None,
        corrupt: float = 0.0,
        seed: int | None = None,
        base_dir: Path | None = None,
        max_protocol: int = max(SUPPORTED_VERSIONS),
    ) -> None:
        if max_protocol not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"max_protocol must be one of {sorted(SUPPORTED_VERSIONS)}, not {max_protocol}"
            )
        self.baudrate = baudrate
        self.keys = keys
        self.corrupt = corrupt
        self.protocol_versions = tuple(range(PROTOCOL_VERSION, max_protocol + 1))
        self._rng = random.Random(seed)  # noqa: S311 - simulated line noise
        self._work = Path(tempfile.mkdtemp(prefix="simline-", dir=base_dir))
        self.base_dir = self._work
        self.compute_seconds: dict[str, float] = {}
        self.boards: list[_BoardEnd] = []  # every board plugged so far (their CPU time)
        self._cable_cpu = 0.0
        self._stop = threading.Event()
        self._closed = False
        self._ports: list[_HubPort] = []
        # Boards' writes, handed to the cable thread, which a byte on the pipe wakes.
        self._written: collections.deque[tuple[_HubPort, _BoardEnd, bytes, float]] = (
            collections.deque()
        )
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        try:
            counts = (
                [boards_per_port] * ports
                if isinstance(boards_per_port, int)
                else list(boards_per_port)
            )
            if len(counts) != ports:
                raise ValueError(f"{len(counts)} board counts for {ports} ports")
            for p, count in enumerate(counts):
                ids = [f"{id_prefix}-{p:03d}-{b:04d}" for b in range(count)]
                self._ports.append(_HubPort(self, ids))
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="simulated-line", daemon=True)
        self._thread.start()

    @property
    def ports(self) -> list[str]:
        """The device paths, one per port, for the station to open."""
        return [p.path for p in self._ports]

    @property
    def cpu_seconds(self) -> float:
        return self._cable_cpu + sum(b.cpu_seconds for b in list(self.boards))

    def plugged(self) -> dict[str, list[str]]:
        """Port path -> hardware ids that have been plugged into it so far."""
        return {p.path: list(p.plugged) for p in self._ports}

    def waiting(self) -> dict[str, int]:
        """Port path -> boards not plugged in yet (all 0 once every board had its turn)."""
        return {p.path: len(p.waiting) for p in self._ports}

    def damage(self, data: bytes) -> bytes:
        if not self.corrupt:
            return data
        rng = self._rng
        return bytes(b ^ rng.randrange(1, 256) if rng.random() < self.corrupt else b for b in data)

    def run_agent(self, config: Any, board: _BoardEnd) -> None:
        """A board's agent, in its own thread, until it is unplugged or the line closes."""
        try:
            agent = _timed_agent_class()(config)
            agent.compute_seconds = self.compute_seconds
            agent.serve(board, self._stop)
        except (ProtocolError, OSError, ValueError):
            return  # unplugged (Disconnected), or the line closed under it

    def from_board(self, port: _HubPort, board: _BoardEnd, data: bytes, written: float) -> None:
        """A board's write (its agent's thread): queued for the cable thread."""
        self._written.append((port, board, data, written))
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\x00")

    def _serve(self) -> None:
        by_fd = {p.master: p for p in self._ports}
        fds = [*by_fd, self._wake_r]
        cpu0 = time.thread_time()
        try:
            while not self._stop.is_set():
                wait = min(p.next_due() for p in self._ports) - time.monotonic()
                try:
                    readable, _, _ = select.select(fds, [], [], min(max(wait, 0.0), 0.05))
                except (OSError, ValueError):
                    return
                now = time.monotonic()
                for fd in readable:
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError, OSError):
                            os.read(fd, 4096)
                        continue
                    try:
                        data = os.read(fd, 4096)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:  # EIO: the station has no end open right now
                        continue
                    if data:
                        by_fd[fd].arrive(data, now)
                while self._written:
                    port, board, data, written = self._written.popleft()
                    if not board.closed:  # an unplugged board's last words are lost
                        port.from_board(data, written)
                for port in self._ports:
                    port.run_due(time.monotonic())
                self._cable_cpu = time.thread_time() - cpu0
        finally:
            self._cable_cpu = time.thread_time() - cpu0

    def close(self) -> None:
        """Stop the threads, close the ptys, remove the boards' directories. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive():
            thread.join(timeout=5.0)
        for port in self._ports:
            port.close()
        for port in self._ports:
            if port.thread is not None:
                port.thread.join(timeout=5.0)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> SimulatedLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve_line_in_child(conn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    line = SimulatedLine(*args, **kwargs)
    try:
        conn.send(line.ports)
        while True:
            request = conn.recv()
            conn.send(
                {
                    "plugged": line.plugged(),
                    "waiting": line.waiting(),
                    "compute_seconds": dict(line.compute_seconds),
                    "cpu_seconds": time.process_time(),
                }
            )
            if request == "close":
                return
    finally:
        line.close()


class SimulatedLineProcess:
    """A SimulatedLine in a child process, so the rig does not share the station's GIL.

    Same arguments and reading methods as SimulatedLine; ``keys`` must be
    picklable (``station.line.simkeys.CryptographyKeys()`` is). ``cpu_seconds``
    is the child's CPU time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._proc = context.Process(
            target=_serve_line_in_child, args=(child_conn, args, kwargs), daemon=True
        )
        self._proc.start()
        child_conn.close()
        self._last: dict[str, Any] = {}
        if not self._conn.poll(60):
            self._proc.kill()
            raise RuntimeError("the simulated line's process did not start")
        self.ports: list[str] = self._conn.recv()

    def _stats(self, request: str = "stats") -> dict[str, Any]:
        if self._proc.is_alive() and not self._conn.closed:
            self._conn.send(request)
            self._last = self._conn.recv()
        return self._last

    def plugged(self) -> dict[str, list[str]]:
        return dict(self._stats()["plugged"])

    def waiting(self) -> dict[str, int]:
        return dict(self._stats()["waiting"])

    @property
    def compute_seconds(self) -> dict[str, float]:
        return dict(self._stats()["compute_seconds"])

    @property
    def cpu_seconds(self) -> float:
        return float(self._stats()["cpu_seconds"])

    def close(self) -> None:
        """Stop the child (its line closes its ptys and files). Idempotent; the last
        figures stay readable."""
        if self._conn.closed:
            return
        with contextlib.suppress(OSError, EOFError):
            self._stats("close")
        self._conn.close()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()

    def __enter__(self) -> SimulatedLineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
