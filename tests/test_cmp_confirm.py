"""CMP's "verified" is the certConf: a kur (or a signed cr/p10cr) with explicit
confirmation supersedes the old certificate only when the board confirms; with
implicit confirmation at once. Real `openssl cmp` against `station serve`."""

from __future__ import annotations

import subprocess

from cryptography import x509

from station.whitelist import serial_hex
from tests.test_cmp import Cmp, cmp_station, csr  # the module-scoped fixture

__all__ = ["cmp_station"]


def genkey(c: Cmp, name: str) -> None:
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-out", f"{name}.key"],
        check=True, capture_output=True, cwd=c.work,
    )  # fmt: skip


def enrolled(c: Cmp, name: str, device_id: str) -> str:
    csr(c, name, device_id)
    done = c.mac("-cmd", "p10cr", "-csr", f"{name}.csr", "-certout", f"{name}.pem")
    assert done.returncode == 0, done.stdout + done.stderr
    return serial_of(c, name)


def serial_of(c: Cmp, name: str) -> str:
    cert = x509.load_pem_x509_certificate((c.work / f"{name}.pem").read_bytes())
    return serial_hex(cert.serial_number)


def kur(c: Cmp, old: str, new: str, *extra: str) -> subprocess.CompletedProcess[str]:
    genkey(c, new)
    return c.client(
        "-cmd", "kur", "-cert", f"{old}.pem", "-key", f"{old}.key", "-newkey", f"{new}.key",
        "-certout", f"{new}.pem", *extra, op="keyupdate",
    )  # fmt: skip


def whitelisted(c: Cmp, device_id: str) -> list[str]:
    with c.ledger() as ledger:
        return [e.serial for e in ledger.whitelist() if e.device_id == device_id]


def test_a_kur_never_confirmed_leaves_the_old_certificate_live(cmp_station: Cmp) -> None:
    c = cmp_station
    old = enrolled(c, "nc1", "cmp-noconf-kur")
    done = kur(c, "nc1", "nc2", "-disable_confirm")
    assert done.returncode == 0, done.stdout + done.stderr
    new = serial_of(c, "nc2")
    with c.ledger() as ledger:
        assert ledger.certificate(old).state == "renewing"
        assert ledger.certificate(new).state == "issued"
        assert ledger.get_device("cmp-noconf-kur").state == "verified"
    assert whitelisted(c, "cmp-noconf-kur") == [old]
    # The board tries again with its old certificate, and confirms this time: the
    # unconfirmed certificate is revoked, the new one succeeds the old.
    done = kur(c, "nc1", "nc3")
    assert done.returncode == 0, done.stdout + done.stderr
    third = serial_of(c, "nc3")
    with c.ledger() as ledger:
        assert ledger.certificate(new).state == "revoked"
        assert ledger.certificate(old).state == "superseded"
        assert ledger.certificate(third).state == "issued"
    assert whitelisted(c, "cmp-noconf-kur") == [third]


def test_a_kur_supersedes_at_its_certconf(cmp_station: Cmp) -> None:
    c = cmp_station
    old = enrolled(c, "cc1", "cmp-conf-kur")
    done = kur(c, "cc1", "cc2")
    assert done.returncode == 0, done.stdout + done.stderr
    new = serial_of(c, "cc2")
    with c.ledger() as ledger:
        assert ledger.certificate(old).state == "superseded"
    assert whitelisted(c, "cmp-conf-kur") == [new]


def test_a_kur_with_implicit_confirmation_supersedes_at_once(cmp_station: Cmp) -> None:
    c = cmp_station
    old = enrolled(c, "ic1", "cmp-implicit-kur")
    done = kur(c, "ic1", "ic2", "-implicit_confirm")
    assert done.returncode == 0, done.stdout + done.stderr
    new = serial_of(c, "ic2")
    with c.ledger() as ledger:
        assert ledger.certificate(old).state == "superseded"
    assert whitelisted(c, "cmp-implicit-kur") == [new]


def test_a_rejecting_certconf_of_a_kur_keeps_the_old_certificate(cmp_station: Cmp) -> None:
    """openssl cmp rejects (negative certConf) a new certificate that does not verify
    against -out_trusted: here a CA that did not sign it."""
    c = cmp_station
    old = enrolled(c, "rj1", "cmp-reject-kur")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", "other-ca.key", "-subj", "/CN=other", "-out", "other-ca.pem"],
        check=True, capture_output=True, cwd=c.work,
    )  # fmt: skip
    done = kur(c, "rj1", "rj2", "-out_trusted", "other-ca.pem")
    assert done.returncode != 0
    with c.ledger() as ledger:
        certs = ledger.certificates("cmp-reject-kur")
        by_state = {r.state: r.serial for r in certs}
        assert by_state["issued"] == old  # live again, never superseded
        assert "revoked" in by_state and by_state["revoked"] != old
        assert ledger.get_device("cmp-reject-kur").state == "verified"
    assert whitelisted(c, "cmp-reject-kur") == [old]
