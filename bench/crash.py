"""Crash consistency, longer than the test: `station line run` SIGKILLed N times.

The rig of tests/test_crash.py (tests/crash_rig.py) with more kills and boards:
simulated boards on ptys, unthrottled, outlive every station; each kill lands at
a random moment (a fifth in start-up, every fifth as soon as an intent is in the
ledger, the rest within --window seconds of the line being up) and the station
is started again. Then the invariants are checked and the figures printed:

    python bench/crash.py [--kills 60] [--boards 40] [--plugged 6] [--backend both]
                          [--sign-pause 0.1] [--seed 1] [--json]

``sqlite`` is one station on the SQLite ledger; ``postgresql`` two stations
sharing one PostgreSQL ledger (Debian's server started in a temporary
directory, or --pg-url), both killed. It is not a speed benchmark: the rates
printed only say how long the run took on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_one(
    backend: str,
    url: str,
    work: Path,
    ca_home: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    from station.ledger import Ledger
    from tests.crash_rig import TEMPLATE, Station, crash_rig, station_env

    with Ledger(url, "setup") as led:
        led.create_batch(
            "CRASH",
            product="artik530",
            planned_count=args.boards,
            key_mode="board-ecc",
            subject_template=TEMPLATE,
        )
    names = ["line-1"] if backend == "sqlite" else ["st-a", "st-b"]
    stations = []
    for name in names:
        # Each station its own data directory, all sharing the CA key in the token.
        data_dir = work / name
        data_dir.mkdir(parents=True)
        shutil.copy(ca_home / "ca.pem", data_dir / "ca.pem")
        env = station_env(
            data_dir=data_dir,
            ca_key_uri=(ca_home / "ca-key.uri").read_text().strip(),
            station_id=name,
            database_url=None if backend == "sqlite" else url,
            sign_pause=args.sign_pause or None,
        )
        if backend == "sqlite":  # the first station's own SQLite file is the ledger
            env["STATION_DATABASE_URL"] = url
        stations.append(Station(name, env, work / f"{name}.log"))
    with crash_rig(
        stations=stations,
        database_url=url,
        batch="CRASH",
        total_boards=args.boards,
        plugged=args.plugged,
        kills=args.kills,
        kill_window=args.window,
        work_dir=work / "boards",
        seed=args.seed,
    ) as rig:
        figures = rig.run()
        rig.check()  # raises on the first broken invariant
    out = asdict(figures)
    after = out.pop("kill_after")
    out["backend"] = backend
    out["stations"] = len(names)
    out["kill_after_median_s"] = round(sorted(after)[len(after) // 2], 2) if after else None
    out["seconds"] = round(out["seconds"], 1)
    out["invariants"] = "all hold"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=60, help="SIGKILLs per backend")
    parser.add_argument("--boards", type=int, default=40, help="boards per backend")
    parser.add_argument("--plugged", type=int, default=6, help="boards on the line at once")
    parser.add_argument("--window", type=float, default=0.6, help="kill within s of line up")
    parser.add_argument("--sign-pause", type=float, default=0.1, help="s between sign and commit")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--pg-url", help="PostgreSQL URL (default: start a temporary server)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-crash-"))
    from hsm.softhsm import use_config, write_config

    conf = write_config(work / "softhsm")
    use_config(conf)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    from station.ca import init_ca
    from station.settings import Settings

    ca_home = work / "ca-home"
    init_ca(Settings(data_dir=ca_home, station_id="bench"))

    results: list[dict[str, Any]] = []
    pg_server = None
    try:
        if args.backend in ("sqlite", "both"):
            say(f"sqlite: one station, {args.kills} kills, {args.boards} boards ...")
            url = f"sqlite:///{work / 'sqlite' / 'ledger.sqlite'}"
            (work / "sqlite").mkdir()
            results.append(run_one("sqlite", url, work / "sqlite", ca_home, args))
        if args.backend in ("postgresql", "both"):
            url = args.pg_url or ""
            if not url:
                from tests.fixtures.pg import PgServer, _pg_bin

                bindir = _pg_bin()
                if bindir is None:
                    raise SystemExit("no PostgreSQL server binaries; give --pg-url")
                pg_server = PgServer(bindir, Path(tempfile.mkdtemp(prefix="bench-crash-pg-")))
                pg_server.start()
                name = f"crash_{uuid.uuid4().hex[:8]}"
                pg_server.admin(f"CREATE DATABASE {name}")
                url = pg_server.url(name)
            say(f"postgresql: two stations, {args.kills} kills, {args.boards} boards ...")
            results.append(run_one("postgresql", url, work / "pg", ca_home, args))
    finally:
        if pg_server is not None:
            pg_server.stop()
            shutil.rmtree(pg_server.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(results, indent=1))
        return
    keys = [k for k in results[0] if k != "backend"]
    print(f"{'':28}" + "".join(f"{r['backend']:>14}" for r in results))
    for key in keys:
        print(f"{key:28}" + "".join(f"{r[key]!s:>14}" for r in results))
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "- CPU shared with other work")


if __name__ == "__main__":
    main()
