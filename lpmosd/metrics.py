"""Prometheus metrics shared by the etcd client, the roles and the HTTP apps.

Exposition uses prometheus_client's own text format; nothing here formats by hand.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: One registry per process; the roles' /metrics endpoints expose it.
REGISTRY = CollectorRegistry(auto_describe=True)

ETCD_REQUEST_SECONDS = Histogram(
    "lpmosd_etcd_request_seconds",
    "Latency of etcd requests by gRPC method.",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
ETCD_REQUEST_ERRORS = Counter(
    "lpmosd_etcd_request_errors_total",
    "Failed etcd requests by gRPC method and error kind.",
    ["method", "kind"],
    registry=REGISTRY,
)
CAS_RETRIES = Counter(
    "lpmosd_etcd_cas_retries_total",
    "atomic_update attempts that lost a compare-and-swap race and were retried.",
    registry=REGISTRY,
)
WATCH_RECONNECTS = Counter(
    "lpmosd_etcd_watch_reconnects_total",
    "Watch streams re-opened after a failure.",
    registry=REGISTRY,
)
WATCH_EVENTS = Counter(
    "lpmosd_etcd_watch_events_total",
    "Events received on watch streams.",
    registry=REGISTRY,
)
ACTIVE_LEASES = Gauge(
    "lpmosd_etcd_active_leases",
    "Leases this process keeps alive.",
    registry=REGISTRY,
)
ETCD_COMPACTIONS = Counter(
    "lpmosd_etcd_compactions_total",
    "etcd history compactions this process made (see lpmosd.compaction).",
    registry=REGISTRY,
)
ETCD_COMPACTED_REVISION = Gauge(
    "lpmosd_etcd_compacted_revision",
    "The revision this process last compacted etcd's history to.",
    registry=REGISTRY,
)
AGENT_AUTH_FAILURES = Counter(
    "lpmosd_agent_auth_failures_total",
    "Refused agent API calls by reason.",
    ["reason"],
    registry=REGISTRY,
)
REPORTS_JOURNALED = Counter(
    "lpmosd_reports_journaled_total",
    "Agent reports journaled because etcd did not take them (applied later, in order).",
    registry=REGISTRY,
)
