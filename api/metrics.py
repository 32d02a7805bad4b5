"""Prometheus metrics of one app instance (its own registry, so tests build many apps).

With ``station serve --workers N`` every worker has its own registry: counters
and histograms are per worker (a scrape reaches one of them); the boards gauge
is read from the ledger at scrape time, so it is the same from every worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from station.ca import CertificateAuthority
from station.publish.whitelist_sync import SyncStatus

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _BoardsCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, dict[str, int]]]) -> None:
        self._counts = counts

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        boards = GaugeMetricFamily(
            "station_boards", "Boards in the ledger per batch and state", labels=["batch", "state"]
        )
        up = GaugeMetricFamily("station_ledger_up", "1 when the ledger answered this scrape")
        try:
            counts = self._counts()
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        for batch, states in sorted(counts.items()):
            for state, n in sorted(states.items()):
                boards.add_metric([batch, state], n)
        up.add_metric([], 1)
        yield boards
        yield up


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
        sync_status: Callable[[], SyncStatus | None] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.issued = Counter(
            "station_certificates_issued",
            "Certificates handed out over HTTP (reused: an idempotent re-request)",
            ["reused"],
            registry=r,
        )
        self.failures = Counter(
            "station_issue_failures",
            "Refused or failed certificate requests by reason code",
            ["code"],
            registry=r,
        )
        # Label children resolved once: labels() takes a lock and a dict lookup per call.
        self.issued_new = self.issued.labels(reused="false")
        self.issued_reused = self.issued.labels(reused="true")
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
        # Batch names and board counts are for reader roles (as /v1/batches is): a
        # registry of their own, added to a scrape that carries a reader token.
        self.private_registry = CollectorRegistry(auto_describe=False)
        self.private_registry.register(_BoardsCollector(counts))
        # the whitelist sync's lag and last error code: no batch names, no AWS details
        if sync_status is not None:
            r.register(_SyncCollector(sync_status))


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
