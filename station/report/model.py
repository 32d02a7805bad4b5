"""What a batch report says: facts read from the ledger, read-only and streamed.

The device rows come from one streamed query (``yield_per``) over the ledger's
tables, so a 100,000-board batch is read in constant memory. The summary is one
more streamed pass; it keeps only counters, a few example ids per failure code,
per-minute buckets and one float per finished board (for the percentiles).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from sqlalchemy import func, select

from station.ledger import Batch, Ledger
from station.ledger.records import utc
from station.ledger.schema import CertState, DeviceState, batches, certificates, devices
from station.policy import format_subject
from station.timefmt import rfc3339

#: Example device ids kept per failure code.
EXAMPLES_PER_CODE = 5

#: The steps of one board through the line, as (key, start stamp, end stamp); the
#: timestamps are those of the board's last attempt.
STEPS: tuple[tuple[str, str, str], ...] = (
    ("enrol_to_key_ready", "created_at", "key_ready_at"),
    ("key_ready_to_issued", "key_ready_at", "issued_at"),
    ("issued_to_installed", "issued_at", "installed_at"),
    ("installed_to_verified", "installed_at", "verified_at"),
)

STEP_LABELS = {
    "enrol_to_key_ready": "enrol → key ready",
    "key_ready_to_issued": "key ready → issued (CSR, HSM signature)",
    "issued_to_installed": "issued → installed (chain on the board)",
    "installed_to_verified": "installed → verified (proof of possession)",
}

IN_PROGRESS = (
    DeviceState.NEW.value,
    DeviceState.KEY_READY.value,
    DeviceState.ISSUED.value,
    DeviceState.INSTALLED.value,
)


def iso(value: datetime | None) -> str | None:
    return None if value is None else rfc3339(value)


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """One board in the report's device table."""

    device_id: str
    state: str
    serial: str | None  # the board's latest issued or revoked certificate, lowercase hex
    fingerprint: str | None  # SHA-256 of the certificate DER (= AWS IoT certificateId)
    not_after: datetime | None
    cert_state: str | None
    attempts: int
    failure_code: str | None
    failure_message: str | None
    created_at: datetime
    key_ready_at: datetime | None
    issued_at: datetime | None
    installed_at: datetime | None
    verified_at: datetime | None
    failed_at: datetime | None
    revoked_at: datetime | None

    @property
    def cycle_seconds(self) -> float | None:
        """Enrolment to verification, for boards that were verified."""
        if self.verified_at is None:
            return None
        return max(0.0, (self.verified_at - self.created_at).total_seconds())

    def step_seconds(self, start: str, end: str) -> float | None:
        a, b = getattr(self, start), getattr(self, end)
        if a is None or b is None or b < a:
            return None
        return float((b - a).total_seconds())


@dataclass(frozen=True, slots=True)
class CaFacts:
    subject: str
    fingerprint: str  # SHA-256 of the CA certificate DER, lowercase hex

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> CaFacts:
        return cls(format_subject(cert.subject), cert.fingerprint(hashes.SHA256()).hex())

    @classmethod
    def from_file(cls, path: Path) -> CaFacts | None:
        """The CA facts from ``ca.pem`` (no HSM needed to report); None without one."""
        if not path.exists():
            return None
        return cls.from_certificate(x509.load_pem_x509_certificates(path.read_bytes())[0])


@dataclass(frozen=True, slots=True)
class Stats:
    count: int
    median: float | None
    p90: float | None
    max: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "median_s": _round(self.median),
            "p90_s": _round(self.p90),
            "max_s": _round(self.max),
        }


@dataclass(frozen=True, slots=True)
class FailureGroup:
    code: str
    count: int
    examples: tuple[str, ...]
    example_message: str | None


@dataclass(frozen=True)
class Summary:
    planned: int
    enrolled: int
    states: dict[str, int]
    failures: tuple[FailureGroup, ...]
    failed_attempts: int  # every recorded failure (attempts), including those later retried
    boards_retried: int  # boards with at least one recorded failure
    recovered: int  # boards that failed at least once and were verified afterwards
    first_pass: int  # boards verified without a recorded failure
    cycle: Stats
    steps: dict[str, Stats]
    cycle_seconds: array[float]  # every verified board's cycle time (histogram)
    per_minute: dict[int, int]  # minute since the batch opened -> boards verified
    first_verified: datetime | None
    last_verified: datetime | None
    first_enrolled: datetime | None = None
    verified_epochs: array[float] = field(default_factory=lambda: array("d"))  # POSIX seconds

    @property
    def line_seconds(self) -> float | None:
        """Line time: from the first enrolment to the last verification."""
        if self.first_enrolled is None or self.last_verified is None:
            return None
        return max(0.0, (self.last_verified - self.first_enrolled).total_seconds())

    @property
    def boards_per_hour(self) -> float | None:
        """Verified boards per hour of line time (not per the instants between verifications)."""
        line = self.line_seconds
        return round(len(self.verified_epochs) * 3600.0 / line, 1) if line else None

    @property
    def ports_busy_mean(self) -> float | None:
        """Boards on the line at once, on average: the sum of cycle times over line time."""
        line = self.line_seconds
        return round(sum(self.cycle_seconds) / line, 2) if line else None

    def verified_offsets(self) -> array[float]:
        """Seconds from the first enrolment to each verification (the throughput chart)."""
        if self.first_enrolled is None:
            return array("d")
        t0 = self.first_enrolled.timestamp()
        return array("d", (t - t0 for t in self.verified_epochs))

    @property
    def verified(self) -> int:
        return self.states.get(DeviceState.VERIFIED.value, 0)

    @property
    def failed(self) -> int:
        return self.states.get(DeviceState.FAILED.value, 0)

    @property
    def revoked(self) -> int:
        return self.states.get(DeviceState.REVOKED.value, 0)

    @property
    def in_progress(self) -> int:
        return sum(self.states.get(s, 0) for s in IN_PROGRESS)

    @property
    def yield_pct(self) -> float | None:
        """Verified boards over enrolled boards, in percent."""
        return round(100.0 * self.verified / self.enrolled, 2) if self.enrolled else None

    @property
    def first_pass_yield_pct(self) -> float | None:
        return round(100.0 * self.first_pass / self.enrolled, 2) if self.enrolled else None

    @property
    def verified_total(self) -> int:
        return sum(self.per_minute.values())


@dataclass(frozen=True)
class BatchReport:
    """The facts of a report; the device table is streamed separately by :func:`iter_devices`."""

    batch: Batch
    ca: CaFacts | None
    summary: Summary
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: device id -> its shipping label's file name (``labels.csv`` of ``station label``);
    #: None: the HTML and PDF device tables have no label column.
    labels: dict[str, str] | None = None

    def batch_facts(self) -> dict[str, Any]:
        b = self.batch
        return {
            "name": b.name,
            "product": b.product,
            "key_mode": b.key_mode,
            "profile": {"subject_template": b.subject_template, "days": b.days},
            "station_id": b.station_id,
            "operator": b.operator,
            "state": b.state,
            "opened_at": iso(b.created_at),
            "closed_at": iso(b.closed_at),
        }

    def ca_facts(self) -> dict[str, Any] | None:
        if self.ca is None:
            return None
        return {"subject": self.ca.subject, "fingerprint": self.ca.fingerprint}

    def summary_facts(self) -> dict[str, Any]:
        s = self.summary
        return {
            "planned": s.planned,
            "enrolled": s.enrolled,
            "verified": s.verified,
            "failed": s.failed,
            "revoked": s.revoked,
            "in_progress": s.in_progress,
            "states": dict(sorted(s.states.items())),
            "yield_pct": s.yield_pct,
            "first_pass_yield_pct": s.first_pass_yield_pct,
            "retries": {
                "failed_attempts": s.failed_attempts,
                "boards_retried": s.boards_retried,
                "recovered": s.recovered,
                "first_pass": s.first_pass,
            },
            "failures": [
                {
                    "code": g.code,
                    "count": g.count,
                    "examples": list(g.examples),
                    "example_message": g.example_message,
                }
                for g in s.failures
            ],
            "cycle_time": s.cycle.as_dict(),
            "steps": {name: st.as_dict() for name, st in s.steps.items()},
            "throughput": {
                "boards_per_hour": s.boards_per_hour,
                "line_time_s": _round(s.line_seconds),
                "cycle_time_per_port_s": _round(s.cycle.median),
                "ports_busy_mean": s.ports_busy_mean,
                "first_enrolled_at": iso(s.first_enrolled),
                "first_verified_at": iso(s.first_verified),
                "last_verified_at": iso(s.last_verified),
                "verified_per_minute": [
                    {"minute": m, "verified": n} for m, n in sorted(s.per_minute.items())
                ],
            },
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def percentile(sorted_values: array[float] | list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def stats(values: array[float]) -> Stats:
    ordered = array("d", sorted(values))
    if not ordered:
        return Stats(0, None, None, None)
    n = len(ordered)
    mid = n // 2
    median = ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0
    return Stats(n, median, percentile(ordered, 90), ordered[-1])


def _device_stmt(batch_id: int) -> Any:
    in_batch = select(devices.c.id).where(devices.c.batch_id == batch_id)
    # The board's latest certificate that was ever released (issued or revoked).
    latest = (
        select(certificates.c.device_pk, func.max(certificates.c.id).label("cid"))
        .where(
            certificates.c.device_pk.in_(in_batch),
            certificates.c.state.in_((CertState.ISSUED.value, CertState.REVOKED.value)),
        )
        .group_by(certificates.c.device_pk)
        .subquery()
    )
    return (
        select(
            devices.c.device_id,
            devices.c.state,
            certificates.c.serial,
            certificates.c.fingerprint,
            certificates.c.not_after,
            certificates.c.state.label("cert_state"),
            devices.c.attempts,
            devices.c.failure_code,
            devices.c.failure_message,
            devices.c.created_at,
            devices.c.key_ready_at,
            devices.c.issued_at,
            devices.c.installed_at,
            devices.c.verified_at,
            devices.c.failed_at,
            devices.c.revoked_at,
        )
        .select_from(
            devices.outerjoin(latest, latest.c.device_pk == devices.c.id).outerjoin(
                certificates, certificates.c.id == latest.c.cid
            )
        )
        .where(devices.c.batch_id == batch_id)
        .order_by(devices.c.id)
    )


def _batch_id(ledger: Ledger, name: str) -> int:
    ledger.get_batch(name)  # unknown-batch, with the ledger's own error
    with ledger.engine.connect() as conn:
        return int(conn.execute(select(batches.c.id).where(batches.c.name == name)).scalar_one())


def iter_devices(ledger: Ledger, batch: str, *, chunk: int = 1000) -> Iterator[DeviceRow]:
    """The batch's boards in enrolment order, streamed from the database (constant memory)."""
    stmt = _device_stmt(_batch_id(ledger, batch))

    def rows() -> Iterator[DeviceRow]:
        with ledger.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=chunk).execute(stmt)
            try:
                for r in result:
                    yield DeviceRow(
                        device_id=r.device_id,
                        state=r.state,
                        serial=r.serial,
                        fingerprint=r.fingerprint,
                        not_after=utc(r.not_after),
                        cert_state=r.cert_state,
                        attempts=r.attempts,
                        failure_code=r.failure_code,
                        failure_message=r.failure_message,
                        created_at=utc(r.created_at) or datetime.now(UTC),
                        key_ready_at=utc(r.key_ready_at),
                        issued_at=utc(r.issued_at),
                        installed_at=utc(r.installed_at),
                        verified_at=utc(r.verified_at),
                        failed_at=utc(r.failed_at),
                        revoked_at=utc(r.revoked_at),
                    )
            finally:
                result.close()

    return rows()


def summarize(batch: Batch, rows: Iterator[DeviceRow]) -> Summary:
    states: dict[str, int] = {}
    groups: dict[str, list[Any]] = {}  # code -> [count, examples, first message]
    failed_attempts = retried = recovered = first_pass = 0
    cycles: array[float] = array("d")
    step_values: dict[str, array[float]] = {name: array("d") for name, _, _ in STEPS}
    per_minute: dict[int, int] = {}
    first: datetime | None = None
    last: datetime | None = None
    first_enrolled: datetime | None = None
    verified_epochs: array[float] = array("d")
    enrolled = 0
    for row in rows:
        enrolled += 1
        if first_enrolled is None or row.created_at < first_enrolled:
            first_enrolled = row.created_at
        states[row.state] = states.get(row.state, 0) + 1
        failed_attempts += row.attempts
        if row.attempts:
            retried += 1
        if row.state == DeviceState.FAILED.value:
            code = row.failure_code or "unknown"
            g = groups.setdefault(code, [0, [], row.failure_message])
            g[0] += 1
            if len(g[1]) < EXAMPLES_PER_CODE:
                g[1].append(row.device_id)
        if row.verified_at is not None:
            if row.attempts:
                recovered += 1
            else:
                first_pass += 1
            cycle = row.cycle_seconds
            if cycle is not None:
                cycles.append(cycle)
            for name, start, end in STEPS:
                value = row.step_seconds(start, end)
                if value is not None:
                    step_values[name].append(value)
            minute = int((row.verified_at - batch.created_at).total_seconds() // 60)
            per_minute[minute] = per_minute.get(minute, 0) + 1
            verified_epochs.append(row.verified_at.timestamp())
            first = row.verified_at if first is None else min(first, row.verified_at)
            last = row.verified_at if last is None else max(last, row.verified_at)
    failures = tuple(
        FailureGroup(code, g[0], tuple(g[1]), g[2])
        for code, g in sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))
    )
    return Summary(
        planned=batch.planned_count,
        enrolled=enrolled,
        states=states,
        failures=failures,
        failed_attempts=failed_attempts,
        boards_retried=retried,
        recovered=recovered,
        first_pass=first_pass,
        cycle=stats(cycles),
        steps={name: stats(values) for name, values in step_values.items()},
        cycle_seconds=cycles,
        per_minute=per_minute,
        first_verified=first,
        last_verified=last,
        first_enrolled=first_enrolled,
        verified_epochs=verified_epochs,
    )


def build_report(ledger: Ledger, batch: str, ca: CaFacts | None) -> BatchReport:
    """Read the batch and summarise it (one streamed pass over its boards)."""
    b = ledger.get_batch(batch)
    return BatchReport(b, ca, summarize(b, iter_devices(ledger, batch)))
