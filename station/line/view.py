"""The operator's live view: one row per port, counts, recent failures (rich)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table

from station.line.driver import BoardRecord
from station.line.status import LineStatus

_STEP_STYLE = {"verified": "green", "failed": "bold red", "skipped": "yellow", "waiting": "dim"}


def _age(iso: str) -> str:
    seconds = (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()
    return f"{seconds:.0f}s"


def render(status: LineStatus) -> RenderableType:
    snap = status.snapshot()
    ports = Table(title=f"Line - batch {snap['batch']}", expand=False)
    for column in ("port", "board", "step", "for", "last error"):
        ports.add_column(column)
    for row in snap["ports"]:
        step = row["step"]
        style = _STEP_STYLE.get(step, "cyan")
        ports.add_row(
            row["port"],
            row["device_id"] or "-",
            f"[{style}]{step}[/]",
            _age(row["since"]),
            row["last_error"] or "",
        )
    counts = snap["counts"]
    summary = (
        f"[green]verified {counts['verified']}[/]   [red]failed {counts['failed']}[/]   "
        f"[yellow]skipped {counts['skipped']}[/]   in progress {counts['in_progress']}   "
        f"{snap['issued_per_min']:.1f} issued/min"
    )
    parts: list[RenderableType] = [ports, summary]
    if snap["recent_failures"]:
        failures = Table(title="Recent failures")
        for column in ("at", "board", "reason", "message"):
            failures.add_column(column)
        for f in snap["recent_failures"][:10]:
            failures.add_row(f["at"][11:19], f["device_id"], f["code"], f["message"][:80])
        parts.append(failures)
    return Group(*parts)


class LineRunner(Protocol):
    """What the view drives: a LineDriver (one process) or a ProcessLine (several)."""

    status: LineStatus

    def run(
        self,
        *,
        until: Any = None,
        timeout: float | None = None,
        tick: Callable[[], None] | None = None,
    ) -> list[BoardRecord]: ...


def run_with_view(
    driver: LineRunner,
    console: Console,
    *,
    live: bool,
    until: Callable[[Any], bool] | None = None,
    timeout: float | None = None,
) -> list[BoardRecord]:
    """Run the driver, redrawing the view four times a second when ``live``."""
    if not live:
        return driver.run(until=until, timeout=timeout)
    with Live(render(driver.status), console=console, refresh_per_second=4) as view:
        return driver.run(
            until=until, timeout=timeout, tick=lambda: view.update(render(driver.status))
        )
