"""Prometheus metrics: one scrape of any worker tells the truth for every worker and the line.

Two sources:

- **The ledger**, read at scrape time by collectors (``station.ledger.tallies``):
  certificates issued and revoked per batch by every channel (the serial line,
  HTTP, ``station sign``), boards per batch and state, failed boards by reason,
  failed attempts, step durations of verified boards; and **the line's status
  file**: ports per step, ports with a board, the line's age. These are the same
  from every worker and count what the line did.
- **This service's own requests** (HTTP certificate requests by outcome, refusals
  by reason, latencies, HSM signature times). Under ``station serve --workers
  N`` these use prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
  set by ``station serve`` before the workers start): each worker writes its
  values to a file there and a scrape of any worker sums them all. Without it
  (tests, one app in a process) they live in the app's own registry.

Batch names and board counts are for reader roles (as /v1/batches is): the
per-batch ledger metrics are in ``private_registry``, added to a scrape that
carries a reader token; the public scrape has the line, step times and the
service's own requests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from station.ca import CertificateAuthority
from station.ledger.tallies import Tallies
from station.publish.whitelist_sync import SyncStatus

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# The line writes its status file at most every 0.5 s while it runs; older than
# this, the line is taken as stopped.
LINE_STALE_SECONDS = 10.0


def multiprocess_dir() -> str | None:
    """The multiprocess directory, when this process's metric values live there."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path and values.ValueClass is not values.MutexValue:
        return path
    return None


class _StepsCollector(Collector):
    """Step times of verified boards: no batch names, so in the public scrape."""

    def __init__(self, tallies: Callable[[], Tallies]) -> None:
        self._tallies = tallies

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            t = self._tallies()
        except Exception:
            return
        steps = HistogramMetricFamily(
            "station_board_step_seconds",
            "Time of each step of verified boards (cycle: first enrolment to verification)",
            labels=["step"],
        )
        for step, h in t.steps.items():
            buckets = [(repr(le), n) for le, n in h.buckets] + [("+Inf", h.count)]
            steps.add_metric([step], buckets, h.total)
        yield steps


class _LedgerCollector(Collector):
    """Per-batch facts of the ledger: for reader roles only."""

    def __init__(
        self,
        counts: Callable[[], dict[str, dict[str, int]]],
        tallies: Callable[[], Tallies],
    ) -> None:
        self._counts = counts
        self._tallies = tallies

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("station_ledger_up", "1 when the ledger answered this scrape")
        try:
            counts = self._counts()
            t = self._tallies()
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        boards = GaugeMetricFamily(
            "station_boards", "Boards in the ledger per batch and state", labels=["batch", "state"]
        )
        for batch, states in sorted(counts.items()):
            for state, n in sorted(states.items()):
                boards.add_metric([batch, state], n)
        yield boards
        issued = CounterMetricFamily(
            "station_certificates_issued",
            "Certificates issued per batch by every channel (line, HTTP, CLI), from the ledger",
            labels=["batch"],
        )
        for batch, n in sorted(t.issued.items()):
            issued.add_metric([batch], n)
        yield issued
        revoked = GaugeMetricFamily(
            "station_certificates_revoked", "Revoked certificates per batch", labels=["batch"]
        )
        for batch, n in sorted(t.revoked.items()):
            revoked.add_metric([batch], n)
        yield revoked
        failed = GaugeMetricFamily(
            "station_boards_failed",
            "Boards now failed, per batch and reason code",
            labels=["batch", "reason"],
        )
        for (batch, reason), n in sorted(t.failed_by_reason.items()):
            failed.add_metric([batch, reason], n)
        yield failed
        attempts = CounterMetricFamily(
            "station_board_failed_attempts",
            "Failed attempts recorded on boards (retries included), per batch",
            labels=["batch"],
        )
        for batch, n in sorted(t.failed_attempts.items()):
            attempts.add_metric([batch], n)
        yield attempts


class _LineCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        line = self._snapshot()
        age = line_age_seconds(line.get("updated"))
        running = age is not None and age <= LINE_STALE_SECONDS
        up = GaugeMetricFamily(
            "station_line_up",
            f"1 when the line updated its status in the last {LINE_STALE_SECONDS:g} s",
        )
        up.add_metric([], 1 if running else 0)
        yield up
        if age is not None:
            g = GaugeMetricFamily(
                "station_line_status_age_seconds", "Seconds since the line last updated its status"
            )
            g.add_metric([], age)
            yield g
        ports = GaugeMetricFamily(
            "station_line_ports", "Ports of a running line per step", labels=["step"]
        )
        active = GaugeMetricFamily(
            "station_line_ports_active", "Ports of a running line with a board on a step"
        )
        per_step: dict[str, int] = {}
        busy = 0
        for p in line.get("ports", []) if running else []:
            per_step[p["step"]] = per_step.get(p["step"], 0) + 1
            busy += p["step"] not in ("waiting", "verified", "failed", "skipped")
        for step, n in sorted(per_step.items()):
            ports.add_metric([step], n)
        active.add_metric([], busy)
        yield ports
        yield active


def line_age_seconds(updated: object, now: datetime | None = None) -> float | None:
    if not isinstance(updated, str):
        return None
    try:
        at = datetime.fromisoformat(updated.replace("Z", "+00:00"))
    except ValueError:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return max(0.0, ((now or datetime.now(UTC)) - at).total_seconds())


class _SyncCollector(Collector):
    """The whitelist sync loop's lag and last error, from its status file (any process's)."""

    def __init__(self, status: Callable[[], SyncStatus | None]) -> None:
        self._status = status

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        if status is None:
            return
        lag = status.lag()
        if lag is not None:
            yield GaugeMetricFamily(
                "station_whitelist_sync_lag_seconds",
                "Age of the start of the last successful whitelist sync: no verified board "
                "has waited longer (plus one round) to be whitelisted",
                value=lag,
            )
        yield GaugeMetricFamily(
            "station_whitelist_sync_interval_seconds",
            "Seconds between whitelist sync rounds",
            value=status.interval,
        )
        yield CounterMetricFamily(
            "station_whitelist_sync_failures",
            "Whitelist sync rounds that failed",
            value=status.failures,
        )
        error = InfoMetricFamily(
            "station_whitelist_sync_last_error",
            "The last round's error or warning (code), absent after a clean round",
        )
        if status.last_error_code is not None:
            error.add_metric([], {"code": status.last_error_code})
            yield error


class Metrics:
    def __init__(
        self,
        counts: Callable[[], dict[str, dict[str, int]]],
        tallies: Callable[[], Tallies] | None = None,
        line: Callable[[], dict[str, Any]] | None = None,
        sync_status: Callable[[], SyncStatus | None] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "station_http_certificate_requests",
            "Certificate requests this service answered with a certificate "
            "(outcome issued, or reused: an idempotent re-request)",
            ["outcome"],
            registry=r,
        )
        self.failures = Counter(
            "station_issue_failures",
            "Refused or failed HTTP certificate requests by reason code",
            ["code"],
            registry=r,
        )
        # Label children resolved once: labels() takes a lock and a dict lookup per call.
        self.issued_new = self.requests.labels(outcome="issued")
        self.issued_reused = self.requests.labels(outcome="reused")
        self.issue_seconds = Histogram(
            "station_issue_duration_seconds",
            "Time to answer a certificate request (policy, ledger, HSM)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.hsm_sign_seconds = Histogram(
            "station_hsm_sign_duration_seconds",
            "Time of the PKCS#11 signature of one device certificate",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.auth_failures = Counter(
            "station_auth_failures",
            "Requests refused for a missing or unknown bearer token (401)",
            registry=r,
        )
        self.auth_rate_limited = Counter(
            "station_auth_rate_limited",
            "Requests refused because their address failed to authenticate too often (429)",
            registry=r,
        )
        t = tallies or Tallies
        self._shared: list[Collector] = [_StepsCollector(t), _LineCollector(line or dict)]
        # the whitelist sync's lag and last error code: no batch names, no AWS details
        if sync_status is not None:
            self._shared.append(_SyncCollector(sync_status))
        for c in self._shared:
            r.register(c)
        self.private_registry = CollectorRegistry(auto_describe=False)
        self.private_registry.register(_LedgerCollector(counts, t))

    def exposition(self, *, reader: bool = False) -> bytes:
        """One scrape: every worker's request metrics (multiprocess mode), the line's and the
        ledger's; the per-batch ones only for a reader."""
        path = multiprocess_dir()
        if path is None:
            body = generate_latest(self.registry)
        else:
            scrape = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(scrape, path=path)
            for c in self._shared:
                scrape.register(c)
            body = generate_latest(scrape)
        if reader:
            body += generate_latest(self.private_registry)
        return body


class TimedCA(CertificateAuthority):
    """The station's CA, timing each HSM signature."""

    def __init__(self, ca: CertificateAuthority, observe: Callable[[float], None]) -> None:
        super().__init__(ca.keystore, ca.key, ca.certificate, ca.parents)
        self._observe = observe

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        start = time.perf_counter()
        try:
            return super().sign_certificate(builder)
        finally:
            self._observe(time.perf_counter() - start)
