"""A crash rig: `station line run` processes SIGKILLed at random moments while they
provision simulated boards, restarted each time, then checked against the ledger.

Shared by tests/test_crash.py (small, in `make test`) and bench/crash.py (longer).

The boards live in this process (``SimulatedBoard``: the real agent behind a pty)
and outlive every station: a board a station was working on when it died is
still plugged in when the next station starts, with whatever the dead station
left on it. After every kill the rig reads the chain each board stored
(``deviceCertAndCACert.crt``): that is what left the station. Verified boards
are unplugged and fresh ones plugged in, so there is work left for the next kill.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from sqlalchemy import func, select

from firmware_hooks.simboard import SimulatedBoard
from station.ledger import Ledger
from station.ledger.schema import certificates, devices
from station.line.status import STATUS_FILE
from station.whitelist import serial_hex

ROOT = Path(__file__).resolve().parent.parent
CHAIN_FILE = "deviceCertAndCACert.crt"
TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
LAUNCH = "from station.cli import main; main()"
# The station as `station`, with a pause between the HSM signature and the ledger
# commit (Ledger.after_sign, the ledger's test seam): the window in which a kill
# leaves an intent is milliseconds wide otherwise. Nothing else is changed.
LAUNCH_PAUSED = (
    "import os, time\n"
    "from station.ledger import Ledger\n"
    "pause = float(os.environ['CRASH_SIGN_PAUSE'])\n"
    "Ledger.after_sign = staticmethod(lambda cert: time.sleep(pause))\n"
    "from station.cli import main\n"
    "main()\n"
)


@dataclass
class Station:
    """One station id: its environment, the boards it serves, its current process."""

    station_id: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    ports: list[str] = field(default_factory=list)
    started_at: float = 0.0
    started_wall_ns: int = 0
    starts: int = 0

    def start(self, batch: str, ports: list[str], *, count: int | None = None) -> None:
        self.ports = ports
        args = ["line", "run", "--batch", batch, "--no-live", "--baud", "0"]
        for port in ports:
            args += ["--port", port]
        if count is not None:
            args += ["--count", str(count), "--timeout", "90"]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.starts} ports={len(ports)} ===\n".encode())
            log.flush()
            launch = LAUNCH_PAUSED if "CRASH_SIGN_PAUSE" in self.env else LAUNCH
            self.proc = subprocess.Popen(
                [sys.executable, "-c", launch, *args],
                env=self.env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        self.started_at = time.monotonic()
        self.started_wall_ns = time.time_ns()
        self.starts += 1

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from start until the line is up (its status file rewritten)."""
        status = Path(self.env["STATION_DATA_DIR"]) / STATUS_FILE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if status.stat().st_mtime_ns >= self.started_wall_ns:
                    return time.monotonic() - self.started_at
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"station {self.station_id} ended:\n{self.log_tail()}")
            time.sleep(0.01)
        raise AssertionError(f"station {self.station_id} not up after {timeout} s")

    def kill(self) -> bool:
        """SIGKILL the station; True if it was still running when killed."""
        proc = self.proc
        if proc is None:
            return False
        alive = proc.poll() is None
        if alive:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self.proc = None
        return alive

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Figures:
    kills: int = 0  # SIGKILLs that hit a running station
    starts: int = 0
    boards: int = 0
    certificates_left: int = 0  # distinct certificates found on boards
    final_rounds: int = 0  # un-killed runs needed at the end to finish every board
    ledger_certificates: int = 0
    revoked: int = 0
    failed_intents: int = 0
    seconds: float = 0.0
    kills_in_startup: int = 0  # before the line was up (imports, migrations, recovery)
    kills_mid_board: int = 0  # with a board part-way (key-ready, issued or installed)
    kills_with_intent: int = 0  # between an intent and its certificate's commit
    kill_after: list[float] = field(default_factory=list)  # seconds after start


class CrashRig:
    """Boards, stations and what the boards were given; ``run()`` then ``check()``."""

    def __init__(
        self,
        *,
        stations: list[Station],
        database_url: str,
        batch: str,
        total_boards: int,
        plugged: int,
        kills: int,
        kill_window: float,
        early_kills: float = 0.2,
        intent_kill_every: int = 5,
        work_dir: Path,
        seed: int,
    ) -> None:
        self.stations = stations
        self.database_url = database_url
        self.batch = batch
        self.total_boards = total_boards
        self.plugged = plugged
        self.target_kills = kills
        self.kill_window = kill_window  # seconds after the line is up
        self.early_kills = early_kills  # share of kills during start-up
        self.intent_kill_every = intent_kill_every  # every Nth kill waits for an intent
        self.startup = 1.0  # the last start-up seen, in seconds
        self.work_dir = work_dir
        self.rng = random.Random(seed)
        self.boards: dict[str, SimulatedBoard] = {}  # plugged in now
        self.made = 0
        self.home: dict[str, Station] = {}  # board -> the station it is plugged into
        self.unplugged: list[str] = []  # verified boards taken off the line
        self.left: dict[str, str] = {}  # certificate PEM -> device it was found on
        self.figures = Figures()
        self.ledger = Ledger(database_url, "crash-checker", migrate=False)

    # ------------------------------------------------------------------ boards

    def _plug(self, station: Station) -> None:
        hid = f"CRASH-{self.made:04d}"
        self.made += 1
        self.boards[hid] = SimulatedBoard(
            hardware_id=hid, baudrate=None, key_dir=self.work_dir / hid / "keys"
        )
        self.home[hid] = station

    def _ports(self, station: Station) -> list[str]:
        return [b.port for hid, b in sorted(self.boards.items()) if self.home[hid] is station]

    def _read_boards(self, station: Station | None = None) -> None:
        """Record the certificate every board (of ``station``) holds now."""
        for hid, board in self.boards.items():
            if station is not None and self.home[hid] is not station:
                continue
            pem = _device_pem(board.key_dir / CHAIN_FILE)
            if pem is not None:
                self.left.setdefault(pem, hid)

    def _intents(self, station: Station) -> int:
        with self.ledger.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(certificates)
                    .where(
                        certificates.c.state == "intent",
                        certificates.c.station_id == station.station_id,
                    )
                ).scalar_one()
            )

    def _work_left(self, station: Station) -> bool:
        return any(self._state(h) != "verified" for h in self.boards if self.home[h] is station)

    def _wait_intent(self, station: Station, timeout: float = 10.0) -> float:
        """The instant ``station`` has an intent recorded (or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if station.proc is None or station.proc.poll() is not None:
                break
            if self._intents(station):
                break
            time.sleep(0.005)
        return time.monotonic()

    def _classify_kill(self, station: Station) -> None:
        f = self.figures
        status = Path(station.env["STATION_DATA_DIR"]) / STATUS_FILE
        try:
            up = status.stat().st_mtime_ns >= station.started_wall_ns
        except OSError:
            up = False
        f.kills_in_startup += not up
        f.kills_with_intent += self._intents(station) > 0
        mid = {"key-ready", "issued", "installed"}
        f.kills_mid_board += any(
            self._state(h) in mid for h in self.boards if self.home[h] is station
        )

    def _rotate(self, station: Station) -> None:
        """Take ``station``'s verified boards off the line while fresh boards remain."""
        for hid in [h for h in sorted(self.boards) if self.home[h] is station]:
            if self.made >= self.total_boards:
                return
            if self._state(hid) == "verified":
                self.boards.pop(hid).close()
                self.unplugged.append(hid)
                self._plug(station)

    # ------------------------------------------------------------------ the run

    def run(self) -> Figures:
        t0 = time.monotonic()
        for i in range(min(self.plugged, self.total_boards)):
            self._plug(self.stations[i % len(self.stations)])
        for st in self.stations:
            st.start(self.batch, self._ports(st))
        while self.figures.kills < self.target_kills:
            victim = self.rng.choice(self.stations)
            assert victim.proc is not None
            if self.figures.kills % self.intent_kill_every == 0 and self._work_left(victim):
                # As soon as the station has an intent in the ledger (signing).
                delay = self._wait_intent(victim) - victim.started_at
            elif self.rng.random() < self.early_kills:
                # During start-up: imports, migrations, recovery of the last run.
                delay = self.rng.uniform(0.0, self.startup)
            else:
                ready = victim.wait_ready()
                self.startup = ready
                delay = ready + self.rng.uniform(0.0, self.kill_window)
            time.sleep(max(0.0, victim.started_at + delay - time.monotonic()))
            if victim.proc.poll() is not None:
                raise AssertionError(
                    f"station {victim.station_id} exited by itself:\n{victim.log_tail()}"
                )
            self.figures.kill_after.append(time.monotonic() - victim.started_at)
            if victim.kill():
                self.figures.kills += 1
                self._classify_kill(victim)
            self._read_boards(victim)
            self._rotate(victim)
            victim.start(self.batch, self._ports(victim))
        for st in self.stations:
            st.kill()
        self._read_boards()
        self._finish()
        self.figures.starts = sum(st.starts for st in self.stations)
        self.figures.boards = self.made
        self.figures.seconds = time.monotonic() - t0
        return self.figures

    def _finish(self, retries: int = 2) -> None:
        """Runs nobody kills, until every board is made and verified.

        Each run gives every plugged board one attempt (a failed board is retried
        by plugging it in again, here by the next run); ``retries`` runs beyond
        those needed for the boards not made yet.
        """
        left = max(0, self.total_boards - self.made)
        rounds = -(-left // max(1, self.plugged)) + 1 + retries
        for _ in range(rounds):
            for st in self.stations:
                self._rotate(st)
            pending = [h for h in self.boards if self._state(h) != "verified"]
            if not pending and self.made >= self.total_boards:
                return
            self.figures.final_rounds += 1
            running = [st for st in self.stations if self._ports(st)]
            for st in running:
                ports = self._ports(st)
                st.start(self.batch, ports, count=len(ports))
            for st in running:
                st.wait(timeout=120)
            self._read_boards()
        for st in self.stations:
            self._rotate(st)
        if self.made >= self.total_boards and all(
            self._state(h) == "verified" for h in self.boards
        ):
            return
        pending_states = {h: self._state(h) for h in self.boards}
        raise AssertionError(f"boards not all verified after {rounds} runs: {pending_states}")

    def _state(self, hid: str) -> str:
        try:
            return self.ledger.get_device(hid).state
        except Exception:
            return "absent"

    def close(self) -> None:
        for st in self.stations:
            with contextlib.suppress(Exception):
                st.kill()
        for board in self.boards.values():
            board.close()
        self.boards.clear()
        self.ledger.close()

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        """Every invariant of a crash-safe ledger; AssertionError naming the first broken."""
        led = self.ledger
        with led.engine.connect() as conn:
            rows = conn.execute(
                select(
                    certificates.c.serial,
                    certificates.c.state,
                    certificates.c.pem,
                    devices.c.device_id,
                ).select_from(certificates.join(devices, devices.c.id == certificates.c.device_pk))
            ).all()
            serials = conn.execute(select(certificates.c.serial)).scalars().all()
            distinct = conn.execute(
                select(func.count(func.distinct(certificates.c.serial)))
            ).scalar_one()
        by_serial = {r.serial: r for r in rows}
        self.figures.ledger_certificates = len(rows)
        self.figures.revoked = sum(r.state == "revoked" for r in rows)
        self.figures.failed_intents = sum(r.state == "failed" for r in rows)
        self.figures.certificates_left = len(self.left)

        # 1. Every certificate that left the station (found on a board) is in the
        #    ledger, byte for byte, as a certificate (issued or revoked since).
        for pem, hid in self.left.items():
            cert = x509.load_pem_x509_certificate(pem.encode())
            row = by_serial.get(serial_hex(cert.serial_number))
            assert row is not None, f"{hid} holds serial {cert.serial_number:x}, not in the ledger"
            assert row.device_id == hid, f"serial {row.serial} is {row.device_id}'s, found on {hid}"
            assert row.state in ("issued", "revoked"), f"{row.serial} left as {row.state}"
            assert (row.pem or "").strip() == pem.strip(), f"{row.serial}: the board's bytes differ"

        # 2. No intent is left once stations have started again (start-up recovery).
        intents = [r.serial for r in rows if r.state == "intent"]
        assert not intents, f"intents left after recovery: {intents}"

        # 3. No serial twice.
        assert len(serials) == distinct, "a serial is in the ledger twice"

        # 4. No device with two live certificates.
        live: dict[str, list[str]] = {}
        for r in rows:
            if r.state == "issued":
                live.setdefault(r.device_id, []).append(r.serial)
        doubles = {d: s for d, s in live.items() if len(s) > 1}
        assert not doubles, f"devices with two live certificates: {doubles}"

        # 5. Every board verified, holding the certificate the ledger has live for it.
        assert self.made == self.total_boards
        for hid in [*self.boards, *self.unplugged]:
            d = led.get_device(hid)
            assert d.state == "verified", f"{hid} is {d.state}"
            held = _device_pem(self.work_dir / hid / "keys" / CHAIN_FILE)
            assert held is not None, f"{hid} is verified but holds no chain"
            serial = serial_hex(x509.load_pem_x509_certificate(held.encode()).serial_number)
            assert serial == d.serial, f"{hid} holds {serial}, the ledger says {d.serial}"

        # 6. The whitelist is exactly the verified boards' live serials.
        listed = {e.serial for e in led.whitelist()}
        verified = {d.serial for d in led.list_devices(state="verified")}
        assert listed == verified, f"whitelist {listed ^ verified} differ from verified"
        assert all(by_serial[s].state == "issued" for s in listed)
        assert len(verified) == self.total_boards

        # 7. The audit chain holds, as `station audit verify` sees it.
        env = self.stations[0].env
        done = subprocess.run(
            [sys.executable, "-c", LAUNCH, "audit", "verify"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def _device_pem(chain_file: Path) -> str | None:
    """The device certificate (first PEM block) of a stored chain, or None."""
    try:
        data = chain_file.read_text()
    except OSError:
        return None
    end = "-----END CERTIFICATE-----"
    cut = data.find(end)
    return data[: cut + len(end)] + "\n" if cut >= 0 else None


def station_env(
    *,
    data_dir: Path,
    ca_key_uri: str,
    station_id: str,
    database_url: str | None = None,
    sign_pause: float | None = None,
) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "STATION_DATA_DIR": str(data_dir),
        "STATION_CA_KEY_URI": ca_key_uri,
        "STATION_STATION_ID": station_id,
        "COLUMNS": "200",
    }
    if database_url is not None:
        env["STATION_DATABASE_URL"] = database_url
    if sign_pause is not None:
        env["CRASH_SIGN_PAUSE"] = str(sign_pause)
    return env


@contextlib.contextmanager
def crash_rig(**kwargs: object) -> Iterator[CrashRig]:
    rig = CrashRig(**kwargs)  # type: ignore[arg-type]
    try:
        yield rig
    finally:
        rig.close()
