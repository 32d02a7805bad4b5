"""A local mosquitto broker that requires client certificates: the real mTLS peer
the demo and the tests connect issued device chains to.

Clients must present a chain from ``client_ca`` (the station's CA). The broker's
own certificate comes from a throwaway self-signed key made here (serverAuth),
because the station's device profile is clientAuth only. mosquitto drops
privileges to user ``mosquitto``, so its files live in a 0755 directory, 0644.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _server_identity(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "line-test-broker")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class MosquittoBroker:
    """``with MosquittoBroker(ca_pem) as broker: broker.publish(chain, key, ...)``."""

    def __init__(
        self, client_ca_pem: bytes, *, crl_pem: bytes | None = None, ready_timeout: float = 10.0
    ) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.dir = Path(tempfile.mkdtemp(prefix="line-mqtt-"))
        self.dir.chmod(0o755)
        self.client_ca = self.dir / "clients-ca.pem"
        self.client_ca.write_bytes(client_ca_pem)
        self.server_cert, server_key = _server_identity(self.dir)
        crl_line = ""
        if crl_pem is not None:  # mosquitto checks client chains against it (crlfile)
            crl_path = self.dir / "clients-ca.crl"
            crl_path.write_bytes(crl_pem)
            crl_line = f"crlfile {crl_path}\n"
        self.port = free_port()
        config = self.dir / "mosquitto.conf"
        config.write_text(
            "per_listener_settings true\n"
            f"listener {self.port} {HOST}\n"
            "require_certificate true\n"
            "use_identity_as_username true\n"
            f"cafile {self.client_ca}\n"
            f"certfile {self.server_cert}\n"
            f"keyfile {server_key}\n"
            f"{crl_line}"
            "allow_anonymous false\n"
            "persistence false\n"
            "log_dest stderr\n"
        )
        for path in self.dir.iterdir():
            path.chmod(0o644)
        self.log = self.dir / "broker.log"
        with open(self.log, "wb") as log_file:
            self.proc = subprocess.Popen(
                [binary, "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited:\n{self.log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}:\n{self.log.read_text()}")

    def publish(
        self, chain: Path, key: Path, *, client_id: str, topic: str = "line/hello"
    ) -> subprocess.CompletedProcess[str]:
        """mosquitto_pub over mTLS with a board's chain and key, as in the tutorial."""
        return subprocess.run(
            [
                shutil.which("mosquitto_pub") or "mosquitto_pub",
                "--cafile", str(self.server_cert),
                "--cert", str(chain),
                "--key", str(key),
                "-h", HOST,
                "-p", str(self.port),
                "-q", "1",
                "-t", topic,
                "-i", client_id,
                "--tls-version", "tlsv1.2",
                "-m", f"hello from {client_id}",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )  # fmt: skip

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
