"""`station aws ...`: register the CA with AWS IoT, publish the whitelist, package the Lambda.

Region, credentials and endpoint come from boto3's standard chain (AWS_REGION,
AWS_PROFILE, AWS_ENDPOINT_URL, instance roles); see docs/aws.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from station import aws_iot
from station.ca import open_ca
from station.cli.common import EXIT_REFUSED, cli_errors, console, err_console, fail, settings
from station.ledger import Ledger
from station.settings import Settings

aws_app = typer.Typer(
    help="AWS IoT: CA registration, whitelist table, JITR Lambda.", no_args_is_help=True
)


def _client(service: str) -> Any:
    import boto3

    return boto3.client(service)


def _state_path(s: Settings) -> Path:
    return s.data_dir / "aws-ca-registration.json"


def _print_registration(reg: aws_iot.CaRegistration) -> None:
    console.print(f"  certificateId      {reg.certificate_id}", highlight=False)
    console.print(f"  certificateArn     {reg.certificate_arn}", highlight=False)
    console.print(f"  status             {reg.status}", highlight=False)
    console.print(f"  auto-registration  {reg.auto_registration}", highlight=False)


@aws_app.command("register-ca")
@cli_errors
def register_ca_cmd(
    activate: Annotated[
        bool, typer.Option("--activate/--no-activate", help="Register the CA as ACTIVE.")
    ] = True,
    auto_registration: Annotated[
        bool,
        typer.Option(
            "--auto-registration/--no-auto-registration",
            help="Let AWS IoT auto-register device certificates (JITR).",
        ),
    ] = True,
) -> None:
    """Register the station's CA with AWS IoT (registration code, verification certificate)."""
    s = settings()
    ca = open_ca(s)
    reg = aws_iot.register_ca(
        _client("iot"),
        ca.certificate,
        ca.issue_verification_certificate,
        _state_path(s),
        activate=activate,
        auto_registration=auto_registration,
    )
    if reg.already_registered:
        console.print("[bold]already registered[/]: this CA is known to AWS IoT")
    else:
        console.print("[bold]registered[/] the CA with AWS IoT")
    _print_registration(reg)


@aws_app.command("ca-status")
@cli_errors
def ca_status_cmd() -> None:
    """Show the CA's registration as AWS IoT reports it."""
    _print_registration(aws_iot.ca_status(_client("iot"), _state_path(settings())))


@aws_app.command("update-ca")
@cli_errors
def update_ca_cmd(
    status: Annotated[str | None, typer.Option(help="ACTIVE or INACTIVE.")] = None,
    auto_registration: Annotated[
        str | None, typer.Option("--auto-registration", help="ENABLE or DISABLE.")
    ] = None,
) -> None:
    """Activate or deactivate the CA, or switch auto-registration."""
    reg = aws_iot.update_ca(_client("iot"), _state_path(settings()), status, auto_registration)
    _print_registration(reg)


@aws_app.command("create-whitelist-table")
@cli_errors
def create_table_cmd() -> None:
    """Create the DynamoDB table the JITR Lambda reads (STATION_WHITELIST_TABLE)."""
    s = settings()
    created = aws_iot.create_whitelist_table(_client("dynamodb"), s.whitelist_table)
    console.print(f"{'created' if created else 'exists'}: table {s.whitelist_table}")


@aws_app.command("sync-whitelist")
@cli_errors
def sync_whitelist_cmd(
    batch: Annotated[str | None, typer.Option(help="Only this batch's devices.")] = None,
) -> None:
    """Publish the ledger's whitelist to DynamoDB and stop delisted certificates in AWS IoT.

    Adds new and updates changed entries; removes revoked boards' and failed boards'
    entries after setting their AWS IoT certificates REVOKED or INACTIVE; re-activates
    a certificate an earlier sync made INACTIVE when its board is whitelisted again.
    Exits 1 if any entry could not be published (the others are).
    """
    s = settings()
    with Ledger.from_settings(s) as ledger:
        report = aws_iot.sync_whitelist(
            _client("dynamodb"),
            s.whitelist_table,
            ledger.whitelist(batch),
            ledger.delisted_serials(),
            iot=_client("iot"),
            batch=batch,
        )
    console.print(
        f"synced {s.whitelist_table}: {report.added} added, {report.updated} updated, "
        f"{report.unchanged} unchanged, {report.removed} removed; "
        f"AWS IoT certificates: {report.revoked} revoked, {report.deactivated} deactivated, "
        f"{report.reactivated} reactivated; {len(report.skipped)} skipped",
        highlight=False,
    )
    for skipped in report.skipped:
        err_console.print(
            f"skipped serial {escape(skipped.serial)} (device {escape(skipped.device_id)}): "
            f"{escape(skipped.reason)}",
            highlight=False,
        )
    if report.skipped:
        raise fail(
            "whitelist-entry-invalid",
            f"{len(report.skipped)} entr{'y' if len(report.skipped) == 1 else 'ies'} "
            "not published (see above); the rest were synced",
            EXIT_REFUSED,
        )


@aws_app.command("package-lambda")
@cli_errors
def package_lambda_cmd(
    out: Annotated[Path, typer.Option("--out", help="Where to write the zip.")] = Path("jitr.zip"),
) -> None:
    """Build the deployable zip of the JITR Lambda (jitr/)."""
    path = aws_iot.package_lambda(out)
    console.print(f"wrote {path} ({path.stat().st_size} bytes)")


def register(app: typer.Typer) -> None:
    app.add_typer(aws_app, name="aws")
