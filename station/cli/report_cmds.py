"""`station report BATCH` (QA report, signed manifest) and `station report verify`."""

from __future__ import annotations

import csv
import dataclasses
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from station.ca import open_ca
from station.cli.common import cli_errors, console, err_console, fail, settings
from station.files import atomic_writer
from station.ledger import Ledger
from station.report import (
    VERIFY_COMMANDS,
    CaFacts,
    Format,
    build_report,
    verify_manifest,
    write_report,
    write_signed_manifest,
)

_VERIFY_HELP = (
    "Check the signed manifest with OpenSSL alone (in the output directory):\n\n"
    + "\n\n".join(f"    {line}" for line in VERIFY_COMMANDS.splitlines())
)


class _ReportGroup(TyperGroup):
    """`station report BATCH ...` runs the `batch` command; `station report verify` verifies."""

    # ctx is typer's vendored click Context (a private module), hence Any.
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["batch", *args]
        return super().parse_args(ctx, args)


report_app = typer.Typer(
    cls=_ReportGroup,
    no_args_is_help=True,
    help="QA report of a production batch, and its signed manifest.\n\n"
    "    station report BATCH [--format html|pdf|csv|json] [--out FILE]\n\n"
    "    station report BATCH --manifest [--out-dir DIR]\n\n"
    "    station report verify MANIFEST SIGNATURE [--ca ca.pem]\n\n" + _VERIFY_HELP,
)


def _labels(directory: Path) -> dict[str, str]:
    """device id -> label file, from the directory's labels.csv (station/labels.py)."""
    try:
        with (directory / "labels.csv").open(newline="") as fh:
            return {row["device_id"]: row["png"] for row in csv.DictReader(fh)}
    except (OSError, KeyError) as exc:
        raise fail("bad-labels", f"no readable labels.csv in {directory}: {exc}") from None


def _safe_dir_name(batch: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", batch) or "batch"


@report_app.command(
    "batch",
    help="Report on BATCH: summary, charts, failures, cycle times and the device table "
    "(html, pdf for people; csv, json for machines). With --manifest, write the signed "
    "manifest instead: manifest.json, manifest.sig (DER signature over its SHA-256, made "
    "by the CA key in the HSM), ca.pem and ca.pub.pem.\n\n" + _VERIFY_HELP,
)
@cli_errors
def report_batch(
    batch: Annotated[str, typer.Argument(help="The batch name.")],
    fmt: Annotated[
        Format | None,
        typer.Option("--format", "-f", help="Default: from --out's suffix, else html."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here instead of stdout.")
    ] = None,
    manifest: Annotated[
        bool, typer.Option("--manifest", help="Write the signed manifest (needs the HSM).")
    ] = False,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Manifest directory (default ./BATCH-manifest)."),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="A directory of shipping labels (station label, line run --labels): "
            "html and pdf list each board's label file.",
        ),
    ] = None,
) -> None:
    cfg = settings()
    with Ledger.from_settings(cfg) as ledger:
        if manifest:
            ca = open_ca(cfg)
            target = out_dir or Path(f"{_safe_dir_name(batch)}-manifest")
            files = write_signed_manifest(ledger, batch, ca, target)
            console.print(
                f"wrote {files.manifest} ({files.devices} devices, sha256 {files.sha256}), "
                f"{files.signature}, {files.ca_pem}, {files.ca_pub}",
                highlight=False,
                markup=False,
            )
            return
        if fmt is None:
            suffix = out.suffix.lstrip(".").lower() if out is not None else ""
            fmt = Format(suffix) if suffix in {f.value for f in Format} else Format.HTML
        if out is None and fmt is Format.PDF and sys.stdout.isatty():
            raise fail("bad-argument", "a PDF does not go to a terminal: pass --out FILE", 2)
        report = build_report(ledger, batch, CaFacts.from_file(cfg.ca_cert_path))
        if labels is not None:
            report = dataclasses.replace(report, labels=_labels(labels))
        if out is None:
            write_report(ledger, report, fmt, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        with atomic_writer(out) as fh:
            write_report(ledger, report, fmt, fh)
    err_console.print(
        f"wrote the {fmt.value} report of {batch} ({report.summary.enrolled} boards) to {out}",
        highlight=False,
        markup=False,
    )


@report_app.command("verify", help="Check a manifest and its signature against the CA "
                    "certificate; any edit of the manifest fails.\n\n" + _VERIFY_HELP)  # fmt: skip
@cli_errors
def report_verify(
    manifest: Annotated[Path, typer.Argument(help="manifest.json")],
    signature: Annotated[Path, typer.Argument(help="manifest.sig (DER)")],
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca",
            help="CA certificate (default: the station's ca.pem, else the one beside the "
            "manifest).",
        ),
    ] = None,
) -> None:
    ca_pem = ca
    if ca_pem is None:
        station_ca = settings().ca_cert_path
        ca_pem = station_ca if station_ca.exists() else manifest.parent / "ca.pem"
        if ca_pem != station_ca:
            err_console.print(
                f"note: no station CA here; trusting {ca_pem} (pass --ca to pin one)",
                highlight=False,
                markup=False,
            )
    check = verify_manifest(manifest, signature, ca_pem)
    console.print(
        f"manifest OK: batch {check.batch}, {check.devices} devices, "
        f"signed by CA {check.ca_fingerprint}",
        highlight=False,
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(report_app, name="report")
