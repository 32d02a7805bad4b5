"""CRL generation and OCSP answers: the station beside OpenSSL's own, in one run.

In one run, on one fresh data directory with its own SoftHSM token and SQLite ledger
holding ``--revoked`` (100,000) revoked certificates and a few live ones:

  * CRL: ``station.publish.crl.generate`` (ledger query, CRL build, one signature in
    the token, stored in the ledger) against ``openssl ca -gencrl`` over an
    ``index.txt`` listing the same serials, with a software key; time and DER size.
  * OCSP: ``station serve`` (``--workers``, 2 by default) answering POST /ocsp, against
    ``openssl ocsp -index index.txt -port P -multi N`` (the same number of processes)
    on 127.0.0.1, each asked by ``--clients`` (32) keep-alive clients in a separate
    load process (asyncio; DER requests without nonce, built before timing, a mix of
    live and revoked serials) for ``--duration`` seconds.

Ratios are station / openssl (above 1: the station is faster, or for the CRL time
and size, slower and larger).

``openssl ocsp -port`` listens on every interface (OpenSSL 3.0 takes no address), so
the benchmark re-runs itself in a network namespace of its own (``unshare --net``,
loopback only): nothing it starts is reachable from outside the machine.

    python bench/publish.py [--revoked 100000] [--duration 5] [--clients 32] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEMPLATE = "/O=company/OU=team/CN={device_id}/C=US"
CERT_ID_HASH = hashes.SHA1()  # noqa: S303 - RFC 5019 CertIDs, what OCSP clients send


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- the data


def fill_ledger(engine: Any, revoked: int, live: int) -> tuple[list[int], list[int]]:
    """``revoked`` revoked and ``live`` issued certificates, written straight into the
    ledger's tables (issuing 100,000 through the token would only slow the setup)."""
    from sqlalchemy import insert

    from station.ledger.schema import batches, certificates, devices

    now = dt.datetime.now(dt.UTC)
    rng = random.Random(18)
    serials = set()
    while len(serials) < revoked + live:
        serials.add(rng.getrandbits(159) | 1 << 150)
    ordered = sorted(serials)
    rng.shuffle(ordered)
    revoked_serials, live_serials = ordered[:revoked], ordered[revoked:]
    with engine.begin() as conn:
        batch_id = conn.execute(
            insert(batches).values(
                name="bench", product="bench", planned_count=10**7, key_mode="board-ecc",
                subject_template=TEMPLATE, days=3650, state="open", station_id="bench",
                device_count=revoked + live, created_at=now,
            )
        ).inserted_primary_key[0]  # fmt: skip
        conn.execute(
            insert(devices),
            [
                {
                    "id": i + 1, "device_id": f"d{i:07d}", "batch_id": batch_id,
                    "state": "revoked" if i < revoked else "verified", "station_id": "bench",
                    "created_at": now, "updated_at": now,
                }
                for i in range(revoked + live)
            ],
        )  # fmt: skip
        reasons = ["key-compromise", "superseded", "scrapped by QA", "cessation-of-operation"]
        conn.execute(
            insert(certificates),
            [
                {
                    "serial": format(serial, "x"), "device_pk": i + 1, "batch_id": batch_id,
                    "station_id": "bench", "state": "revoked" if i < revoked else "issued",
                    "csr_der": b"-", "public_key_sha256": f"{i:064x}", "subject": "CN=x",
                    "sign_time": now, "days": 3650, "backdate_seconds": 0,
                    "created_at": now, "issued_at": now,
                    "revoked_at": now - dt.timedelta(seconds=i) if i < revoked else None,
                    "revoke_reason": reasons[i % 4] if i < revoked else None,
                }
                for i, serial in enumerate(revoked_serials + live_serials)
            ],
        )  # fmt: skip
    return revoked_serials, live_serials


def openssl_ca(work: Path, revoked: list[int], live: list[int]) -> dict[str, Path]:
    """A software CA for openssl: key, self-signed certificate, index.txt, openssl.cnf."""
    d = work / "openssl-ca"
    d.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "openssl bench CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    paths = {"key": d / "ca.key", "cert": d / "ca.pem", "index": d / "index.txt"}
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    expiry = (now + dt.timedelta(days=3650)).strftime("%y%m%d%H%M%SZ")
    reasons = ["keyCompromise", "superseded", "", "cessationOfOperation"]
    lines = []
    for i, serial in enumerate(revoked):
        when = (now - dt.timedelta(seconds=i)).strftime("%y%m%d%H%M%SZ")
        rev = f"{when},{reasons[i % 4]}" if reasons[i % 4] else when
        lines.append(f"R\t{expiry}\t{rev}\t{serial:040X}\tunknown\t/CN=d{i}")
    for i, serial in enumerate(live):
        lines.append(f"V\t{expiry}\t\t{serial:040X}\tunknown\t/CN=l{i}")
    paths["index"].write_text("\n".join(lines) + "\n")
    (d / "index.txt.attr").write_text("unique_subject = no\n")
    (d / "crlnumber").write_text("01\n")
    paths["cnf"] = d / "openssl.cnf"
    paths["cnf"].write_text(
        "[ ca ]\ndefault_ca = bench\n[ bench ]\n"
        f"database = {paths['index']}\ncrlnumber = {d / 'crlnumber'}\n"
        f"certificate = {paths['cert']}\nprivate_key = {paths['key']}\n"
        "default_md = sha256\ndefault_crl_days = 1\ncrl_extensions = crl_ext\n"
        "[ crl_ext ]\nauthorityKeyIdentifier = keyid:always\n"
    )
    return {**paths, "crl": d / "crl.der"}


# ---------------------------------------------------------------- CRL


def bench_crl(settings: Any, ssl: dict[str, Path], rounds: int) -> dict[str, Any]:
    from station.ca import open_ca
    from station.ledger import Ledger
    from station.publish import crl as crls

    ca = open_ca(settings)
    station_times, size = [], 0
    with Ledger.from_settings(settings) as ledger:
        for _ in range(rounds):
            t0 = time.perf_counter()
            made = crls.generate(ledger.engine, ca, "bench")
            station_times.append(time.perf_counter() - t0)
            size = len(made.der)
            entries = made.revoked_count
    openssl_times = []
    for _ in range(rounds):
        pem = ssl["crl"].with_suffix(".pem")
        t0 = time.perf_counter()
        subprocess.run(
            ["openssl", "ca", "-config", str(ssl["cnf"]), "-gencrl", "-out", str(pem)],
            check=True, capture_output=True,
        )  # fmt: skip
        openssl_times.append(time.perf_counter() - t0)
    subprocess.run(
        ["openssl", "crl", "-in", str(pem), "-outform", "DER", "-out", str(ssl["crl"])],
        check=True, capture_output=True,
    )  # fmt: skip
    ssl_size = ssl["crl"].stat().st_size
    station_s, openssl_s = statistics.median(station_times), statistics.median(openssl_times)
    return {
        "revoked": entries,
        "station_seconds": round(station_s, 3),
        "openssl_seconds": round(openssl_s, 3),
        "time_ratio_station_over_openssl": round(station_s / openssl_s, 2),
        "station_der_bytes": size,
        "openssl_der_bytes": ssl_size,
        "size_ratio_station_over_openssl": round(size / ssl_size, 3),
    }


# ---------------------------------------------------------------- OCSP load


async def _read(reader: Any) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
    body = await reader.readexactly(length)
    keep = head.startswith(b"HTTP/1.1") and b"\r\nconnection: close" not in lower
    return status, body, keep


async def _drive(port: int, requests: list[bytes], clients: int, duration: float) -> Any:
    import asyncio

    answered = 0
    errors = 0
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration
    first: list[bytes] = []

    async def client(n: int) -> None:
        nonlocal answered, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = n
        while time.perf_counter() < stop_at:
            request = requests[i % len(requests)]
            i += clients
            t0 = time.perf_counter()
            try:
                writer.write(request)
                status, body, keep = await _read(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            if status == 200:
                answered += 1
                latencies.append(time.perf_counter() - t0)
                if not first:
                    first.append(body)
            else:
                errors += 1
            if not keep:
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return answered, errors, time.perf_counter() - start, latencies, first[0] if first else b""


def _load(port: int, requests: list[bytes], clients: int, duration: float, out: Any) -> None:
    import uvloop

    answered, errors, elapsed, latencies, sample = uvloop.run(
        _drive(port, requests, clients, duration)
    )
    latencies.sort()
    out.put(
        {
            "answers": answered,
            "errors": errors,
            "per_second": round(answered / elapsed, 1),
            "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None,
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else None,
            "sample": sample.hex(),
        }
    )


def ocsp_requests(issuer: x509.Certificate, serials: list[int], path: str) -> list[bytes]:
    """Raw HTTP/1.1 POSTs of DER OCSP requests (no nonce) for ``serials``."""
    # A stand-in certificate carries each serial: the request needs only the serial
    # and the issuer's name and key hashes.
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    out = []
    for serial in serials:
        subject = (
            x509.CertificateBuilder()
            .subject_name(issuer.subject)
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        der = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(subject, issuer, CERT_ID_HASH)
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        out.append(
            (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/ocsp-request\r\nContent-Length: {len(der)}\r\n\r\n"
            ).encode()
            + der
        )
    return out


def run_load(port: int, requests: list[bytes], clients: int, duration: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load, args=(port, requests, clients, duration, queue))
    proc.start()
    result: dict[str, Any] = queue.get(timeout=duration + 120)
    proc.join(30)
    status = ocsp.load_der_ocsp_response(bytes.fromhex(result.pop("sample")))
    result["sample_status"] = status.response_status.name
    return result


def wait_port(
    port: int, proc: subprocess.Popen[bytes], log: Path | None = None, timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            why = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {why}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not listen")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server started in its own session, with the processes it forked
    (`openssl ocsp -multi`'s children outlive their parent otherwise)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bench_ocsp(
    settings: Any,
    conf: Path,
    ssl: dict[str, Path],
    serials: list[int],
    clients: int,
    duration: float,
    workers: int,
) -> dict[str, Any]:
    from station.ca import open_ca

    station_requests = ocsp_requests(open_ca(settings).certificate, serials, "/ocsp")
    openssl_cert = x509.load_pem_x509_certificate(ssl["cert"].read_bytes())
    openssl_requests = ocsp_requests(openssl_cert, serials, "/")

    port = free_port()
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(conf),
        "STATION_DATA_DIR": str(settings.data_dir),
        "STATION_STATION_ID": "bench",
        "PYTHONPATH": str(ROOT),
    }
    station_bin = Path(sys.executable).with_name("station")
    work_log = settings.data_dir / "serve.log"
    serve_log = work_log.open("wb")  # closed when the work directory goes
    server = subprocess.Popen(
        [str(station_bin), "serve", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers)],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=serve_log,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_port(port, server, work_log)
        time.sleep(1.0)  # workers open the token and the ledger
        station = run_load(port, station_requests, clients, duration)
    finally:
        stop(server)
        serve_log.close()

    port = free_port()
    ssl_log = ssl["index"].parent / "ocsp.log"
    ocsp_log = ssl_log.open("wb")
    responder = subprocess.Popen(
        ["openssl", "ocsp", "-index", str(ssl["index"]), "-port", str(port),
         "-rsigner", str(ssl["cert"]), "-rkey", str(ssl["key"]), "-CA", str(ssl["cert"]),
         "-multi", str(workers), "-nmin", "60"],
        stdout=subprocess.DEVNULL, stderr=ocsp_log,  # it makes its own group
    )  # fmt: skip
    try:
        wait_port(port, responder, ssl_log)
        time.sleep(1.0)
        baseline = run_load(port, openssl_requests, clients, duration)
    finally:
        stop(responder)
        ocsp_log.close()
    return {
        "clients": clients,
        "processes": workers,
        "station": station,
        "openssl": baseline,
        "ratio_station_over_openssl": round(station["per_second"] / baseline["per_second"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revoked", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per OCSP run")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="server processes, both sides")
    parser.add_argument("--rounds", type=int, default=3, help="CRLs made per side (median)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    duration = min(max(args.duration, 0.5), 60.0)
    if not args.in_netns:
        # loopback only: openssl's responder binds every address
        script = 'ip link set lo up && exec "$0" "$@"'
        argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--in-netns"]
        return subprocess.run(
            ["unshare", "--net", "sh", "-c", script, *argv], check=False
        ).returncode

    work = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    from hsm.softhsm import use_config, write_config

    conf = write_config(work / "softhsm")
    use_config(conf)
    from station.ca import init_ca
    from station.ledger import Ledger
    from station.settings import Settings

    settings = Settings(data_dir=work / "data", station_id="bench")
    init_ca(settings)
    with Ledger.from_settings(settings) as ledger:
        t0 = time.perf_counter()
        revoked, live = fill_ledger(ledger.engine, args.revoked, 1000)
        setup_s = time.perf_counter() - t0
    ssl = openssl_ca(work, revoked, live)

    try:
        crl = bench_crl(settings, ssl, args.rounds)
        rng = random.Random(6960)
        asked = rng.sample(live, min(500, len(live))) + rng.sample(revoked, min(500, len(revoked)))
        rng.shuffle(asked)
        answers = bench_ocsp(settings, conf, ssl, asked, args.clients, duration, args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"setup_seconds": round(setup_s, 1), "crl": crl, "ocsp": answers}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"ledger: {args.revoked} revoked + 1000 live certificates (setup {setup_s:.1f} s)")
    print(
        f"CRL of {crl['revoked']} entries: station {crl['station_seconds']} s, "
        f"{crl['station_der_bytes']} bytes; openssl ca -gencrl {crl['openssl_seconds']} s, "
        f"{crl['openssl_der_bytes']} bytes; time ratio {crl['time_ratio_station_over_openssl']}"
    )
    s, o = answers["station"], answers["openssl"]
    print(
        f"OCSP at {args.clients} clients, {args.workers} processes each: station "
        f"{s['per_second']}/s (p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, errors "
        f"{s['errors']}); openssl ocsp {o['per_second']}/s (p50 {o['p50_ms']} ms, p99 "
        f"{o['p99_ms']} ms, errors {o['errors']}); ratio {answers['ratio_station_over_openssl']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
