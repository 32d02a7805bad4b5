"""The operator's live view: one row per port, counts, recent failures (rich)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from station.line.driver import BoardRecord
from station.line.status import LineStatus

log = logging.getLogger(__name__)

_STEP_STYLE = {
    "verified": "green",
    "failed": "bold red",
    "skipped": "yellow",
    "waiting": "dim",
    "port-error": "bold red",
}


def _age(iso: str) -> str:
    seconds = (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()
    return f"{seconds:.0f}s"


def _plain(value: object, limit: int | None = None) -> Text:
    """Board-supplied text (hardware id, error message) as plain text: never rich markup,
    so a board answering ``[/]`` cannot break the view."""
    text = "" if value is None else str(value)
    if limit is not None:
        text = text[:limit]
    return Text(text)


def render(status: LineStatus) -> RenderableType:
    """The view of the line. Every text that came from a board (ids, error messages,
    reason codes) is a plain ``Text``: only the station's own labels are markup."""
    snap = status.snapshot()
    ports = Table(title=f"Line - batch {escape(str(snap['batch']))}", expand=False)
    for column in ("port", "board", "step", "for", "noise", "last error"):
        ports.add_column(column)
    for row in snap["ports"]:
        step = row["step"]
        style = _STEP_STYLE.get(step, "cyan")
        bad, fixed = row.get("bad_frames", 0), row.get("corrected", 0)
        noise = f"{bad} bad, {row.get('resends', 0)} resent" if bad else ""
        if fixed:
            noise = f"{noise}, {fixed} corrected" if noise else f"{fixed} corrected"
        ports.add_row(
            _plain(row["port"]),
            _plain(row["device_id"] or "-"),
            Text(str(step), style=style),
            _age(row["since"]),
            Text(noise or "-", style="yellow"),
            _plain(row["last_error"] or "", 200),
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
            failures.add_row(
                f["at"][11:19], _plain(f["device_id"]), _plain(f["code"]), _plain(f["message"], 80)
            )
        parts.append(failures)
    return Group(*parts)


class _SafeView:
    """``render`` that never raises: a failure is logged (at most every 30 s) and the
    view shows a one-line notice instead; the line goes on (the view is not the line)."""

    def __init__(self, status: LineStatus) -> None:
        self.status = status
        self.failures = 0
        self._logged = 0.0

    def __call__(self) -> RenderableType:
        try:
            return render(self.status)
        except Exception as exc:
            self.failures += 1
            now = time.monotonic()
            if now - self._logged >= 30.0:
                self._logged = now
                log.exception("the line view could not be drawn (the line goes on)")
            return Text(f"the view could not be drawn: {type(exc).__name__}", style="red")


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
    draw = _SafeView(driver.status)
    with Live(draw(), console=console, refresh_per_second=4) as view:
        return driver.run(until=until, timeout=timeout, tick=lambda: view.update(draw()))
