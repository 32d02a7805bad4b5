"""The serial line: time per board against the wire, boards per minute against ports.

In one run:
  * per board, one port, one board at a time, the real agent in its own process
    (OpenSSL CLI for the key, CSR and proof) behind a pty throttled to the baud rate:
    seconds from hello to verified split into
      wire floor     = bytes the station's port sent and received x 10 bits / baud
                       (8N1; request and reply never overlap, so the floor is the sum),
      board compute  = the board's turnarounds seen by the simulated cable (last
                       request byte in, first reply byte out: the agent and its tools),
      overhead       = the rest: the station (ledger, HSM, policy) and the protocol;
    and the ledger's share of the overhead (time inside Ledger calls on the line's path);
  * throughput: P ports at once, P in 1, 8, 32, 64, each port provisioning --per-port
    boards in turn, on SimulatedLine (one thread playing every cable and pty, behind
    each the real agent's own loop, Agent.serve and its Link, in a thread, boards keyed
    in-process with station.line.simkeys), so that the rig costs little next to the
    station; boards per minute from the first hello to the last verdict, against P x
    the one-port rate, with the CPU seconds of the station and of the rig per board.
    The boards speak up to --max-protocol, like the per-board rig's. The station's
    ports are shared out among --processes worker processes (``station line run
    --processes``; 1: one process, the CLI's default).

    python bench/line.py [--mode board-ecc] [--baud 115200] [--boards 5]
                         [--ports 1,8,32,64] [--per-port 4] [--corrupt 0.0]
                         [--max-protocol 3] [--processes 2] [--json]

--corrupt P flips each byte on the line with probability P (both directions, both rigs);
--corrupt 0,0.001,0.01 times the per-board rig at each level, boards interleaved, and
prints boards/min per port at each level against the first (the throughput rig runs
at the first level only; --ports '' skips it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firmware_hooks.simboard import (  # noqa: E402
    Faults,
    SimulatedLine,
    SimulatedLineProcess,
    simulate_boards,
)
from station.ca import init_ca  # noqa: E402
from station.ledger import Ledger  # noqa: E402
from station.line import LineDriver, ProvisionContext, open_port_client  # noqa: E402
from station.line.procs import ProcessLine  # noqa: E402
from station.line.simkeys import CryptographyKeys  # noqa: E402
from station.settings import Settings  # noqa: E402

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
LINE_CALLS = (
    "get_device",
    "register_device",
    "mark_key_ready",
    "issue",
    "mark_installed",
    "create_challenge",
    "verify_proof",
    "mark_failed",
)


class TimedLedger:
    """The ledger with the seconds spent inside the line's calls added up, per thread."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._local = threading.local()
        self.seconds: dict[int, float] = {}
        self.cpu_seconds: dict[int, float] = {}  # the calling thread's CPU time inside them

    def thread_seconds(self) -> float:
        return self.seconds.get(threading.get_ident(), 0.0)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._ledger, name)
        if name not in LINE_CALLS:
            return value

        def timed(*args: Any, **kwargs: Any) -> Any:
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return value(*args, **kwargs)
            finally:
                ident = threading.get_ident()
                self.seconds[ident] = self.seconds.get(ident, 0.0) + (time.perf_counter() - started)
                self.cpu_seconds[ident] = self.cpu_seconds.get(ident, 0.0) + (
                    time.thread_time() - cpu
                )

        return timed


def _batch(ledger: Ledger, mode: str, planned: int, tag: str) -> Any:
    name = f"bench-{tag}-{datetime.now().strftime('%H%M%S%f')}"
    return ledger.create_batch(
        name, product="bench", planned_count=planned, key_mode=mode, subject_template=TEMPLATE
    )


def _drive(ctx: ProvisionContext, ports: list[str], n: int, baud: int | None) -> list[Any]:
    driver = LineDriver(
        ctx,
        lambda: ports,
        client_factory=lambda p: open_port_client(p, baudrate=baud or 115200),
    )
    return driver.run(until=lambda d: len(d.records) >= n, timeout=1800)


def per_board(
    ledger: Ledger,
    ca: Any,
    mode: str,
    baud: int,
    corrupt: float,
    prefix: str,
    max_protocol: int = 3,
) -> dict[str, Any]:
    """One board on one port, the real agent process: where its time goes."""
    timed = TimedLedger(ledger)
    ctx = ProvisionContext(timed, ca, _batch(ledger, mode, 1, "one"))  # type: ignore[arg-type]
    faults = Faults(corrupt=corrupt, seed=1) if corrupt else None  # noise drawn per board id
    with simulate_boards(
        1,
        id_prefix=prefix,
        baudrate=baud,
        faults=faults,
        agent_args=["--max-protocol", str(max_protocol)],
    ) as boards:
        (r,) = _drive(ctx, [boards[0].port], 1, baud)
        compute = boards[0].board_seconds(r.started, r.started + r.seconds)
    floor = (r.tx + r.rx) * 10 / baud
    overhead = r.seconds - floor - compute
    ledger_s = sum(timed.seconds.values())
    return {
        "result": r.outcome.result,
        "seconds": r.seconds,
        "tx": r.tx,
        "rx": r.rx,
        "wire_floor_s": floor,
        "board_compute_s": compute,
        "overhead_s": overhead,
        "ledger_s": ledger_s,
        "overhead_to_wire": overhead / floor,
        "ratio": r.seconds / floor,
    }


def throughput(
    ledger: Ledger,
    ca: Any,
    mode: str,
    baud: int | None,
    ports: int,
    per_port: int,
    corrupt: float,
    prefix: str,
    rig_process: bool = True,
    processes: int = 1,
    settings: Settings | None = None,
    max_protocol: int = 3,
) -> dict[str, Any]:
    """P ports at once on SimulatedLine, ``per_port`` boards each; the rig in a child
    process unless ``rig_process`` is false (then it shares the station's GIL).
    ``processes`` > 1: the station's ports shared out among that many worker
    processes (``station line run --processes``), which open ``settings``."""
    n = ports * per_port
    timed = TimedLedger(ledger)
    batch = _batch(ledger, mode, n, f"p{ports}")
    ctx = ProvisionContext(timed, ca, batch)  # type: ignore[arg-type]
    rig_class = SimulatedLineProcess if rig_process else SimulatedLine
    shm = Path("/dev/shm")
    with rig_class(
        ports,
        per_port,
        id_prefix=prefix,
        baudrate=baud,
        keys=CryptographyKeys(),
        corrupt=corrupt,
        seed=1,
        base_dir=shm if shm.is_dir() else None,  # the boards' fsyncs are not the station's
        max_protocol=max_protocol,
    ) as line:
        workers: list[Any] = []
        cpu0, rig0 = time.process_time(), line.cpu_seconds
        if processes > 1:
            assert settings is not None
            station = ProcessLine(
                settings,
                batch.name,
                lambda: line.ports,
                processes=processes,
                client_factory=functools.partial(open_port_client, baudrate=baud or 115200),
                measure_ledger=True,
            )
            station.start()  # the workers' start-up (imports, HSM login) is not the line's
            cpu0 = time.process_time()
            records = station.run(until=lambda d: len(d.records) >= n, timeout=1800)
            workers = station.worker_stats
        else:
            records = _drive(ctx, line.ports, n, baud)
        rig = line.cpu_seconds - rig0
        cpu = time.process_time() - cpu0 - (0.0 if rig_process else rig)
        parent_cpu = cpu
        cpu += sum(w.cpu_seconds for w in workers)
        compute = sum(line.compute_seconds.values())
        stuck = {p: w for p, w in line.waiting().items() if w}
    first = min(r.started for r in records)
    last = max(r.started + r.seconds for r in records)
    wall = last - first
    ok = sum(r.outcome.result == "verified" for r in records)
    return {
        "ports": ports,
        "boards": n,
        "verified": ok,
        "failed": {
            code: sum(r.outcome.code == code for r in records)
            for code in {r.outcome.code for r in records if r.outcome.result != "verified"}
        },
        "wall_s": wall,
        "boards_per_min": ok / wall * 60,
        "verdicts_per_min": len(records) / wall * 60,  # verified or failed with a reason
        "mean_seconds_per_board": sum(r.seconds for r in records) / len(records),
        "station_cpu_s": cpu,
        "rig_cpu_s": rig,
        "rig_cpu_share": rig / (cpu + rig) if cpu + rig else 0.0,
        "station_cpu_ms_per_board": cpu / n * 1000,
        "board_compute_ms_per_board": compute / n * 1000,
        "processes": processes,
        # the process that runs the status, the view and (one process) every port
        "parent_cpu_ms_per_board": parent_cpu / n * 1000,
        "ledger_ms_per_board": (
            sum(timed.seconds.values()) + sum(w.ledger_seconds for w in workers)
        )
        / n
        * 1000,
        "ledger_cpu_ms_per_board": (
            sum(timed.cpu_seconds.values()) + sum(w.ledger_cpu_seconds for w in workers)
        )
        / n
        * 1000,
        "station_cores": cpu / wall,
        "rig_cores": rig / wall,
        "ports_with_boards_left": len(stuck),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", default="board-ecc", choices=["board-ecc", "see-rsa"])
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--boards", type=int, default=5, help="boards timed one at a time")
    parser.add_argument("--ports", default="1,8,32,64")
    parser.add_argument("--per-port", type=int, default=4, help="boards per port (throughput)")
    parser.add_argument(
        "--rig-in-process",
        action="store_true",
        help="run the simulated line in the station's process (it then shares the GIL)",
    )
    parser.add_argument(
        "--corrupt",
        default="0",
        help="byte corruption probability; a comma list (0,0.001,0.01) times the boards of "
        "each level in turn, interleaved so the machine's load hits them alike, and prints "
        "each level's boards/min per port against the first level's",
    )
    parser.add_argument(
        "--noise-protocols",
        default="",
        help="with a --corrupt list: the agents' highest protocol versions to time at each "
        "level, interleaved (default: --max-protocol); 2,3 sets version 3's noise figures "
        "against version 2's clean ones in one run",
    )
    parser.add_argument(
        "--max-protocol",
        type=int,
        default=3,
        choices=[1, 2, 3],
        help="the simulated agents' highest protocol version, both rigs (1: version 1 "
        "boards; 2: acknowledged frames; 3: and Reed-Solomon parity)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="station worker processes the ports are shared out among, as `station line "
        "run --processes N` (default 2: one Python process is held to one core; 1 measures "
        "the CLI's default)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="where the CA and the SQLite ledger live (default: a temporary directory; "
        "/dev/shm takes the disk's fsync out of the ledger's commits)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    port_counts = [int(p) for p in args.ports.split(",") if p]
    levels = [float(c) for c in args.corrupt.split(",") if c]
    args.corrupt = levels[0]
    protocols = [int(v) for v in args.noise_protocols.split(",") if v] or [args.max_protocol]

    with tempfile.TemporaryDirectory(prefix="bench-line-", dir=args.data_dir) as tmp:
        os.environ.pop("SOFTHSM2_CONF", None)
        settings = Settings(data_dir=Path(tmp), station_id="bench", ca_key_uri=None)
        outcome = init_ca(settings)
        assert outcome.ca is not None
        ca = outcome.ca
        ledger = Ledger.from_settings(settings)
        stamp = datetime.now().strftime("%H%M%S")

        by_level: dict[tuple[int, float], list[dict[str, Any]]] = {
            (v, c): [] for v in protocols for c in levels
        }
        for i in range(args.boards):
            for n, (v, c) in enumerate(by_level):
                by_level[v, c].append(
                    per_board(
                        ledger, ca, args.mode, args.baud, c, f"B{stamp}{n}{i:02d}", v,
                    )
                )  # fmt: skip
        runs = by_level[protocols[-1], levels[0]]
        keys = ("seconds", "tx", "rx", "wire_floor_s", "board_compute_s", "overhead_s",
                "ledger_s", "overhead_to_wire", "ratio")  # fmt: skip
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in keys} if runs else {}
        noise = _noise_table(by_level) if len(by_level) > 1 else []

        scaling = []
        base_rate: float | None = None
        for p in port_counts:
            s = throughput(
                ledger, ca, args.mode, args.baud, p, args.per_port, args.corrupt,
                f"T{stamp}P{p}", rig_process=not args.rig_in_process,
                processes=args.processes, settings=settings, max_protocol=args.max_protocol,
            )  # fmt: skip
            if base_rate is None:
                base_rate = s["boards_per_min"] / p
            s["linear_boards_per_min"] = base_rate * p
            # None when the one-port run verified nothing (a cable too noisy for any board).
            s["ratio_to_linear"] = (
                s["boards_per_min"] / s["linear_boards_per_min"] if base_rate else None
            )
            scaling.append(s)
        ledger.close()

    report = {
        "mode": args.mode,
        "baud": args.baud,
        "corrupt": args.corrupt,
        "processes": args.processes,
        "cpus": os.cpu_count(),
        "data_dir": str(args.data_dir or tempfile.gettempdir()),
        "load_average_after": os.getloadavg(),
        "per_board": runs,
        "per_board_mean": mean,
        "noise": noise,
        "scaling": scaling,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    _print(args, mean, scaling, print)
    for row in noise:
        print(
            f"protocol {row['protocol']}, corrupt {row['corrupt']}: {row['verified']}/"
            f"{row['boards']} verified, {row['seconds_per_board'] * 1000:.0f} ms/board ="
            f" {row['boards_per_min']:.0f} boards/min per port = {row['to_clean']:.2f}x the"
            f" boards/min at corrupt {levels[0]} ({row['time_to_clean']:.2f}x its time per"
            f" board), {row['to_first']:.2f}x protocol {protocols[0]}'s;"
            f" {row['tx']:.0f} B out + {row['rx']:.0f} B in"
        )


def _noise_table(
    by_level: dict[tuple[int, float], list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Per protocol and corruption level: boards verified, time per board, and both
    against the protocol's first level (clean) and against the very first run."""
    rows = []
    first = None
    clean: dict[int, float] = {}
    for (v, c), runs in by_level.items():
        seconds = sum(r["seconds"] for r in runs) / len(runs)
        if first is None:
            first = seconds
        clean.setdefault(v, seconds)
        rows.append(
            {
                "protocol": v,
                "corrupt": c,
                "boards": len(runs),
                "verified": sum(r["result"] == "verified" for r in runs),
                "seconds_per_board": seconds,
                "boards_per_min": 60 / seconds,
                "to_clean": clean[v] / seconds,
                "time_to_clean": seconds / clean[v],
                "to_first": first / seconds,
                "tx": sum(r["tx"] for r in runs) / len(runs),
                "rx": sum(r["rx"] for r in runs) / len(runs),
            }
        )
    return rows


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _print(
    args: argparse.Namespace,
    mean: dict[str, float],
    scaling: list[dict[str, Any]],
    out: Callable[[str], None],
) -> None:
    out(
        f"mode {args.mode}, {args.baud} baud, corrupt {args.corrupt}, {os.cpu_count()} CPUs,"
        f" station in {args.processes} process(es)"
    )
    if mean:
        out(
            f"per board (real agent, OpenSSL CLI): {mean['seconds'] * 1000:.1f} ms for "
            f"{mean['tx']:.0f} B out + {mean['rx']:.0f} B in ({mean['ratio']:.2f}x the floor)"
        )
        out(
            f"  = wire floor {mean['wire_floor_s'] * 1000:.1f} ms"
            f" + board compute {mean['board_compute_s'] * 1000:.1f} ms"
            f" + station and protocol overhead {mean['overhead_s'] * 1000:.1f} ms"
            f" (of which inside the ledger on the critical path, at most"
            f" {mean['ledger_s'] * 1000:.1f} ms of ledger calls, some overlapped with the wire)"
        )
        out(f"  overhead / wire floor = {mean['overhead_to_wire']:.1%}")
    for s in scaling:
        out(
            f"{s['ports']:3d} ports x {args.per_port}: {s['verified']:4d}/{s['boards']} verified"
            f" in {s['wall_s']:6.2f} s = {s['boards_per_min']:7.0f} boards/min;"
            f" linear {s['linear_boards_per_min']:7.0f}; ratio {_ratio(s['ratio_to_linear'])};"
            f" {s['mean_seconds_per_board'] * 1000:.0f} ms/board;"
            f" station {s['station_cores']:.2f} cores, {s['station_cpu_ms_per_board']:.1f}"
            f" CPU ms/board; rig {s['rig_cores']:.2f} cores ({s['rig_cpu_share']:.0%} of CPU);"
            f" ledger {s['ledger_ms_per_board']:.1f} ms/board"
            f" ({s['ledger_cpu_ms_per_board']:.1f} CPU ms)"
            + (
                f"; failed {s['failed']}, {s['verdicts_per_min']:.0f} verdicts/min"
                if s["failed"]
                else ""
            )
        )


if __name__ == "__main__":
    main()
