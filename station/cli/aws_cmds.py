"""`station aws ...`: register the CA with AWS IoT, publish the whitelist, package the Lambda.

Region, credentials and endpoint come from boto3's standard chain (AWS_DEFAULT_REGION,
or AWS_REGION which the station passes on; AWS_PROFILE, AWS_ENDPOINT_URL, instance
roles); see docs/aws.md. Every AWS failure is one line with a reason code
(aws-no-region, aws-no-credentials, aws-unreachable, aws-access-denied, aws-throttled).
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.markup import escape

from station import aws_iot
from station.ca import open_ca
from station.cli.common import EXIT_REFUSED, cli_errors, console, err_console, fail, settings
from station.errors import StationError
from station.ledger import Ledger
from station.publish import aws_sync, whitelist_sync
from station.publish.aws_state import RevokedInAws
from station.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")

aws_app = typer.Typer(
    help="AWS IoT: CA registration, whitelist table, JITR Lambda.", no_args_is_help=True
)


def _client(service: str) -> Any:
    return aws_iot.client(service)


def _aws(fn: Callable[P, R]) -> Callable[P, R]:
    """boto3's own exceptions (no region, no credentials, unreachable) as AwsErrors."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with aws_iot.aws_errors():
            return fn(*args, **kwargs)

    return wrapper


def _state_path(s: Settings) -> Path:
    return s.data_dir / "aws-ca-registration.json"


def _print_registration(reg: aws_iot.CaRegistration) -> None:
    console.print(f"  certificateId      {reg.certificate_id}", highlight=False)
    console.print(f"  certificateArn     {reg.certificate_arn}", highlight=False)
    console.print(f"  status             {reg.status}", highlight=False)
    console.print(f"  auto-registration  {reg.auto_registration}", highlight=False)


@aws_app.command("register-ca")
@cli_errors
@_aws
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
@_aws
def ca_status_cmd() -> None:
    """Show the CA's registration as AWS IoT reports it."""
    _print_registration(aws_iot.ca_status(_client("iot"), _state_path(settings())))


@aws_app.command("update-ca")
@cli_errors
@_aws
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
@_aws
def create_table_cmd() -> None:
    """Create the DynamoDB table the JITR Lambda reads (STATION_WHITELIST_TABLE)."""
    s = settings()
    created = aws_sync.create_whitelist_table(_client("dynamodb"), s.whitelist_table)
    console.print(f"{'created' if created else 'exists'}: table {s.whitelist_table}")


def _print_report(table: str, report: aws_sync.SyncReport, *, quiet: bool = False) -> None:
    if not quiet or report.changes or report.added or report.removed or report.updated:
        console.print(
            f"synced {table}: {report.added} added, {report.updated} updated, "
            f"{report.unchanged} unchanged, {report.removed} removed; "
            f"AWS IoT certificates: {report.revoked} revoked, {report.deactivated} deactivated, "
            f"{report.reactivated} reactivated; {len(report.skipped)} skipped",
            highlight=False,
        )
    for change in report.changes:
        console.print(
            f"  {change.serial}: {change.before} -> {change.after} ({change.why})",
            highlight=False,
            markup=False,
        )
    for skipped in report.skipped:
        err_console.print(
            f"skipped serial {escape(skipped.serial)} (device {escape(skipped.device_id)}): "
            f"{escape(skipped.reason)}",
            highlight=False,
        )
    for warning in report.warnings:
        err_console.print(
            f"[bold yellow]warning[/] {escape(f'[{warning.code}]')} {escape(warning.message)}",
            highlight=False,
        )


@aws_app.command("sync-whitelist")
@cli_errors
@_aws
def sync_whitelist_cmd(
    batch: Annotated[str | None, typer.Option(help="Only this batch's devices.")] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Sync again every --interval seconds until stopped.")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.5, max=3600, help="Seconds between syncs with --watch.")
    ] = 5.0,
) -> None:
    """Publish the ledger's whitelist to DynamoDB and make AWS IoT follow the ledger.

    Adds new and updates changed entries; removes revoked and failed boards' entries
    after setting their certificates REVOKED or INACTIVE; sets REVOKED every certificate
    the ledger revoked; activates (policy, thing, ACTIVE) whitelisted certificates AWS
    IoT holds INACTIVE or PENDING_ACTIVATION. Prints each status change. Exits 1 if an
    entry could not be published (the others are). With --watch it never exits on its
    own: each failed round prints one error line and the next round retries.
    """
    s = settings()
    if watch:
        if batch is not None:
            raise StationError(
                "--watch syncs the whole whitelist; drop --batch", code="bad-argument"
            )
        _watch(s, interval)
        return
    with Ledger.from_settings(s) as ledger:
        report = aws_sync.sync_whitelist(
            _client("dynamodb"),
            s.whitelist_table,
            ledger.whitelist(batch),
            ledger.delisted_serials(),
            iot=_client("iot"),
            batch=batch,
            revoked=RevokedInAws(ledger.engine),
            policy=aws_sync.DevicePolicy(s.aws_policy_name, s.aws_topic_prefix),
        )
    _print_report(s.whitelist_table, report)
    if report.skipped:
        raise fail(
            "whitelist-entry-invalid",
            f"{len(report.skipped)} entr{'y' if len(report.skipped) == 1 else 'ies'} "
            "not published (see above); the rest were synced",
            EXIT_REFUSED,
        )


def _watch(s: Settings, interval: float) -> None:
    def on_round(report: aws_sync.SyncReport | None, error: StationError | None) -> None:
        if error is not None:
            err_console.print(
                f"[bold red]error[/] {escape(f'[{error.code}]')} {escape(error.message)}",
                highlight=False,
            )
        elif report is not None:
            _print_report(s.whitelist_table, report, quiet=True)

    loop = whitelist_sync.SyncLoop(s, interval, on_round=on_round)
    previous = signal.signal(signal.SIGTERM, lambda *_: loop.stop.set())
    console.print(
        f"syncing {s.whitelist_table} every {interval:g} s (Ctrl-C stops)", highlight=False
    )
    try:
        with Ledger.from_settings(s) as ledger:
            loop.run(ledger)
    except KeyboardInterrupt:
        loop.stop.set()
    finally:
        signal.signal(signal.SIGTERM, previous)


@aws_app.command("package-lambda")
@cli_errors
@_aws
def package_lambda_cmd(
    out: Annotated[Path, typer.Option("--out", help="Where to write the zip.")] = Path("jitr.zip"),
) -> None:
    """Build the deployable zip of the JITR Lambda (jitr/)."""
    path = aws_iot.package_lambda(out)
    console.print(f"wrote {path} ({path.stat().st_size} bytes)")


def register(app: typer.Typer) -> None:
    app.add_typer(aws_app, name="aws")
