"""The line under load: 64 simulated serial ports, a batch of 1,000 boards.

Expected (issue 8): all verified, no stuck port. The station side is the real
line driver, SoftHSM CA and ledger; the boards are SimulatedLine (the real
Agent.handle behind throttled ptys, in a child process, keys made in-process),
each port given its share of the batch in turn, as an operator swapping boards.

Checks, printed at the end (exit status 1 if one fails): every board verified,
every port through its whole queue, each board handled once, the whitelist
equal to the verified serials. Also: wall time, boards per minute, time per
board (median, p99, max), failures by reason, CPU of station and rig.

    python bench/line_load.py [--ports 64] [--boards 1000] [--baud 115200]
                              [--corrupt 0.0] [--data-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firmware_hooks.simboard import SimulatedLineProcess  # noqa: E402
from station.ca import init_ca  # noqa: E402
from station.ledger import Ledger  # noqa: E402
from station.line import LineDriver, LineStatus, ProvisionContext, open_port_client  # noqa: E402
from station.line.simkeys import CryptographyKeys  # noqa: E402
from station.settings import Settings  # noqa: E402

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
STALL_S = 60.0


def run(
    ports: int, boards: int, baud: int | None, corrupt: float, data_dir: Path | None
) -> dict[str, Any]:
    counts = [boards // ports + (1 if p < boards % ports else 0) for p in range(ports)]
    with tempfile.TemporaryDirectory(prefix="bench-line-load-", dir=data_dir) as tmp:
        os.environ.pop("SOFTHSM2_CONF", None)
        settings = Settings(data_dir=Path(tmp), station_id="bench", ca_key_uri=None)
        outcome = init_ca(settings)
        assert outcome.ca is not None
        ledger = Ledger.from_settings(settings)
        name = f"load-{datetime.now().strftime('%H%M%S')}"
        batch = ledger.create_batch(
            name, product="bench", planned_count=boards, key_mode="board-ecc",
            subject_template=TEMPLATE,
        )  # fmt: skip
        shm = Path("/dev/shm")
        with SimulatedLineProcess(
            ports,
            counts,
            id_prefix="LOAD",
            baudrate=baud,
            keys=CryptographyKeys(),
            corrupt=corrupt,
            seed=1,
            base_dir=shm if shm.is_dir() else None,
        ) as line:
            driver = LineDriver(
                ProvisionContext(ledger, outcome.ca, batch),
                lambda: line.ports,
                status=LineStatus(name),
                client_factory=lambda p: open_port_client(p, baudrate=baud or 1_000_000),
            )
            cpu0, rig0 = time.process_time(), line.cpu_seconds
            started = time.monotonic()
            # Every board gets a verdict; if no board gets one for STALL_S the line is
            # stuck, and the run ends there (the checks then name the ports).
            progress = {"count": 0, "at": time.monotonic()}

            def done(d: LineDriver) -> bool:
                if len(d.records) != progress["count"]:
                    progress.update(count=len(d.records), at=time.monotonic())
                stalled = time.monotonic() - progress["at"] > STALL_S
                return len(d.records) >= boards or stalled

            records = driver.run(until=done, timeout=3600)
            wall = time.monotonic() - started
            station_cpu = time.process_time() - cpu0
            rig_cpu = line.cpu_seconds - rig0
            plugged, waiting = line.plugged(), line.waiting()

        outcomes = driver.finished_devices()
        verified = {d for d, o in outcomes.items() if o.result == "verified"}
        serials = {o.serial for d, o in outcomes.items() if d in verified}
        whitelist = {e.serial for e in ledger.whitelist(name)}
        ledger_states = Counter(ledger.get_device(d).state for d in outcomes)
        ledger.close()

    by_port: dict[str, list[str]] = {}
    for r in records:
        by_port.setdefault(r.port, []).append(r.outcome.device_id)
    seconds = sorted(r.seconds for r in records)
    last = max((r.started + r.seconds for r in records), default=started)
    active = last - min((r.started for r in records), default=started)
    return {
        "ports": ports,
        "boards": boards,
        "baud": baud,
        "corrupt": corrupt,
        "records": len(records),
        "verified": len(verified),
        "failed_by_code": dict(Counter(r.outcome.code for r in records if r.outcome.code)),
        "ledger_states": dict(ledger_states),
        "stuck_ports": sorted(p for p, left in waiting.items() if left),
        "ports_not_through_their_queue": sorted(
            p for p, ids in plugged.items() if sorted(by_port.get(p, [])) != sorted(ids)
        ),
        "boards_handled_twice": len(records) - len(outcomes),
        "whitelist_equals_verified": whitelist == serials,
        "wall_s": wall,
        "active_s": active,
        "boards_per_min": len(verified) / active * 60 if active else 0.0,
        "seconds_per_board": {
            "median": statistics.median(seconds) if seconds else 0.0,
            "p99": seconds[int(0.99 * (len(seconds) - 1))] if seconds else 0.0,
            "max": seconds[-1] if seconds else 0.0,
        },
        "station_cpu_s": station_cpu,
        "rig_cpu_s": rig_cpu,
        "station_cpu_ms_per_board": station_cpu / max(len(records), 1) * 1000,
        "cpus": os.cpu_count(),
        "load_average_after": os.getloadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ports", type=int, default=64)
    parser.add_argument("--boards", type=int, default=1000)
    parser.add_argument("--baud", type=int, default=115200, help="0: unthrottled")
    parser.add_argument("--corrupt", type=float, default=0.0, help="byte corruption probability")
    parser.add_argument("--data-dir", type=Path, help="where the CA and ledger live")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = run(args.ports, args.boards, args.baud or None, args.corrupt, args.data_dir)
    ok = (
        r["verified"] == r["boards"]
        and not r["stuck_ports"]
        and not r["ports_not_through_their_queue"]
        and r["boards_handled_twice"] == 0
        and r["whitelist_equals_verified"]
    )
    r["all_checks_pass"] = ok
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        s = r["seconds_per_board"]
        print(
            f"{r['ports']} ports, {r['boards']} boards, {r['baud'] or 'unthrottled'} baud, "
            f"corrupt {r['corrupt']}: {r['verified']} verified in {r['active_s']:.1f} s "
            f"= {r['boards_per_min']:.0f} boards/min"
        )
        print(
            f"  per board: median {s['median'] * 1000:.0f} ms, p99 {s['p99'] * 1000:.0f} ms, "
            f"max {s['max'] * 1000:.0f} ms; failed {r['failed_by_code'] or 'none'}"
        )
        print(
            f"  stuck ports {len(r['stuck_ports'])}, ports not through their queue "
            f"{len(r['ports_not_through_their_queue'])}, boards handled twice "
            f"{r['boards_handled_twice']}, whitelist == verified {r['whitelist_equals_verified']}"
        )
        print(
            f"  CPU: station {r['station_cpu_s']:.1f} s ({r['station_cpu_ms_per_board']:.1f} "
            f"ms/board), rig {r['rig_cpu_s']:.1f} s; {r['cpus']} CPUs, load average after "
            f"{r['load_average_after'][0]:.1f}"
        )
        print("all checks pass" if ok else "CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
