"""`station batch|sign|device|revoke|whitelist|audit`: the ledger from the command line."""

from __future__ import annotations

import contextlib
import csv
import getpass
import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Any, ParamSpec, TypeVar

import typer
from cryptography.hazmat.primitives.serialization import Encoding

from station.cli.common import (
    ListFormat,
    cli_errors,
    console,
    err_console,
    fail,
    settings,
    write_rows,
)
from station.ledger import ADHOC_BATCH, Ledger
from station.ledger.records import Batch, Device
from station.ledger.schema import DeviceState, KeyMode
from station.policy import check_printable
from station.timefmt import rfc3339
from station.whitelist import WhitelistEntry

P = ParamSpec("P")
R = TypeVar("R")

batch_app = typer.Typer(help="Production batches: create, list, show, close.", no_args_is_help=True)
device_app = typer.Typer(help="Boards in the ledger.", no_args_is_help=True)
whitelist_app = typer.Typer(help="Serials of verified, unrevoked boards.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)


@contextmanager
def _ledger() -> Iterator[Ledger]:
    led = Ledger.from_settings(settings())
    try:
        yield led
    finally:
        led.close()


def _operator() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def _ts(value: datetime | None) -> str:
    return "-" if value is None else rfc3339(value, timespec="seconds")


def _print_batch(b: Batch) -> None:
    rows = {
        "name": b.name,
        "product": b.product,
        "state": b.state,
        "devices": f"{b.device_count} of {b.planned_count}",
        "key mode": b.key_mode,
        "subject": b.subject_template,
        "validity": f"{b.days} days",
        "operator": b.operator or "-",
        "station": b.station_id,
        "created": _ts(b.created_at),
        "closed": _ts(b.closed_at) if b.closed_at else "-",
        "crl url": b.crl_url or "-",
        "ocsp url": b.ocsp_url or "-",
    }
    for key, value in rows.items():
        console.print(f"  {key:<9} {value}", highlight=False, markup=False)


# ----------------------------------------------------------------- batches


@batch_app.command("create")
@cli_errors
def batch_create(
    name: Annotated[str, typer.Argument(help="Batch name, unique in the ledger.")],
    product: Annotated[str, typer.Option("--product", help="Product, e.g. artik530.")],
    count: Annotated[int, typer.Option("--count", help="Planned number of boards.")],
    key_mode: Annotated[KeyMode, typer.Option("--key-mode", help="Where the board key is made.")],
    subject_template: Annotated[
        str,
        typer.Option("--subject-template", help="e.g. '/O=company/OU=team/CN={device_id}/C=US'."),
    ],
    days: Annotated[
        int | None, typer.Option("--days", help="Certificate validity (default: settings).")
    ] = None,
    crl_url: Annotated[
        str | None,
        typer.Option("--crl-url", help="CRL distribution point in the device certificates."),
    ] = None,
    ocsp_url: Annotated[
        str | None,
        typer.Option("--ocsp-url", help="OCSP responder (AIA) in the device certificates."),
    ] = None,
) -> None:
    """Open a production batch."""
    cfg = settings()
    check_printable(product, "a product")  # as the API does (the ledger checks the name)
    with _ledger() as led:
        b = led.create_batch(
            name,
            product=product,
            planned_count=count,
            key_mode=key_mode.value,
            subject_template=subject_template,
            days=days or cfg.device_days,
            operator=_operator(),
            crl_url=crl_url,
            ocsp_url=ocsp_url,
        )
    console.print(f"created batch [bold]{b.name}[/]", highlight=False)
    _print_batch(b)


FORMAT_OPTION = typer.Option(
    "--format", help="table for people; tsv or json for programs (nothing is ever cut)."
)


def _iso(value: object) -> str | None:
    """RFC 3339 in UTC with a Z, as the API writes timestamps."""
    if not hasattr(value, "isoformat"):
        return None
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


@batch_app.command("list")
@cli_errors
def batch_list(fmt: Annotated[ListFormat, FORMAT_OPTION] = ListFormat.TABLE) -> None:
    """Every batch with its state and device counts."""
    with _ledger() as led:
        items = led.list_batches()
        counts = led.counts()
    if not items and fmt is ListFormat.TABLE:
        console.print("no batches")
        return
    rows = (
        {
            "name": b.name,
            "state": b.state,
            "product": b.product,
            "device_count": b.device_count,
            "planned_count": b.planned_count,
            "verified": counts.get(b.name, {}).get("verified", 0),
            "key_mode": b.key_mode,
            "created_at": _iso(b.created_at),
        }
        for b in items
    )
    write_rows(
        rows,
        fmt,
        ["name", "state", "product", "device_count", "planned_count", "verified", "key_mode",
         "created_at"],
        lambda r: (
            f"{r['name']:<20} {r['state']:<7} {r['product']:<14} "
            f"{str(r['device_count']) + '/' + str(r['planned_count']):>15} {r['verified']:>9} "
            f"{r['key_mode']}"
        ),
        f"{'NAME':<20} {'STATE':<7} {'PRODUCT':<14} {'DEVICES':>15} {'VERIFIED':>9} KEY MODE",
    )  # fmt: skip


@batch_app.command("show")
@cli_errors
def batch_show(name: Annotated[str, typer.Argument(help="Batch name.")]) -> None:
    """One batch, with its devices per state."""
    with _ledger() as led:
        b = led.get_batch(name)
        per_state = led.counts(name).get(name, {})
    _print_batch(b)
    for state in DeviceState:
        if per_state.get(state.value):
            console.print(f"  {state.value:<9} {per_state[state.value]}", highlight=False)


@batch_app.command("close")
@cli_errors
def batch_close(name: Annotated[str, typer.Argument(help="Batch name.")]) -> None:
    """Close a batch: no more certificates are issued in it."""
    with _ledger() as led:
        b = led.close_batch(name, operator=_operator())
    console.print(f"closed batch [bold]{b.name}[/] ({b.device_count} devices)", highlight=False)


# -------------------------------------------------------------------- sign


@cli_errors
def sign_cmd(
    csr: Annotated[Path, typer.Option("--csr", help="CSR file, PEM or DER.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the certificate here (default stdout).")
    ] = None,
    batch: Annotated[str | None, typer.Option("--batch", help="Batch of the board.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="The board's hardware id.")] = None,
    reprovision: Annotated[
        bool,
        typer.Option("--reprovision", help="Revoke the board's live certificate and issue anew."),
    ] = False,
    reason: Annotated[
        str | None,
        typer.Option(
            "--reason", help="Why it is re-provisioned (required to bring back a revoked board)."
        ),
    ] = None,
    chain: Annotated[
        bool, typer.Option("--chain", help="Write the CA certificate after the device's.")
    ] = False,
) -> None:
    """Sign a CSR through the ledger (intent, HSM signature, commit, then output).

    Without --batch and --device the CSR goes to the implicit `adhoc` batch,
    keeps the subject it presents (after policy) and is named by its CN.
    """
    from station import policy
    from station.ca import open_ca
    from station.recovery import recover_at_startup

    if (batch is None) != (device is None):
        raise fail("usage", "--batch and --device go together", 2)
    try:
        data = csr.read_bytes()
    except OSError as exc:
        raise fail("unreadable-csr", f"cannot read {csr}: {exc.strerror}") from None
    cfg = settings()
    ca = open_ca(cfg)
    # Recovery first (intents a killed run left); the lock is held while signing.
    with _ledger() as led, contextlib.closing(recover_at_startup(led, ca, cfg.data_dir)[1]):
        if batch is None:
            parsed = policy.load_csr(data)
            # Refuse a bad CSR before the adhoc batch exists: a refusal changes nothing.
            policy.check_csr(parsed)
            cn = policy.common_name(parsed.subject)
            if cn is None:
                raise fail("missing-cn", "the CSR has no single CN to name the device")
            batch, device = led.ensure_adhoc_batch(days=cfg.device_days).name, cn
        assert device is not None
        result = led.issue(batch, device, data, ca, reprovision=reprovision, reason=reason)
    pem = result.chain_pem if chain else result.certificate.public_bytes(Encoding.PEM)
    if out is None:
        sys.stdout.buffer.write(pem)
        sys.stdout.flush()
    else:
        out.write_bytes(pem)
    verb = "already issued" if result.reused else "issued"
    where = "" if batch == ADHOC_BATCH else f" in batch {batch}"
    err_console.print(
        f"{verb} serial {result.serial:x} to {device}{where}; sha256 {result.fingerprint}",
        highlight=False,
        markup=False,
    )


# ----------------------------------------------------------------- devices


def _print_device(d: Device) -> None:
    rows = {
        "device": d.device_id,
        "batch": d.batch,
        "state": d.state,
        "serial": d.serial or "-",
        "attempts": str(d.attempts),
        "failure": f"{d.failure_code}: {d.failure_message}" if d.failure_code else "-",
        "station": d.station_id,
        "created": _ts(d.created_at),
        "key-ready": _ts(d.key_ready_at),
        "issued": _ts(d.issued_at),
        "installed": _ts(d.installed_at),
        "verified": _ts(d.verified_at),
        "failed": _ts(d.failed_at),
        "revoked": _ts(d.revoked_at),
    }
    for key, value in rows.items():
        console.print(f"  {key:<10} {value}", highlight=False, markup=False)


@device_app.command("show")
@cli_errors
def device_show(device_id: Annotated[str, typer.Argument(help="The board's hardware id.")]) -> None:
    """A board's state, timestamps and every certificate it was given."""
    with _ledger() as led:
        d = led.get_device(device_id)
        certs = led.certificates(device_id)
    _print_device(d)
    for c in certs:
        console.print(
            f"  cert      {c.serial} {c.state:<8} not-after {_ts(c.not_after)} "
            f"sha256 {c.fingerprint or '-'}" + (f" ({c.revoke_reason})" if c.revoke_reason else ""),
            highlight=False,
            markup=False,
        )


def _device_line(r: Mapping[str, Any]) -> str:
    failed = r["failure_code"] and r["state"] == "failed"
    return (
        f"{r['device_id']:<24} {r['batch']:<16} {r['state']:<10} {r['attempts']:>8} "
        f"{r['serial'] or '-'}" + (f" [{r['failure_code']}]" if failed else "")
    )


@device_app.command("list")
@cli_errors
def device_list(
    batch: Annotated[str | None, typer.Option("--batch", help="Only this batch.")] = None,
    state: Annotated[
        DeviceState | None, typer.Option("--state", help="Only boards in this state.")
    ] = None,
    fmt: Annotated[ListFormat, FORMAT_OPTION] = ListFormat.TABLE,
) -> None:
    """Boards, one a line, streamed in enrolment order."""
    with _ledger() as led:
        rows = (
            {
                "device_id": d.device_id,
                "batch": d.batch,
                "state": d.state,
                "attempts": d.attempts,
                "serial": d.serial,
                "failure_code": d.failure_code,
            }
            for d in led.list_devices(batch, state.value if state else None)
        )
        write_rows(
            rows,
            fmt,
            ["device_id", "batch", "state", "attempts", "serial", "failure_code"],
            _device_line,
            f"{'DEVICE':<24} {'BATCH':<16} {'STATE':<10} {'ATTEMPTS':>8} SERIAL",
        )


@cli_errors
def revoke_cmd(
    device_id: Annotated[str, typer.Argument(help="The board's hardware id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why, for the ledger and the audit.")],
) -> None:
    """Revoke a board's live certificate in the ledger and take it off the whitelist."""
    check_printable(reason, "a revocation reason")  # as the API does
    with _ledger() as led:
        d = led.revoke(device_id, reason)
        serial = [c.serial for c in led.certificates(device_id) if c.state == "revoked"][-1]
    console.print(f"revoked {serial} of {d.device_id}", highlight=False, markup=False)


# --------------------------------------------------------------- whitelist


def write_csv(entries: Iterator[WhitelistEntry], out: IO[str]) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["serial", "device_id", "batch", "fingerprint", "not_after"])
    n = 0
    for e in entries:
        writer.writerow([e.serial, e.device_id, e.batch, e.fingerprint, e.not_after.isoformat()])
        n += 1
    return n


def write_json(entries: Iterator[WhitelistEntry], out: IO[str]) -> int:
    """A JSON array written entry by entry: memory stays flat whatever the size."""
    n = 0
    out.write("[")
    for e in entries:
        out.write(",\n" if n else "\n")
        out.write(
            json.dumps(
                {
                    "serial": e.serial,
                    "device_id": e.device_id,
                    "batch": e.batch,
                    "fingerprint": e.fingerprint,
                    "not_after": e.not_after.isoformat(),
                }
            )
        )
        n += 1
    out.write("\n]\n" if n else "]\n")
    return n


@whitelist_app.command("export")
@cli_errors
def whitelist_export(
    batch: Annotated[str | None, typer.Option("--batch", help="Only this batch.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of stdout.")] = None,
) -> None:
    """Serial (lowercase hex), device id, batch, SHA-256 fingerprint, not-after; streamed."""
    writers = {"csv": write_csv, "json": write_json}
    if fmt not in writers:
        raise fail("bad-format", f"format {fmt!r} is not csv or json", 2)
    with _ledger() as led:
        entries = led.whitelist(batch)
        if out is None:
            n = writers[fmt](entries, sys.stdout)
            sys.stdout.flush()
        else:
            with out.open("w", encoding="utf-8", newline="") as fh:
                n = writers[fmt](entries, fh)
    if out is not None:
        err_console.print(f"exported {n} entries to {out}", highlight=False, markup=False)


# ------------------------------------------------------------------- audit


@audit_app.command("verify")
@cli_errors
def audit_verify(
    head: Annotated[
        str | None,
        typer.Option(
            "--head",
            metavar="SEQ:HASH",
            help="A head printed by an earlier verify: check that entry is still there "
            "(entries removed from the end of the chain leave no broken link).",
        ),
    ] = None,
) -> None:
    """Walk the audit chain; report the first broken link, if any, and the head to record."""
    expected: tuple[int, str] | None = None
    if head is not None:
        seq, _, digest = head.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise fail("usage", "--head takes SEQ:HASH as printed by `station audit verify`", 2)
        expected = (int(seq), digest.lower())
    with _ledger() as led:
        report = led.audit_report()
        anchored = led.audit_entry_hash(expected[0]) if expected is not None else None
    if report.broken is not None:
        raise fail("audit-broken", f"{report.broken} after {report.entries} good entries")
    if expected is not None and anchored != expected[1]:
        last = report.head[0] if report.head is not None else None
        raise fail(
            "audit-truncated",
            f"entry {expected[0]} of the recorded head is "
            + ("gone" if anchored is None else "another one")
            + f"; the chain now ends at entry {last}",
        )
    console.print(f"audit chain intact: {report.entries} entries", highlight=False)
    if report.head is not None:
        console.print(
            f"head: {report.head[0]}:{report.head[1]} (record it; `station audit verify "
            "--head` with it later shows no entry up to it was removed)",
            highlight=False,
        )


@cli_errors
def recover_cmd(
    all_stations: Annotated[
        bool,
        typer.Option(
            "--all-stations",
            help="Also intents recorded under other station ids: one that will not start "
            "again (a renamed host, a re-created container) leaves its boards refused "
            "issuance-in-progress until then.",
        ),
    ] = False,
    older_than: Annotated[
        float,
        typer.Option(
            "--older-than",
            min=0.0,
            help="Minutes: intents younger than this are left alone (a running station "
            "may be signing them).",
        ),
    ] = 10.0,
) -> None:
    """Resolve intents left without a certificate: sign again with the recorded serial, or
    mark failed. Every station process does this for its own at start-up."""
    from datetime import timedelta

    from station.ca import open_ca

    cfg = settings()
    ca = open_ca(cfg)
    with _ledger() as led:
        report = led.recover(
            ca, all_stations=all_stations, older_than=timedelta(minutes=older_than)
        )
    for serial in report.resigned:
        console.print(f"signed again and committed: serial {serial}", highlight=False)
    for serial, code in report.failed:
        console.print(f"marked failed: serial {serial} ({code})", highlight=False)
    console.print(f"recovered {len(report.resigned)}, failed {len(report.failed)}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(batch_app, name="batch")
    app.command("sign")(sign_cmd)
    app.add_typer(device_app, name="device")
    app.command("revoke")(revoke_cmd)
    app.command("recover")(recover_cmd)
    app.add_typer(whitelist_app, name="whitelist")
    app.add_typer(audit_app, name="audit")
