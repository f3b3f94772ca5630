"""Operations support for both roles' apps: a cached etcd probe and role metrics.

``/readyz`` must turn 503 within seconds when etcd goes away, well before a role's session
lease runs out, so readiness asks etcd itself (Maintenance.Status). The answer is cached
for a second and concurrent probes share one request, so a scraper or a load balancer
polling ``/readyz`` costs etcd at most one cheap call per second.

The role metrics are a prometheus_client custom collector: it reads the roles' in-memory
views at scrape time (tasks by IDC and status, live agents, session state), so nothing is
counted twice and no etcd request is made for a scrape.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lpmosd import schema
from lpmosd.errors import NOSPACE_HELP, EtcdError
from lpmosd.etcd import EtcdClient
from lpmosd.metrics import REGISTRY
from lpmosd.roles.session import SessionState

if TYPE_CHECKING:
    from lpmosd.roles.regional import Regional
    from lpmosd.web.live import LiveHub

#: How long a probe answer is reused.
PROBE_CACHE: Final = 1.0
#: How long a probe may take before etcd counts as unreachable.
PROBE_TIMEOUT: Final = 2.0


@dataclass(eq=False)
class EtcdProbe:
    """A cached ``Maintenance.Status`` call against the client's current endpoint."""

    client: EtcdClient
    cache: float = PROBE_CACHE
    timeout: float = PROBE_TIMEOUT
    ok: bool = False
    detail: dict[str, Any] = field(default_factory=dict)
    #: trio time of the last answer (-inf: never probed).
    checked_at: float = float("-inf")
    _lock: trio.Lock = field(default_factory=trio.Lock)

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """``(healthy, detail)``: etcd answered with a leader and no member errors."""
        if trio.current_time() - self.checked_at < self.cache:
            return self.ok, self.detail
        async with self._lock:
            # Whoever waited for the lock reuses the answer the holder just got.
            if trio.current_time() - self.checked_at < self.cache:
                return self.ok, self.detail
            ok = False
            detail: dict[str, Any] = {"endpoint": self.client.current_endpoint}
            with trio.move_on_after(self.timeout) as scope:
                try:
                    st = await self.client.status()
                except EtcdError as exc:
                    detail["error"] = str(exc)
                else:
                    ok = st.leader != 0 and not st.errors
                    detail = {
                        "endpoint": st.endpoint,
                        "version": st.version,
                        "revision": st.revision,
                        "leader": st.leader != 0,
                        "db_size": st.db_size,
                    }
                    detail["db_size_in_use"] = st.db_size_in_use
                    if st.errors:
                        detail["errors"] = list(st.errors)
                        if any("NOSPACE" in e for e in st.errors):
                            detail["reason"] = NOSPACE_HELP
            if scope.cancelled_caught:
                detail["error"] = f"no answer within {self.timeout:g}s"
            self.ok, self.detail, self.checked_at = ok, detail, trio.current_time()
            return ok, detail


_PROBES: weakref.WeakKeyDictionary[EtcdClient, EtcdProbe] = weakref.WeakKeyDictionary()


async def refresh_probes() -> None:
    """Check the probes of open clients, all at once (cached answers are reused), so the
    etcd gauges are current; never longer than one probe's timeout."""

    async def check(probe: EtcdProbe) -> None:
        await probe.check()

    with trio.move_on_after(PROBE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for client, probe in list(_PROBES.items()):
                if not client.closed:
                    nursery.start_soon(check, probe)


def etcd_probe(client: EtcdClient) -> EtcdProbe:
    """The probe of ``client`` (one per client, shared by both roles of a process)."""
    probe = _PROBES.get(client)
    if probe is None:
        probe = _PROBES[client] = EtcdProbe(client)
    return probe


def _family(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    doc: str,
    labels: list[str],
    values: Mapping[Any, float],
) -> Metric:
    """A labelled metric family from ``{label value(s): number}``, in label order."""
    family = kind(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


class RoleCollector(Collector):
    """Role metrics read from live objects at scrape time.

    A process runs one control plane and at most one regional per IDC; the latest one
    registered is reported (tests start many daemons in one process, one after another).
    Everything is held weakly.
    """

    def __init__(self) -> None:
        self._hub: weakref.ref[LiveHub] | None = None
        self._sessions: dict[str, weakref.ref[SessionState]] = {}
        self._regionals: dict[str, weakref.ref[Regional]] = {}
        self.probes = _PROBES

    def add_hub(self, hub: LiveHub) -> None:
        """Report this control plane's dashboard hub."""
        self._hub = weakref.ref(hub)

    def add_session(self, session: SessionState) -> None:
        """Report this role's session."""
        self._sessions[session.role] = weakref.ref(session)

    def add_regional(self, rg: Regional) -> None:
        """Report this regional (one per IDC)."""
        self._regionals[rg.idc] = weakref.ref(rg)

    def describe(self) -> Iterator[Metric]:
        """Nothing to pre-declare (the registry then skips its duplicate-name check)."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """The metric families (read at scrape time; no etcd request)."""
        tasks: Counter[tuple[str, str]] = Counter()
        agents: Counter[str] = Counter()
        clients = 0
        events = 0
        hub = self._hub() if self._hub is not None else None
        if hub is not None:
            clients += hub.subscribers
            events += hub.published
            for idc, per_status in hub.counts_dict().items():
                for status, n in per_status.items():
                    tasks[(idc, status)] += n
            for machine, state in hub.machines.items():
                if state.agent_online:
                    agents[machine.partition("/")[0]] += 1
        yield _family(
            GaugeMetricFamily,
            "lpmosd_tasks",
            "Tasks by IDC and status, as the control plane's watched view has them.",
            ["idc", "status"],
            tasks,
        )
        yield _family(
            GaugeMetricFamily,
            "lpmosd_agents_online",
            "Machines whose agent holds a live lease, by IDC (control plane's view).",
            ["idc"],
            agents,
        )
        yield GaugeMetricFamily(
            "lpmosd_dashboard_clients", "Open dashboard event streams.", value=clients
        )
        yield CounterMetricFamily(
            "lpmosd_dashboard_events", "Events the dashboard hub has published.", value=events
        )
        yield from self._regional_metrics()
        yield from self._session_metrics()
        up = GaugeMetricFamily(
            "lpmosd_etcd_up",
            "1 when the last readiness probe found etcd healthy (leader, no errors).",
            labels=["endpoint"],
        )
        db = GaugeMetricFamily(
            "lpmosd_etcd_db_bytes",
            "Size of etcd's backend database file (Maintenance.Status dbSize), by endpoint.",
            labels=["endpoint"],
        )
        in_use = GaugeMetricFamily(
            "lpmosd_etcd_db_in_use_bytes",
            "Bytes of etcd's database in use (dbSizeInUse; the rest a defrag would free).",
            labels=["endpoint"],
        )
        for probe in list(self.probes.values()):
            if probe.checked_at > float("-inf"):
                endpoint = [str(probe.detail.get("endpoint", ""))]
                up.add_metric(endpoint, 1.0 if probe.ok else 0.0)
                if "db_size" in probe.detail:
                    db.add_metric(endpoint, float(probe.detail["db_size"]))
                    in_use.add_metric(endpoint, float(probe.detail["db_size_in_use"]))
        yield up
        yield db
        yield in_use

    def _regional_metrics(self) -> Iterator[Metric]:
        servers: Counter[str] = Counter()
        live: Counter[str] = Counter()
        for ref in list(self._regionals.values()):
            rg = ref()
            if rg is None:
                continue
            if rg.servers is not None:
                servers[rg.idc] += len(rg.servers.items)
            if rg.machines is not None:
                live[rg.idc] += sum(
                    1 for k in rg.machines.items if (p := schema.parse_key(k)) and p.kind == "lease"
                )
        yield _family(
            GaugeMetricFamily,
            "lpmosd_regional_servers",
            "Servers in the regional's IDC directory.",
            ["idc"],
            servers,
        )
        yield _family(
            GaugeMetricFamily,
            "lpmosd_regional_agents_online",
            "Agents of the regional's IDC holding a live lease.",
            ["idc"],
            live,
        )

    def _session_metrics(self) -> Iterator[Metric]:
        running: dict[str, float] = {}
        active: dict[str, float] = {}
        restarts: Counter[str] = Counter()
        remaining: dict[str, float] = {}
        for ref in list(self._sessions.values()):
            s = ref()
            if s is None:
                continue
            running[s.role] = max(running.get(s.role, 0.0), 1.0 if s.running else 0.0)
            active[s.role] = max(active.get(s.role, 0.0), 1.0 if s.active else 0.0)
            restarts[s.role] += s.restarts
            if s.lease is not None:
                remaining[s.role] = s.lease.remaining()
        yield _family(
            GaugeMetricFamily,
            "lpmosd_role_running",
            "1 while the role holds its session lease.",
            ["role"],
            running,
        )
        yield _family(
            GaugeMetricFamily,
            "lpmosd_role_active",
            "1 while the role leads its election (active), 0 while it is a standby.",
            ["role"],
            active,
        )
        yield _family(
            CounterMetricFamily,
            "lpmosd_role_session_restarts",
            "Sessions restarted after the role lost its lease.",
            ["role"],
            restarts,
        )
        yield _family(
            GaugeMetricFamily,
            "lpmosd_role_lease_remaining_seconds",
            "How long the role may still trust its session lease.",
            ["role"],
            remaining,
        )


#: The process's one collector, registered with the shared registry at import.
ROLE_METRICS: Final = RoleCollector()
REGISTRY.register(ROLE_METRICS)
