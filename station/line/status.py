"""What the line is doing right now, for the terminal view and the dashboard.

Workers report steps and outcomes here; ``flush()`` writes
``DATA_DIR/line-status.json`` atomically (temporary file then ``os.replace``),
at most every ``min_interval`` seconds, so the dashboard never reads half a file.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from station.files import write_atomically
from station.timefmt import rfc3339

STATUS_FILE = "line-status.json"
RECENT_FAILURES = 50
RECENT_OUTCOMES = 1000  # boards whose last outcome is kept (the ledger keeps them all)
MAX_ID_CHARS = 80  # of a board-supplied id kept here (a valid device id is at most 64)
MAX_MESSAGE_CHARS = 500  # of a board-supplied error message kept here
RATE_WINDOW = 60.0  # seconds over which issued_per_min is measured

# Steps a port shows. "waiting" means no board answers on the port.
WAITING = "waiting"
PORT_ERROR = "port-error"  # the port cannot be opened
TERMINAL = ("verified", "failed", "skipped")


def _iso(moment: datetime) -> str:
    return rfc3339(moment, timespec="milliseconds")


def _bounded(text: str, limit: int) -> str:
    """Board-supplied text cut to ``limit`` characters: a board decides how long its
    id and its error messages are, the station decides how much of them it keeps."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class PortState:
    port: str
    device_id: str | None = None
    step: str = WAITING
    since: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_error: str | None = None
    bad_frames: int = 0  # damaged frames received on the port since it was opened
    resends: int = 0  # frames or requests sent again because of them
    corrected: int = 0  # damaged frames repaired by their parity (protocol version 3)

    def as_dict(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "device_id": self.device_id,
            "step": self.step,
            "since": _iso(self.since),
            "last_error": self.last_error,
            "bad_frames": self.bad_frames,
            "resends": self.resends,
            "corrected": self.corrected,
        }


@dataclass(frozen=True)
class Failure:
    device_id: str
    code: str
    message: str
    at: datetime

    def as_dict(self) -> dict[str, str]:
        return {
            "device_id": self.device_id,
            "code": self.code,
            "message": self.message,
            "at": _iso(self.at),
        }


@dataclass(frozen=True)
class LineEvent:
    """One thing that happened on the line (also logged)."""

    at: datetime
    port: str
    device_id: str | None
    kind: str  # a step name, or verified / failed / skipped / port-added / port-gone
    detail: str = ""


#: Seconds between writes of an idle line, so that a fresh ``updated`` means alive.
HEARTBEAT = 2.0


class LineStatus:
    """Thread-safe state of every port; ``path`` None keeps it in memory only."""

    def __init__(self, batch: str, path: Path | None = None, *, min_interval: float = 0.5) -> None:
        self.batch = batch
        self.path = path
        self.min_interval = min_interval
        # False once the run ended: its last write says so, and the dashboard shows
        # the line stopped at once (a killed line is seen by the age of `updated`,
        # rewritten every HEARTBEAT seconds while the line runs, even when idle).
        self.running = True
        self.ports: dict[str, PortState] = {}
        # device_id -> verified / failed / skipped: the last outcome of the most recent
        # RECENT_OUTCOMES boards (bounded: a line runs for days).
        self.outcomes: OrderedDict[str, str] = OrderedDict()
        self.counts = {"verified": 0, "failed": 0, "skipped": 0}
        self.recent_failures: deque[Failure] = deque(maxlen=RECENT_FAILURES)
        self.events: deque[LineEvent] = deque(maxlen=1000)
        self._issued: deque[float] = deque()
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._dirty = True
        self._last_write = 0.0
        self.writes = 0

    # ------------------------------------------------------------------ reports

    def _event(self, port: str, device_id: str | None, kind: str, detail: str = "") -> None:
        self.events.append(LineEvent(datetime.now(UTC), port, device_id, kind, detail))
        self._dirty = True

    def port_added(self, port: str) -> None:
        with self._lock:
            self.ports.setdefault(port, PortState(port, since=datetime.now(UTC)))
            self._event(port, None, "port-added")

    def port_gone(self, port: str) -> None:
        with self._lock:
            self.ports.pop(port, None)
            self._event(port, None, "port-gone")

    def step(self, port: str, step: str, device_id: str | None = None) -> None:
        with self._lock:
            state = self.ports.setdefault(port, PortState(port))
            if step == WAITING:
                state.device_id = None
            elif device_id is not None:
                device_id = _bounded(device_id, MAX_ID_CHARS)
                if device_id != state.device_id:
                    state.last_error = None
                state.device_id = device_id
            state.step = step
            state.since = datetime.now(UTC)
            self._event(port, state.device_id, step)

    def port_error(self, port: str, message: str) -> None:
        """The port cannot be used (no such device, permission denied): shown, not
        taken for an empty port."""
        with self._lock:
            state = self.ports.setdefault(port, PortState(port))
            state.device_id = None
            state.step = PORT_ERROR
            state.since = datetime.now(UTC)
            state.last_error = _bounded(message, MAX_MESSAGE_CHARS)
            self._event(port, None, PORT_ERROR, state.last_error)

    def noise(self, port: str, bad_frames: int, resends: int, corrected: int = 0) -> None:
        """The port's noise so far: damaged frames lost, resends they cost, and damaged
        frames their parity repaired (a noisy cable that costs no time yet)."""
        with self._lock:
            state = self.ports.setdefault(port, PortState(port))
            now = (bad_frames, resends, corrected)
            if (state.bad_frames, state.resends, state.corrected) != now:
                state.bad_frames, state.resends, state.corrected = now
                self._dirty = True

    def issued(self) -> None:
        with self._lock:
            self._issued.append(time.monotonic())
            self._dirty = True

    def finished(
        self, port: str, device_id: str, result: str, code: str = "", message: str = ""
    ) -> None:
        """A board reached verified, failed (with a reason code) or skipped."""
        now = datetime.now(UTC)
        device_id = _bounded(device_id, MAX_ID_CHARS)
        message = _bounded(message, MAX_MESSAGE_CHARS)
        code = _bounded(code, MAX_ID_CHARS)
        with self._lock:
            state = self.ports.setdefault(port, PortState(port))
            state.device_id = device_id
            state.step = result
            state.since = now
            state.last_error = f"{code}: {message}" if result == "failed" else None
            self.counts[result] = self.counts.get(result, 0) + 1
            self.outcomes[device_id] = result
            self.outcomes.move_to_end(device_id)
            while len(self.outcomes) > RECENT_OUTCOMES:
                self.outcomes.popitem(last=False)
            if result == "failed":
                self.recent_failures.appendleft(Failure(device_id, code, message, now))
            self._event(port, device_id, result, f"{code} {message}".strip())

    # ------------------------------------------------------------------ views

    def in_progress(self) -> int:
        return sum(
            1 for p in self.ports.values() if p.device_id and p.step not in (*TERMINAL, WAITING)
        )

    def issued_per_min(self) -> float:
        now = time.monotonic()
        while self._issued and now - self._issued[0] > RATE_WINDOW:
            self._issued.popleft()
        window = min(RATE_WINDOW, max(now - self._started, 1.0))
        return round(len(self._issued) * 60.0 / window, 2)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "updated": _iso(datetime.now(UTC)),
                "running": self.running,
                "batch": self.batch,
                "ports": [self.ports[k].as_dict() for k in sorted(self.ports)],
                "counts": {**self.counts, "in_progress": self.in_progress()},
                "recent_failures": [f.as_dict() for f in self.recent_failures],
                "issued_per_min": self.issued_per_min(),
            }

    # ------------------------------------------------------------------ file

    def flush(self, *, force: bool = False) -> bool:
        """Write the status file if something changed and min_interval has passed."""
        if self.path is None:
            return False
        now = time.monotonic()
        idle_long = now - self._last_write >= HEARTBEAT
        due = self._dirty or idle_long
        if not force and (not due or now - self._last_write < self.min_interval):
            return False
        self._dirty = False
        self._last_write = now
        data = json.dumps(self.snapshot(), indent=1).encode()
        # Rewritten twice a second and made anew by the next write: not synced.
        write_atomically(self.path, data, sync=False)
        self.writes += 1
        return True
