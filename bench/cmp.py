"""`openssl cmp` enrolments against the station and against `openssl cmp`'s own mock server.

In one run: N ``openssl cmp -cmd p10cr`` processes, one after the other (and then
``--parallel`` at a time against the station), each a fresh key and CSR, MAC
protection with a board token, certConf/pkiConf. The baseline is OpenSSL's mock
CMP server (``openssl cmp -port P -srv_secret ... -srv_cert ... -srv_key ...
-rsp_cert ...``) on the same machine: it checks the MAC, signs its answers and
hands back a fixed certificate; it neither checks a policy nor signs a certificate
nor writes a ledger, and serves one request at a time. The station: ``station serve
--workers 3`` over HTTP on 127.0.0.1, its answers signed by its CMP key in SoftHSM,
a certificate signed in the token and committed to the SQLite ledger per request.

    python bench/cmp.py [--count 40] [--parallel 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from http_issuance import TEMPLATE, free_port  # noqa: E402


def make_csrs(work: Path, prefix: str, n: int, key: Path | None = None) -> list[Path]:
    """CSRs with fresh keys (or all with ``key``: the mock server returns one fixed
    certificate, which the client accepts only for the key it asked for)."""
    out = []
    for i in range(n):
        name = f"{prefix}-{i:04d}"
        new_key = (
            ["-key", str(key)]
            if key is not None
            else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                  "-keyout", str(work / f"{name}.key")]
        )  # fmt: skip
        subprocess.run(
            ["openssl", "req", "-new", *new_key,
             "-subj", f"/O=company/OU=team/CN={name}/C=US", "-out", str(work / f"{name}.csr")],
            check=True, capture_output=True,
        )  # fmt: skip
        out.append(work / f"{name}.csr")
    return out


def run_clients(
    port: int, path: str, secret: str, ref: str, trusted: Path, csrs: list[Path], parallel: int
) -> dict[str, Any]:
    def one(csr: Path) -> float:
        t0 = time.perf_counter()
        done = subprocess.run(
            ["openssl", "cmp", "-cmd", "p10cr", "-server", f"127.0.0.1:{port}", "-path", path,
             "-ref", ref, "-secret", f"pass:{secret}", "-csr", str(csr), "-trusted", str(trusted),
             "-certout", str(csr.with_suffix(".pem"))],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(done.stdout[-1500:] + done.stderr[-1500:])
        return time.perf_counter() - t0

    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        times = sorted(pool.map(one, csrs))
    elapsed = time.perf_counter() - start
    return {
        "processes": len(times),
        "parallel": parallel,
        "per_second": round(len(times) / elapsed, 2),
        "p50_ms": round(times[len(times) // 2] * 1000, 1),
        "max_ms": round(times[-1] * 1000, 1),
    }


def mock_server(work: Path, secret: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    """openssl cmp's mock server with its own signing key and a fixed certificate to return."""
    key, cert = work / "mock.key", work / "mock.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-subj", "/CN=mock CMP server",
         "-days", "2", "-addext", "keyUsage=critical,digitalSignature,keyCertSign"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        ["openssl", "cmp", "-port", str(port), "-srv_secret", f"pass:{secret}",
         "-srv_cert", str(cert), "-srv_key", str(key), "-rsp_cert", str(cert)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    return proc, port, cert


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40, help="openssl cmp processes per series")
    parser.add_argument("--parallel", type=int, default=4, help="concurrent clients (station)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-cmp-"))
    from hsm.softhsm import use_config, write_config

    conf = write_config(work / "softhsm")
    use_config(conf)
    from station.ca import init_ca
    from station.ledger import Ledger
    from station.settings import Settings

    settings = Settings(data_dir=work / "data", station_id="bench")
    init_ca(settings)
    with Ledger.from_settings(settings) as ledger:
        ledger.create_batch(
            "B", product="bench", planned_count=10**7, key_mode="board-ecc",
            subject_template=TEMPLATE,
        )  # fmt: skip
        token = ledger.create_token("bench-board", "board")
    secrets = work / "cmp-secrets"
    secrets.write_text(f"bench-board {token}\n")
    os.chmod(secrets, 0o600)

    results: dict[str, Any] = {}
    mock, mock_port, mock_cert = mock_server(work, token)
    try:
        results["mock_sequential"] = run_clients(
            mock_port, "pkix/", token, "bench-board", mock_cert,
            make_csrs(work, "mock", args.count, work / "mock.key"), 1,
        )  # fmt: skip
    finally:
        mock.terminate()
        mock.wait(10)

    port = free_port()
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(conf),
        "STATION_DATA_DIR": str(settings.data_dir),
        "STATION_STATION_ID": "bench",
        "STATION_CMP_SECRETS": str(secrets),
        "PYTHONPATH": str(ROOT),
    }
    server = subprocess.Popen(
        [sys.executable, "-c", "from station.cli import main\nmain()\n", "serve",
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("station serve did not come up")
            time.sleep(0.2)
        path = ".well-known/cmp/p/B/pkcs10"
        # One untimed enrolment: the worker opens its token session and CMP key.
        run_clients(port, path, token, "bench-board", settings.ca_cert_path,
                    make_csrs(work, "warm", 1), 1)  # fmt: skip
        results["station_sequential"] = run_clients(
            port, path, token, "bench-board", settings.ca_cert_path,
            make_csrs(work, "seq", args.count), 1,
        )  # fmt: skip
        results["station_parallel"] = run_clients(
            port, path, token, "bench-board", settings.ca_cert_path,
            make_csrs(work, "par", args.count), args.parallel,
        )  # fmt: skip
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    ratio = round(
        results["station_sequential"]["per_second"] / results["mock_sequential"]["per_second"], 3
    )
    report = {"count": args.count, "results": results, "station_to_mock_sequential": ratio}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"openssl cmp -cmd p10cr (MAC, certConf), {args.count} processes per series")
    for name, r in results.items():
        print(f"{name:>20}: {r['per_second']:>7} enrolments/s  p50 {r['p50_ms']} ms  "
              f"max {r['max_ms']} ms  ({r['parallel']} at a time)")  # fmt: skip
    print(f"station / mock server, one at a time: {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
