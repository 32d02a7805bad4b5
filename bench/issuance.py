"""Issuance rate: the station's HSM-backed path against the raw token and the tutorial's way.

In one run, on one CA key in one SoftHSM token:
  * station: CSR bytes -> parse -> policy -> device certificate signed in the token -> chain PEM
  * raw: bare C_Sign (CKM_ECDSA over a SHA-256 digest) through the same key store
  * openssl CLI: the tutorial's `openssl x509 -req -CAkey rootCA.key -CAcreateserial`, one
    process per certificate, with a CA key file on disk as the tutorial has it
  * openssl engine: the same command signing with the station's token key through
    OpenSSL's pkcs11 engine (the fairest "same CA" comparison)

A row per PKCS#11 implementation tested (SoftHSM2, tpm2-pkcs11 over a swtpm TPM 2.0,
opencryptoki's soft token; started as the tests start them): the token's own
signature rate (bare C_Sign with the mechanism the station uses on it) beside the
station's issuance rate with its CA key in that token, for --module-seconds each.

    python bench/issuance.py [--count 3000] [--openssl-count 60] [--modules all] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Mechanism

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_csrs(n: int) -> list[bytes]:
    # One key for all CSRs: key generation is the board's cost, not the station's.
    key = ec.generate_private_key(ec.SECP256R1())
    out = []
    for i in range(n):
        name = x509.Name(
            [
                x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "company"),
                x509.NameAttribute(x509.NameOID.COMMON_NAME, f"bench-{i:06d}"),
            ]
        )
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        out.append(csr.public_bytes(serialization.Encoding.PEM))
    return out


def run_openssl(csrs: list[bytes], work: Path, ca_args: list[str]) -> float:
    """Certificates per second, one `openssl x509 -req` process per CSR, as the tutorial does."""
    csr_file = work / "one.csr"
    failures = 0
    t0 = time.perf_counter()
    for pem in csrs:
        csr_file.write_bytes(pem)
        result = subprocess.run(
            [
                "openssl",
                "x509",
                "-req",
                "-in",
                str(csr_file),
                *ca_args,
                "-days",
                "365",
                "-sha256",
                "-out",
                str(work / "one.pem"),
            ],
            capture_output=True,
            check=False,
        )
        failures += result.returncode != 0
    rate = len(csrs) / (time.perf_counter() - t0)
    if failures:
        raise SystemExit(f"openssl failed {failures} of {len(csrs)} times ({ca_args[:2]})")
    return rate


def _rate(fn: object, seconds: float) -> float:
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        fn()  # type: ignore[operator]
        n += 1
        now = time.perf_counter()
        if now >= end:
            return n / (now - t0)


def module_rows(names: list[str], seconds: float, csrs: list[bytes]) -> list[dict[str, object]]:
    """Raw token signatures/s and station certificates/s, per PKCS#11 implementation."""
    from station.ca import DeviceProfile, init_ca, new_serial
    from station.policy import check_csr, load_csr
    from station.settings import Settings
    from tests.fixtures import tokens

    rows: list[dict[str, object]] = []
    for name in names:
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        stop: list[object] = []
        if name == "softhsm":
            from hsm.softhsm import ensure_dev_token

            _, pin, _ = ensure_dev_token(work / "softhsm", "bench-modules")
            from hsm import reset_module

            reset_module(tokens.SOFTHSM_MODULE)
            token = tokens.Token("softhsm", tokens.SOFTHSM_MODULE, "bench-modules", pin)
        elif name == "tpm2":
            stack, token = tokens.start_tpm_token(work)
            stop.append(stack.stop)
        elif name == "opencryptoki":
            token = tokens.start_opencryptoki()
            stop.append(tokens.stop_opencryptoki)
        else:
            raise SystemExit(f"unknown module {name!r}: softhsm, tpm2 or opencryptoki")
        try:
            key_type = token.ca_key_type
            settings = Settings(
                data_dir=work / "data", station_id="bench", ca_key_uri=token.uri("bench-ca")
            )
            ca = init_ca(settings, key_type=key_type).ca
            assert ca is not None
            profile = DeviceProfile()
            it = iter(csrs * 1000)

            def issue(ca: Any = ca, it: Any = it, profile: Any = profile) -> None:
                csr = load_csr(next(it))
                check_csr(csr)
                ca.issue(csr, subject=csr.subject, serial=new_serial(), profile=profile)

            ks = ca.keystore
            offered = ks.mechanisms()
            if key_type.is_ec:
                mech, data = Mechanism.ECDSA, b"\x5a" * 32
            elif Mechanism.SHA256_RSA_PKCS in offered:
                mech, data = Mechanism.SHA256_RSA_PKCS, b"\x5a" * 300
            else:
                mech, data = Mechanism.RSA_PKCS, b"\x5a" * 51  # a DigestInfo's length

            def raw(ks: Any = ks, data: bytes = data, mech: Mechanism = mech) -> None:
                ks.raw_sign(ks.uri.object, ks.uri.id, data, mech)

            issue()
            raw()  # warm-up: login, handles
            raw_rate = _rate(raw, seconds)
            station_rate = _rate(issue, seconds)
            info = ks.token_info()
            rows.append(
                {
                    "module": name,
                    "token": f"{info.manufacturer} {info.model}",
                    "key": key_type.value,
                    "mechanism": mech.name,
                    "raw_sign_per_s": round(raw_rate, 1),
                    "station_certs_per_s": round(station_rate, 1),
                    "station_vs_raw": round(station_rate / raw_rate, 3),
                }
            )
        finally:
            if name != "softhsm":
                tokens._finalize(token.module)
            for fn in stop:
                fn()  # type: ignore[operator]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="certificates via the station")
    parser.add_argument("--raw-count", type=int, default=5000, help="raw C_Sign calls")
    parser.add_argument("--openssl-count", type=int, default=60, help="openssl processes")
    parser.add_argument(
        "--modules",
        default="all",
        help="comma-separated: softhsm,tpm2,opencryptoki; 'all' (default) or 'none'",
    )
    parser.add_argument(
        "--module-seconds", type=float, default=3.0, help="seconds per rate in the module rows"
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    if args.modules == "all":
        modules = ["softhsm", "tpm2", "opencryptoki"]
    elif args.modules == "none":
        modules = []
    else:
        modules = [m.strip() for m in args.modules.split(",") if m.strip()]

    work = Path(tempfile.mkdtemp(prefix="bench-issuance-"))
    os.environ.pop("SOFTHSM2_CONF", None)  # station init makes its own token in `work`
    from station.ca import DeviceProfile, init_ca, new_serial
    from station.policy import check_csr, load_csr
    from station.settings import Settings

    settings = Settings(data_dir=work, station_id="bench")
    ca = init_ca(settings).ca
    assert ca is not None
    profile = DeviceProfile()
    csrs = make_csrs(max(args.count, args.openssl_count))

    def station_issue(pem: bytes) -> bytes:
        csr = load_csr(pem)
        check_csr(csr)
        cert = ca.issue(csr, subject=csr.subject, serial=new_serial(), profile=profile)
        return ca.chain_for(cert)

    for pem in csrs[:50]:  # warm-up
        station_issue(pem)
    t0 = time.perf_counter()
    for pem in csrs[: args.count]:
        station_issue(pem)
    station_rate = args.count / (time.perf_counter() - t0)

    digest = b"\x5a" * 32
    t0 = time.perf_counter()
    for _ in range(args.raw_count):
        ca.keystore.raw_sign(ca.keystore.uri.object, ca.keystore.uri.id, digest, Mechanism.ECDSA)
    raw_rate = args.raw_count / (time.perf_counter() - t0)

    # The tutorial's way: rootCA.key on disk, one openssl process per certificate.
    tut = work / "tutorial"
    tut.mkdir()
    subprocess.run(
        ["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-out", str(tut / "rootCA.key")],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-new",
            "-key",
            str(tut / "rootCA.key"),
            "-sha256",
            "-days",
            "365",
            "-subj",
            "/O=company/CN=tutorial root",
            "-out",
            str(tut / "rootCA.pem"),
        ],
        check=True,
        capture_output=True,
    )
    openssl_rate = run_openssl(
        csrs[: args.openssl_count],
        tut,
        ["-CA", str(tut / "rootCA.pem"), "-CAkey", str(tut / "rootCA.key"), "-CAcreateserial"],
    )
    # The same command with the station's key in the token (OpenSSL's pkcs11 engine).
    uri = ca.keystore.uri
    engine_uri = (
        f"pkcs11:token={uri.token};object={uri.object};type=private?pin-source={uri.pin_source}"
    )
    engine_rate = run_openssl(
        csrs[: args.openssl_count],
        work,
        [
            "-CA",
            str(work / "ca.pem"),
            "-engine",
            "pkcs11",
            "-CAkeyform",
            "engine",
            "-CAkey",
            engine_uri,
            "-set_serial",
            "0x1234",
        ],
    )

    rows = module_rows(modules, args.module_seconds, csrs[:200])
    figures = {
        "station_certs_per_s": round(station_rate, 1),
        "raw_sign_per_s": round(raw_rate, 1),
        "openssl_cli_certs_per_s": round(openssl_rate, 1),
        "openssl_engine_certs_per_s": round(engine_rate, 1),
        "station_vs_openssl_cli": round(station_rate / openssl_rate, 1),
        "station_vs_openssl_engine": round(station_rate / engine_rate, 1),
        "station_vs_raw_sign": round(station_rate / raw_rate, 3),
        "key": "EC P-256 in SoftHSM2",
        "station_count": args.count,
        "openssl_count": args.openssl_count,
        "modules": rows,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"station issue path (HSM key): {station_rate:8.1f} certificates/s")
        print(f"raw PKCS#11 C_Sign:           {raw_rate:8.1f} signatures/s")
        print(f"openssl x509 -req, key file:  {openssl_rate:8.1f} certificates/s (tutorial)")
        print(f"openssl x509 -req, engine:    {engine_rate:8.1f} certificates/s (token key)")
        print(f"station / openssl CLI:        {station_rate / openssl_rate:8.1f}x")
        print(f"station / openssl engine:     {station_rate / engine_rate:8.1f}x")
        print(f"station / raw sign:           {station_rate / raw_rate:8.3f}")
        if rows:
            print(f"\nper module ({args.module_seconds:g} s each, one process, one thread):")
            print(f"{'module':<13} {'key':<9} {'raw sign/s':>11} {'station certs/s':>16} ratio")
            for r in rows:
                print(
                    f"{r['module']:<13} {r['key']:<9} {r['raw_sign_per_s']:>11} "
                    f"{r['station_certs_per_s']:>16} {r['station_vs_raw']}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
