"""The serial line: time per board against the wire, boards per minute against ports.

In one run, with simulated boards (the real agent behind a pty throttled to the baud rate):
  * per board, one port at a time: seconds from hello to verified, against the
    wire-time floor = bytes the station's port actually sent and received x 10 bits / baud
    (8N1; request and reply never overlap, so the floor is the sum);
  * throughput: P boards on P ports at once, P in 1, 8, 32, 64; boards per minute
    against linear scaling of the one-port rate.

    python bench/line.py [--mode board-ecc] [--baud 115200] [--boards 5]
                         [--ports 1,8,32,64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firmware_hooks.simboard import simulate_boards  # noqa: E402
from station.ca import init_ca  # noqa: E402
from station.ledger import Ledger  # noqa: E402
from station.line import LineDriver, ProvisionContext, open_port_client  # noqa: E402
from station.settings import Settings  # noqa: E402

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"


def _batch(ledger: Ledger, mode: str, planned: int, tag: str) -> Any:
    name = f"bench-{tag}-{datetime.now().strftime('%H%M%S%f')}"
    return ledger.create_batch(
        name, product="bench", planned_count=planned, key_mode=mode, subject_template=TEMPLATE
    )


def _run(
    ctx: ProvisionContext, n: int, baud: int, prefix: str
) -> tuple[float, list[Any], list[float]]:
    """Wall seconds, the driver's records, and each record's board compute seconds."""
    with simulate_boards(n, id_prefix=prefix, baudrate=baud) as boards:
        ports = [b.port for b in boards]
        driver = LineDriver(
            ctx, lambda: ports, client_factory=lambda p: open_port_client(p, baudrate=baud)
        )
        started = time.monotonic()
        records = driver.run(until=lambda d: len(d.records) >= n, timeout=900)
        wall = time.monotonic() - started
        by_port = {b.port: b for b in boards}
        compute = [by_port[r.port].board_seconds(r.started, r.started + r.seconds) for r in records]
    return wall, records, compute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", default="board-ecc", choices=["board-ecc", "see-rsa"])
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--boards", type=int, default=5, help="boards timed one at a time")
    parser.add_argument("--ports", default="1,8,32,64")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    port_counts = [int(p) for p in args.ports.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-line-") as tmp:
        os.environ.pop("SOFTHSM2_CONF", None)
        settings = Settings(data_dir=Path(tmp), station_id="bench", ca_key_uri=None)
        outcome = init_ca(settings)
        assert outcome.ca is not None
        ca = outcome.ca
        ledger = Ledger.from_settings(settings)
        stamp = datetime.now().strftime("%H%M%S")

        # Time per board, one port, one board at a time.
        per_board = []
        for i in range(args.boards):
            ctx = ProvisionContext(ledger, ca, _batch(ledger, args.mode, 1, f"one{i}"))
            _, records, compute = _run(ctx, 1, args.baud, f"B{stamp}{i:02d}")
            r = records[0]
            floor = (r.tx + r.rx) * 10 / args.baud
            overhead = r.seconds - floor - compute[0]
            per_board.append(
                {"result": r.outcome.result, "seconds": r.seconds, "tx": r.tx, "rx": r.rx,
                 "wire_floor_s": floor, "board_compute_s": compute[0],
                 "overhead_s": overhead, "overhead_to_wire": overhead / floor,
                 "ratio": r.seconds / floor}
            )  # fmt: skip
        keys = ("seconds", "tx", "rx", "wire_floor_s", "board_compute_s", "overhead_s",
                "overhead_to_wire", "ratio")  # fmt: skip
        mean = {k: sum(p[k] for p in per_board) / len(per_board) for k in keys}

        # Throughput with P ports at once.
        scaling = []
        base_rate = None
        for p in port_counts:
            ctx = ProvisionContext(ledger, ca, _batch(ledger, args.mode, p, f"p{p}"))
            wall, records, _ = _run(ctx, p, args.baud, f"T{stamp}P{p:02d}")
            ok = sum(r.outcome.result == "verified" for r in records)
            rate = ok / wall * 60
            if base_rate is None:
                base_rate = rate / p
            linear = base_rate * p
            scaling.append(
                {"ports": p, "verified": ok, "wall_s": wall, "boards_per_min": rate,
                 "linear_boards_per_min": linear, "ratio_to_linear": rate / linear}
            )  # fmt: skip
        ledger.close()

    report = {
        "mode": args.mode,
        "baud": args.baud,
        "cpus": os.cpu_count(),
        "per_board": per_board,
        "per_board_mean": mean,
        "scaling": scaling,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"mode {args.mode}, {args.baud} baud, {os.cpu_count()} CPUs")
    print(
        f"per board: {mean['seconds']:.3f} s for {mean['tx']:.0f} B out + {mean['rx']:.0f} B in; "
        f"wire floor {mean['wire_floor_s']:.3f} s; ratio {mean['ratio']:.2f}x the floor"
    )
    print(
        f"  = wire floor {mean['wire_floor_s'] * 1000:.1f} ms"
        f" + board compute {mean['board_compute_s'] * 1000:.1f} ms"
        f" + station and protocol overhead {mean['overhead_s'] * 1000:.1f} ms;"
        f" overhead / wire = {mean['overhead_to_wire']:.1%}"
    )
    for s in scaling:
        print(
            f"{s['ports']:3d} ports: {s['verified']:3d} verified in {s['wall_s']:6.2f} s = "
            f"{s['boards_per_min']:7.1f} boards/min; linear {s['linear_boards_per_min']:7.1f}; "
            f"ratio {s['ratio_to_linear']:.2f}"
        )


if __name__ == "__main__":
    main()
