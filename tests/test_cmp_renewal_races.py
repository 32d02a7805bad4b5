"""CMP renewals that cross: a kur signed with the successor still waiting for its
certConf, a certConf that arrives after its renewal was abandoned (or its
certificate superseded), an rr while a renewal waits. Real `openssl cmp` against
`station serve`; the late certConf is the client's own message, held back by a
relay on 127.0.0.1 and delivered afterwards."""

from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from pyasn1_modules import rfc4210

from station.enroll import cmp
from tests.test_cmp import Cmp, cmp_station, csr
from tests.test_cmp_confirm import enrolled, genkey, kur, serial_of, whitelisted

__all__ = ["cmp_station"]


@contextmanager
def holding_certconf(c: Cmp) -> Iterator[tuple[int, dict[str, bytes | str]]]:
    """A relay to the station that forwards everything but a certConf, which it keeps
    (answering 503, as a lost connection would): (its port, what it kept)."""
    kept: dict[str, bytes | str] = {}

    class Relay(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if cmp.body_type(cmp.decode(body)) == "certConf":
                kept["body"], kept["path"] = body, self.path
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            r = httpx.post(
                c.served.url + self.path, content=body,
                headers={"content-type": cmp.CONTENT_TYPE}, timeout=60,
            )  # fmt: skip
            self.send_response(r.status_code)
            self.send_header("Content-Type", r.headers.get("content-type", cmp.CONTENT_TYPE))
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], kept
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def other_ca(c: Cmp) -> str:
    """A CA that signed nothing of the station's (openssl cmp rejects what it cannot verify)."""
    if not (c.work / "other-ca.pem").exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", "other-ca.key", "-subj", "/CN=other", "-out", "other-ca.pem"],
            check=True, capture_output=True, cwd=c.work,
        )  # fmt: skip
    return "other-ca.pem"


def via(c: Cmp, port: int, *args: str, op: str = "keyupdate") -> None:
    """An openssl cmp exchange through the relay (its certConf is kept: it fails)."""
    done = subprocess.run(
        ["openssl", "cmp", "-server", f"127.0.0.1:{port}", "-path", f".well-known/cmp/p/C/{op}",
         "-trusted", str(c.settings.ca_cert_path), *args],
        capture_output=True, text=True, cwd=c.work, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0  # no pkiConf came back


def deliver(c: Cmp, kept: dict[str, bytes | str]) -> tuple[str, str]:
    """The kept certConf, now: (answer body type, the error text if any)."""
    assert isinstance(kept["body"], bytes) and isinstance(kept["path"], str)
    r = httpx.post(
        c.served.url + kept["path"], content=kept["body"],
        headers={"content-type": cmp.CONTENT_TYPE}, timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    answer = cmp.decode(r.content)
    kind = cmp.body_type(answer)
    text = ""
    if kind == "error":
        info = answer["body"]["error"]["pKIStatusInfo"]
        bits = info["failInfo"]
        names = [
            n for n, i in rfc4210.PKIFailureInfo.namedValues.items() if i < len(bits) and bits[i]
        ]
        text = " ".join(str(s) for s in info["statusString"]) + " failInfo: " + " ".join(names)
    return kind, text


def states(c: Cmp, device_id: str) -> dict[str, str]:
    with c.ledger() as ledger:
        return {r.serial: r.state for r in ledger.certificates(device_id)}


def test_a_kur_signed_with_the_unconfirmed_successor_confirms_it(cmp_station: Cmp) -> None:
    """The board never sent (or the station never got) the certConf of its renewal,
    but it stored the new certificate and renews with it: that request proves it
    holds it, so it is confirmed, then renewed from; the second renewal's certConf
    moves the whitelist."""
    c = cmp_station
    old = enrolled(c, "w1", "cmp-chain")
    done = kur(c, "w1", "w2", "-disable_confirm")
    assert done.returncode == 0, done.stdout + done.stderr
    new1 = serial_of(c, "w2")
    done = kur(c, "w2", "w3")
    assert done.returncode == 0, done.stdout + done.stderr
    new2 = serial_of(c, "w3")
    assert states(c, "cmp-chain") == {old: "superseded", new1: "superseded", new2: "issued"}
    assert whitelisted(c, "cmp-chain") == [new2]
    with c.ledger() as ledger:
        assert ledger.get_device("cmp-chain").state == "verified"
        assert ledger.renewals.pending("cmp-chain") is None


def test_a_late_certconf_of_a_restarted_renewal_changes_nothing(cmp_station: Cmp) -> None:
    """kur #1's certConf is held back; kur #2 from the same certificate restarts the
    renewal (kur #1's certificate revoked: renewal-restarted) and waits for its own.
    kur #1's late certConf, signed with the still live old certificate: an accept
    is an error (certRevoked), not a pkiConf; a reject revokes nothing (before: the
    device's live certificate and its waiting renewal were revoked)."""
    c = cmp_station
    for answer in ("accept", "reject"):
        device_id = f"cmp-late-{answer}"
        old = enrolled(c, f"{answer}1", device_id)
        genkey(c, f"{answer}2")
        # openssl cmp rejects a certificate it cannot verify against -out_trusted
        extra = [] if answer == "accept" else ["-out_trusted", other_ca(c)]
        with holding_certconf(c) as (port, kept):
            via(
                c, port, "-cmd", "kur", "-cert", f"{answer}1.pem", "-key", f"{answer}1.key",
                "-newkey", f"{answer}2.key", "-certout", f"{answer}2.pem", *extra,
            )  # fmt: skip
        assert "body" in kept
        first = next(s for s, st in states(c, device_id).items() if s != old)
        done = kur(c, f"{answer}1", f"{answer}3", "-disable_confirm")
        assert done.returncode == 0, done.stdout + done.stderr
        second = serial_of(c, f"{answer}3")
        before = {old: "renewing", first: "revoked", second: "issued"}
        assert states(c, device_id) == before
        kind, text = deliver(c, kept)
        if answer == "accept":
            assert kind == "error" and "cmp-cert-not-waiting" in text, text
            assert "failInfo: certRevoked" in text, text
        else:
            assert kind == "pkiconf", text  # it agrees: that certificate is revoked
        assert states(c, device_id) == before
        assert whitelisted(c, device_id) == [old]
        with c.ledger() as ledger:
            assert ledger.get_device(device_id).state == "verified"
            pending = ledger.renewals.pending(device_id)
            assert pending is not None and pending.new_serial == second


def test_a_late_certconf_signed_with_a_superseded_certificate_is_refused(
    cmp_station: Cmp,
) -> None:
    """kur #1's certConf is held back; kur #2 from the same certificate is confirmed,
    superseding the certificate both were signed with. The late certConf (a reject)
    is refused notAuthorized (its signer is superseded: not live, not revoked) and
    revokes nothing."""
    c = cmp_station
    old = enrolled(c, "sp1", "cmp-late-super")
    genkey(c, "sp2")
    with holding_certconf(c) as (port, kept):
        via(
            c, port, "-cmd", "kur", "-cert", "sp1.pem", "-key", "sp1.key", "-newkey", "sp2.key",
            "-certout", "sp2.pem", "-out_trusted", other_ca(c),
        )  # fmt: skip
    done = kur(c, "sp1", "sp3")
    assert done.returncode == 0, done.stdout + done.stderr
    new2 = serial_of(c, "sp3")
    before = states(c, "cmp-late-super")
    assert before[old] == "superseded" and before[new2] == "issued"
    kind, text = deliver(c, kept)
    assert kind == "error" and "cmp-certificate-not-live" in text, text
    assert "failInfo: notAuthorized" in text, text  # superseded, not revoked
    assert states(c, "cmp-late-super") == before
    assert whitelisted(c, "cmp-late-super") == [new2]
    with c.ledger() as ledger:
        assert ledger.get_device("cmp-late-super").state == "verified"


def test_a_late_certconf_of_a_first_enrolment_no_longer_live(cmp_station: Cmp) -> None:
    """A first enrolment's certConf (MAC) is held back; the board renews (signed,
    implicit confirmation), superseding it. The late certConf: an accept is an
    error, a reject revokes nothing (before: the renewed certificate was revoked)."""
    c = cmp_station
    for answer in ("accept", "reject"):
        device_id = f"cmp-late-first-{answer}"
        csr(c, f"f{answer}1", device_id)
        extra = [] if answer == "accept" else ["-out_trusted", other_ca(c)]
        with holding_certconf(c) as (port, kept):
            via(
                c, port, "-ref", "cmp-board", "-secret", f"pass:{c.token}", "-cmd", "p10cr",
                "-csr", f"f{answer}1.csr", "-certout", f"f{answer}1.pem", *extra, op="pkcs10",
            )  # fmt: skip
        first = next(iter(states(c, device_id)))
        # openssl writes no certificate without a pkiConf: the ledger has it.
        with c.ledger() as ledger:
            pem = ledger.certificate(first).pem
        assert pem is not None
        (c.work / f"f{answer}1.pem").write_text(pem)
        genkey(c, f"f{answer}2")
        done = kur(c, f"f{answer}1", f"f{answer}2", "-implicit_confirm")
        assert done.returncode == 0, done.stdout + done.stderr
        new = serial_of(c, f"f{answer}2")
        before = {first: "superseded", new: "issued"}
        assert states(c, device_id) == before
        kind, text = deliver(c, kept)
        assert kind == "error" and "cmp-cert-not-waiting" in text, text
        assert states(c, device_id) == before
        assert whitelisted(c, device_id) == [new]


def test_rr_revokes_the_live_certificate_while_a_renewal_waits(cmp_station: Cmp) -> None:
    """The old certificate is renewing (live, whitelisted) while a kur waits for its
    certConf: the board may revoke it; its waiting successor is revoked with it."""
    c = cmp_station
    old = enrolled(c, "rw1", "cmp-rr-renewing")
    assert kur(c, "rw1", "rw2", "-disable_confirm").returncode == 0
    new = serial_of(c, "rw2")
    done = c.client(
        "-cmd", "rr", "-cert", "rw1.pem", "-key", "rw1.key", "-oldcert", "rw1.pem",
        op="revocation",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert states(c, "cmp-rr-renewing") == {old: "revoked", new: "revoked"}
    assert whitelisted(c, "cmp-rr-renewing") == []
    with c.ledger() as ledger:
        assert ledger.get_device("cmp-rr-renewing").state == "revoked"
    # Revoked now: a second rr is refused certRevoked (true this time).
    done = c.client(
        "-cmd", "rr", "-cert", "rw1.pem", "-key", "rw1.key", "-oldcert", "rw1.pem",
        op="revocation",
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "PKIFailureInfo: certRevoked" in out, out


def test_rr_with_a_superseded_certificate_is_not_authorized(cmp_station: Cmp) -> None:
    """A superseded certificate is not revoked (certRevoked would be false) and no
    longer the board's: notAuthorized, nothing revoked."""
    c = cmp_station
    old = enrolled(c, "rs1", "cmp-rr-superseded")
    assert kur(c, "rs1", "rs2").returncode == 0
    new = serial_of(c, "rs2")
    done = c.client(
        "-cmd", "rr", "-cert", "rs1.pem", "-key", "rs1.key", "-oldcert", "rs1.pem",
        op="revocation",
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "PKIFailureInfo: notAuthorized" in out, out
    assert "cmp-certificate-not-live" in out, out
    assert states(c, "cmp-rr-superseded") == {old: "superseded", new: "issued"}
    assert whitelisted(c, "cmp-rr-superseded") == [new]
