"""The regional's status page (``/`` on the agent API's port): what an operator checks first.

Role state (running, or restarting after a lost lease), the etcd endpoints and the cached
health probe, the session lease and how long it may still be trusted, the IDC's servers
with their task status, the live agents with the age of their last heartbeat, and recent
errors. Everything comes from the regional's memory (its views, its session), plus the
probe's one cached Status call, so reloading the page costs etcd nothing more.

Security: the page is read-only and unauthenticated. It shows no secret — no tokens, no
enrolment secrets, no etcd credentials (endpoints only) — only what the agents on the same
network already learn about their own machines (serial numbers, MACs, task status). The
regional holds no operator tokens to check a login against (its etcd user may read only
its own IDC), and a PXE host's status should stay readable while the control plane is
down. Where even the inventory must not be seen from the provisioning network, firewall
the port to the agents' subnet and the operators' jump hosts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import trio
from quart import Blueprint, render_template
from quart_trio import QuartTrio

from lpmosd import schema
from lpmosd.documents import ServerEntry, Task
from lpmosd.errors import LpmosdError
from lpmosd.store import parse_lease_value
from lpmosd.timestamps import format_ts
from lpmosd.web.ops import ROLE_METRICS, etcd_probe
from lpmosd.web.pages import page_headers

if TYPE_CHECKING:
    from lpmosd.roles.regional import Regional

#: Rows shown per table (the page is a glance, not an inventory export).
MAX_ROWS: Final = 1000
#: The page reloads itself this often (a meta refresh: no script, nothing to allow in CSP).
REFRESH_SECONDS: Final = 5


def _age(then: float | None, now: float) -> str:
    if then is None:
        return "—"
    s = max(0.0, now - then)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago"


def _server_rows(rg: Regional, now: float) -> list[dict[str, Any]]:
    servers, machines = rg.servers, rg.machines
    if servers is None or machines is None:
        return []
    rows: list[dict[str, Any]] = []
    for key, kv in sorted(servers.items.items()):
        parsed = schema.parse_key(key)
        if parsed is None:
            continue
        sn = parsed.sn
        row: dict[str, Any] = {"sn": sn, "mac": "", "status": "", "step": "", "error": ""}
        try:
            entry = ServerEntry.from_json(kv.value)
            row.update(mac=entry.mac, status=entry.status.value)
        except LpmosdError:
            row["status"] = "unreadable"
        task_kv = machines.get(schema.task_key(rg.idc, sn))
        if task_kv is not None:
            try:
                task = Task.from_json(task_kv.value)
            except LpmosdError:
                pass
            else:
                row["status"] = task.status.value
                running = [p for p in task.progress if p.percent < 100]
                step = running[-1] if running else (task.progress[-1] if task.progress else None)
                row["step"] = f"{step.step} {step.percent}%" if step else ""
                row["error"] = task.error or ""
        lease_kv = machines.get(schema.lease_key(rg.idc, sn))
        row["agent"] = lease_kv is not None
        row["heartbeat"] = _age(rg.agents.heartbeats.get(sn), now) if lease_kv is not None else ""
        rows.append(row)
    return rows


def _agent_rows(rg: Regional, now: float) -> list[dict[str, Any]]:
    machines = rg.machines
    if machines is None:
        return []
    rows = []
    for key, kv in sorted(machines.items.items()):
        parsed = schema.parse_key(key)
        if parsed is None or parsed.kind != "lease":
            continue
        rows.append(
            {
                "sn": parsed.sn,
                "lease": kv.lease or parse_lease_value(kv.value) or 0,
                # Only heartbeats this process received: after a restart, "—" until the next.
                "heartbeat": _age(rg.agents.heartbeats.get(parsed.sn), now),
            }
        )
    return rows


def install_status_page(app: QuartTrio, rg: Regional) -> None:
    """Add ``/`` (the status page) to the regional's app."""
    ROLE_METRICS.add_regional(rg)
    ROLE_METRICS.add_session(rg.session)
    bp = Blueprint(
        "status",
        __name__,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static/status",
    )
    bp.after_request(page_headers)

    @bp.get("/")
    async def status_page() -> str:
        now = trio.current_time()
        probe = etcd_probe(rg.client)
        etcd_ok, etcd = await probe.check()
        lease = rg.session.lease
        servers = _server_rows(rg, now)
        agents = _agent_rows(rg, now)
        return await render_template(
            "status/regional.html",
            refresh=REFRESH_SECONDS,
            idc=rg.idc,
            url=rg.url,
            session=rg.session,
            lease_id=lease.id if lease else None,
            lease_ttl=lease.ttl if lease else None,
            lease_remaining=lease.remaining() if lease else None,
            endpoints=rg.client.endpoints,
            current_endpoint=rg.client.current_endpoint,
            etcd_ok=etcd_ok,
            etcd=etcd,
            probe_age=_age(probe.checked_at, now),
            servers=servers[:MAX_ROWS],
            servers_total=len(servers),
            agents=agents[:MAX_ROWS],
            agents_total=len(agents),
            errors=list(reversed(rg.session.recent_errors)),
            unknown_boots=[
                {
                    "mac": u.mac,
                    "count": u.count,
                    "first_seen": format_ts(u.first_seen),
                    "last_seen": format_ts(u.last_seen),
                    "facts": ", ".join(f"{k} {v}" for k, v in sorted(u.facts.items())),
                }
                for u in reversed(rg.boot.unknown.values())
            ],
            os_types=rg.boot.installable(),
            synced=rg.machines is not None,
        )

    app.register_blueprint(bp)
