"""Soak: sustained HTTP issuance for N minutes, with the workers' memory sampled.

One fresh data directory with its own SoftHSM token and SQLite ledger; ``station
serve --workers 2`` in a subprocess on 127.0.0.1; the load comes from another
process (threads, one httpx.Client each, POST /v1/certificates with JSON and a
fresh device key per request), the same shape as bench/http_issuance.py, whose
CSR maker, server command and health wait are reused. The run is split evenly
between the concurrency levels (8 then 32 clients by default) on the same server.

Every few seconds the resident set size (VmRSS) of every server process is read
from /proc. At the end every serial the clients were given is looked up in the
ledger. Prints (or with --json, emits) the no-error count, certificates issued,
serials found in the ledger, RSS start/after warm-up/end/max per worker, and
writes a PNG of RSS and issuance rate over time to --plot.

    python bench/soak.py [--minutes 10] [--clients 8,32] [--workers 2] --plot soak.png [--json]

Figures on a shared development machine are noisy (other benchmarks may run).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.http_issuance import (  # noqa: E402
    TEMPLATE,
    csr_pem,
    free_port,
    serve_command,
    wait_healthy,
)

BIN_S = 5.0  # width of an issuance-rate bin in the plot


# ---------------------------------------------------------------- load generator


def _soak_load(
    url: str, token: str, batch: str, clients: int, duration: float, prefix: str, out: str
) -> None:
    """Runs in its own process: `clients` threads posting CSRs for `duration` seconds.

    Unlike http_issuance's generator it makes each CSR just before sending it (a
    10-minute run cannot hold its CSRs in memory) and keeps every serial it is given.
    Writes {"issued": [[t, serial], ...], "errors": {code: n}} as JSON to `out`.
    """
    import httpx

    lock = threading.Lock()
    issued: list[tuple[float, str]] = []
    errors: dict[str, int] = {}
    counter = [0]
    stop_at = time.time() + duration

    def worker() -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
            while time.time() < stop_at:
                with lock:
                    i = counter[0]
                    counter[0] += 1
                device_id = f"{prefix}-{i:07d}"
                pem = csr_pem(device_id)
                try:
                    r = client.post(
                        "/v1/certificates",
                        json={"batch": batch, "device_id": device_id, "csr": pem},
                    )
                    ok = r.status_code == 201
                    serial = r.json()["serial"] if ok else ""
                    code = "" if ok else str(r.json().get("code", r.status_code))
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    ok, serial, code = False, "", type(exc).__name__
                with lock:
                    if ok:
                        issued.append((time.time(), serial))
                    else:
                        errors[code] = errors.get(code, 0) + 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(out).write_text(json.dumps({"issued": issued, "errors": errors}))


# ---------------------------------------------------------------- memory sampling


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return out


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _is_worker(pid: int) -> bool:
    """uvicorn's workers are multiprocessing spawn children (not the resource tracker)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return "multiprocessing" in cmd and "resource_tracker" not in cmd


class RssSampler(threading.Thread):
    """Samples VmRSS of the server's supervisor and its worker processes."""

    def __init__(self, server_pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.server_pid = server_pid
        self.every = every
        self.samples: list[tuple[float, dict[str, int]]] = []  # (time, {name: KiB})
        self._halt = threading.Event()

    def sample(self) -> None:
        pids = {"supervisor": self.server_pid}
        for child in _children(self.server_pid):
            if _is_worker(child):
                pids[f"worker-{child}"] = child
        values = {name: kib for name, pid in pids.items() if (kib := _rss_kib(pid)) is not None}
        self.samples.append((time.time(), values))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.sample()


# ---------------------------------------------------------------- the run


def _setup(work: Path) -> tuple[Any, Path, str]:
    from hsm.softhsm import use_config, write_config

    conf = write_config(work / "softhsm")
    use_config(conf)
    from station.ca import init_ca
    from station.ledger import Ledger
    from station.settings import Settings

    settings = Settings(data_dir=work / "data", station_id="soak")
    init_ca(settings)
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "soak", product="bench", planned_count=10**8, key_mode="board-ecc",
            subject_template=TEMPLATE,
        )  # fmt: skip
        token = ledger.create_token("soak", "board")
    return settings, conf, token


def _in_ledger(settings: Any, serials: list[str]) -> int:
    """How many of serials the ledger holds as issued certificates (with their PEM).

    One scan of the certificates table: Ledger.list_devices joins every device to
    the certificates by a scan on SQLite (see the report), far too slow for 10^5 boards.
    """
    from sqlalchemy import select

    from station.ledger import Ledger
    from station.ledger.schema import CertState, certificates

    stmt = select(certificates.c.serial).where(
        certificates.c.state == CertState.ISSUED.value, certificates.c.pem.is_not(None)
    )
    with Ledger.from_settings(settings) as ledger, ledger.engine.connect() as conn:
        held = {row.serial for row in conn.execute(stmt)}
    return sum(1 for s in serials if s.lower() in held)


def _rss_summary(samples: list[tuple[float, dict[str, int]]], warm_until: float) -> dict[str, Any]:
    names = sorted({n for _, vals in samples for n in vals})
    out: dict[str, Any] = {}
    for name in names:
        series = [(t, v[name]) for t, v in samples if name in v]
        warm = [kib for t, kib in series if t >= warm_until] or [series[-1][1]]
        mib = [kib / 1024 for _, kib in series]
        out[name] = {
            "start_mib": round(mib[0], 1),
            "after_warmup_mib": round(warm[0] / 1024, 1),
            "end_mib": round(mib[-1], 1),
            "max_mib": round(max(mib), 1),
            "growth_after_warmup_mib": round((series[-1][1] - warm[0]) / 1024, 1),
            "samples": len(series),
        }
    return out


def plot(
    path: Path,
    samples: list[tuple[float, dict[str, int]]],
    issued_times: list[float],
    t0: float,
    phases: list[tuple[float, int]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_rate) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    names = sorted({n for _, vals in samples for n in vals})
    for i, name in enumerate(names):
        pts = [(t - t0, v[name] / 1024) for t, v in samples if name in v]
        label = name if name == "supervisor" else f"worker {i}"
        ax_rss.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    ax_rss.set_ylabel("RSS (MiB)")
    ax_rss.set_ylim(bottom=0)
    ax_rss.legend(loc="lower right")
    ax_rss.set_title("station serve --workers 2 under sustained issuance")
    end = max([t for t, _ in samples] + issued_times + [t0]) - t0
    bins = [0] * (int(end // BIN_S) + 1)
    for t in issued_times:
        bins[int((t - t0) // BIN_S)] += 1
    if len(bins) > 1:
        bins.pop()  # the last bin is partial
    xs = [(i + 0.5) * BIN_S for i in range(len(bins))]
    ax_rate.plot(xs, [b / BIN_S for b in bins], drawstyle="steps-mid")
    for start, clients in phases:
        for ax in (ax_rss, ax_rate):
            ax.axvline(start - t0, color="grey", linestyle=":")
        ax_rate.annotate(f"{clients} clients", (start - t0, 0), xytext=(4, 4),
                         textcoords="offset points")  # fmt: skip
    ax_rate.set_ylabel(f"certificates/s ({BIN_S:.0f} s bins)")
    ax_rate.set_xlabel("seconds")
    ax_rate.set_ylim(bottom=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_soak(
    minutes: float,
    levels: list[int],
    workers: int,
    plot_path: Path | None,
    sample_every: float = 2.0,
    warmup: float | None = None,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    settings, conf, token = _setup(work)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(conf),
        "STATION_DATA_DIR": str(settings.data_dir),
        "STATION_STATION_ID": "soak",
        "PYTHONPATH": str(ROOT),
    }
    server = subprocess.Popen(
        serve_command(port, workers),
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    total = minutes * 60.0
    per_level = total / len(levels)
    # Warm-up: the first 10% of the run (at least 5 s): imports, pools, caches.
    warmup = warmup if warmup is not None else max(5.0, total * 0.1)
    sampler = RssSampler(server.pid, sample_every)
    issued: list[tuple[float, str]] = []
    errors: dict[str, int] = {}
    phases: list[tuple[float, int]] = []
    try:
        wait_healthy(url, server)
        sampler.start()
        t0 = time.time()
        ctx = mp.get_context("spawn")
        for n, clients in enumerate(levels):
            out = work / f"load-{clients}.json"
            phases.append((time.time(), clients))
            proc = ctx.Process(
                target=_soak_load,
                args=(url, token, "soak", clients, per_level, f"s{n}c{clients}", str(out)),
                daemon=True,
            )
            proc.start()
            proc.join(per_level + 120)
            if proc.exitcode != 0 or not out.exists():
                errors[f"load-generator-exit-{proc.exitcode}"] = 1
                continue
            result = json.loads(out.read_text())
            issued += [(t, s) for t, s in result["issued"]]
            for code, count in result["errors"].items():
                errors[code] = errors.get(code, 0) + count
        sampler.stop()
        server_alive = server.poll() is None
    finally:
        sampler.stop()
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    serials = [s for _, s in issued]
    found = _in_ledger(settings, serials)
    elapsed = max((t for t, _ in sampler.samples), default=t0) - t0
    report: dict[str, Any] = {
        "minutes": minutes,
        "workers": workers,
        "levels": levels,
        "seconds": round(elapsed, 1),
        "ok": len(issued),
        "errors": errors,
        "certificates_issued": len(serials),
        "unique_serials": len(set(serials)),
        "serials_in_ledger": found,
        "server_alive_at_end": server_alive,
        "warmup_s": warmup,
        "rate_per_s": round(len(issued) / elapsed, 1) if elapsed else None,
        "rss": _rss_summary(sampler.samples, t0 + warmup),
        "worker_pids_seen": sorted({n for _, v in sampler.samples for n in v if n != "supervisor"}),
    }
    if plot_path is not None:
        plot(plot_path, sampler.samples, [t for t, _ in issued], t0, phases)
        report["plot"] = str(plot_path)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="total load time")
    parser.add_argument("--clients", default="8,32", help="levels, run one after another")
    parser.add_argument("--workers", type=int, default=2, help="station serve --workers")
    parser.add_argument("--sample", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=None, help="seconds (default 10%%)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of RSS and rate over time")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    levels = [int(x) for x in args.clients.split(",") if x.strip()]
    report = run_soak(args.minutes, levels, args.workers, args.plot, args.sample, args.warmup)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"soak: {report['seconds']} s, station serve --workers {args.workers}, "
          f"clients {','.join(map(str, levels))} (half the time each)")  # fmt: skip
    print(f"  no-error requests:   {report['ok']}")
    print(f"  errors:              {report['errors'] or 'none'}")
    print(f"  certificates issued: {report['certificates_issued']} "
          f"({report['unique_serials']} distinct serials, {report['rate_per_s']}/s)")  # fmt: skip
    print(f"  serials in ledger:   {report['serials_in_ledger']}")
    print(f"  RSS MiB (warm-up {report['warmup_s']:.0f} s):")
    print(f"  {'process':>18} {'start':>7} {'warm':>7} {'end':>7} {'max':>7} {'growth':>7}")
    for name, r in report["rss"].items():
        print(f"  {name:>18} {r['start_mib']:>7} {r['after_warmup_mib']:>7} {r['end_mib']:>7} "
              f"{r['max_mib']:>7} {r['growth_after_warmup_mib']:>7}")  # fmt: skip
    if "plot" in report:
        print(f"  plot: {report['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
