"""The regional's agent API (``/api/v1/agent``): what agents on installing machines call.

See ``lpmosd/web/openapi/agent.yaml``. Every write is one atomic Txn on the task document,
CAS'd against the revision already in the regional's watch cache (no read first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Response
from quart_trio import QuartTrio

from lpmosd import schema
from lpmosd.errors import (
    ConflictError,
    LeaseNotFoundError,
    UnavailableError,
    ValidationError,
)
from lpmosd.etcd import KeyValue
from lpmosd.models import (
    ACTIVE_AGENT,
    FailRequest,
    LogRequest,
    MachineMeta,
    ProgressRequest,
    Task,
    TaskStatus,
    utcnow,
)
from lpmosd.store import StoredTask
from lpmosd.view import PrefixView
from lpmosd.web.common import install_common, json_response, no_fields, read_json

if TYPE_CHECKING:
    from lpmosd.roles.regional import Regional

import trio

_REGISTER_FIELDS = frozenset({"sn", "mac", "hardware", "enrollment_secret"})


def task_view(task: Task) -> dict[str, Any]:
    """What an agent needs to know of its task."""
    return {
        "task_id": task.task_id,
        "idc": task.idc,
        "sn": task.sn,
        "mac": task.mac,
        "os_type": task.os_type,
        "os_version": task.os_version,
        "disk_layout": task.disk_layout,
        "network_config": task.network_config,
        "status": task.status.value,
        "approval": task.approval.to_dict() if task.approval else None,
        "resume_from": task.resume_from,
        "progress": [p.to_dict() for p in task.progress],
    }


def create_agent_app(rg: Regional) -> QuartTrio:
    """Build the agent API app over the regional's state."""
    app = QuartTrio("lpmosd.regional")
    cfg = rg.config
    store = rg.store
    idc = cfg.idc
    max_body = cfg.max_body_bytes

    async def readiness() -> tuple[bool, dict[str, Any]]:
        ok = rg.session.running and rg.machines is not None
        return ok, {"role": "regional", "idc": idc, "session": rg.session.state}

    install_common(app, name="regional", readiness=readiness, max_body=max_body)

    def machines() -> PrefixView:
        view = rg.machines
        if not rg.session.running or view is None:
            raise UnavailableError("regional is restarting its etcd session; retry shortly")
        return view

    async def cached_task(view: PrefixView, sn: str) -> KeyValue:
        kv = await ensure_task(view, sn)
        assert kv is not None
        return kv

    async def live_lease_id(sn: str) -> int | None:
        # The view may not have the lease key of a registration a moment ago yet.
        return rg.lease_id(sn) or await store.get_lease_id(idc, sn)

    def plan_view(task: Task) -> dict[str, Any] | None:
        plan = cfg.plan_for(task.os_type)
        if plan is None:
            return None
        return {
            "name": plan.os_type,
            "steps": [
                {
                    "name": s.name,
                    "command": list(s.command),
                    "timeout": int(s.timeout),
                    "simulate": s.simulate,
                }
                for s in plan.steps
            ],
        }

    def observed(view: PrefixView, stored: StoredTask) -> StoredTask:
        if stored.kv is not None:
            view.observe(stored.kv)
        return stored

    async def ensure_task(view: PrefixView, sn: str) -> KeyValue | None:
        kv = view.get(schema.task_key(idc, sn))
        if kv is None:
            # The view may lag a task created a moment ago: ask etcd before saying 404.
            kv = (await store.get_task(idc, sn)).kv
        return kv

    @app.post("/api/v1/agent/register")
    async def register() -> Response:
        view = machines()
        body = await read_json(max_body)
        if not isinstance(body, dict):
            raise ValidationError("body must be a JSON object", field="body")
        for key in body:
            if key not in _REGISTER_FIELDS:
                raise ValidationError(f"unknown field {key!r}", field=str(key))
        sn = schema.validate_sn(body.get("sn"))
        mac = schema.normalize_mac(body.get("mac"))
        if "hardware" not in body:
            raise ValidationError("hardware is required", field="hardware")
        try:
            meta = MachineMeta.from_report(body["hardware"], now=utcnow())
        except ValidationError as exc:
            # Name the field as the client spelled it: hardware.disks[0].size_bytes.
            where = f"hardware.{exc.field}" if exc.field else "hardware"
            raise ValidationError(f"{where}: {exc.message}", field=where) from None
        current = await ensure_task(view, sn)
        old_lease = rg.lease_id(sn)
        lease = await rg.client.lease_grant(cfg.agent_lease_ttl)
        try:
            stored = await store.register_agent(
                idc, sn, mac=mac, meta=meta, lease_id=lease.id, current=current
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await rg.revoke_quietly(lease.id)
            raise
        observed(view, stored)
        if old_lease and old_lease != lease.id:
            # The lease key now rides on the new lease: revoking the old one deletes nothing.
            await rg.revoke_quietly(old_lease)
        rg.heartbeats[sn] = trio.current_time()
        return json_response(
            {
                "task": task_view(stored.task),
                "plan": plan_view(stored.task),
                "lease_ttl": cfg.agent_lease_ttl,
                "heartbeat_interval": cfg.heartbeat_interval,
            }
        )

    @app.get("/api/v1/agent/<sn>/task")
    async def get_task(sn: str) -> Response:
        view = machines()
        sn = schema.validate_sn(sn)
        kv = await ensure_task(view, sn)
        assert kv is not None
        task = Task.from_json(kv.value)
        return json_response({"task": task_view(task), "plan": plan_view(task)})

    @app.post("/api/v1/agent/<sn>/heartbeat")
    async def heartbeat(sn: str) -> Response:
        view = machines()
        sn = schema.validate_sn(sn)
        no_fields(await read_json(max_body, empty_ok=True))
        task = Task.from_json((await cached_task(view, sn)).value)
        lease_id = await live_lease_id(sn)
        ttl = 0
        if lease_id and task.status not in (TaskStatus.COMPLETED, TaskStatus.CANCELLED):
            try:
                ttl = await rg.client.keepalive_once(lease_id)
            except LeaseNotFoundError:
                # A cached id may be the lease a re-registration just replaced: ask etcd.
                fresh = await store.get_lease_id(idc, sn)
                if fresh and fresh != lease_id:
                    try:
                        ttl = await rg.client.keepalive_once(fresh)
                    except LeaseNotFoundError:
                        ttl = 0
        if not ttl and task.status in ACTIVE_AGENT | {TaskStatus.PENDING}:
            raise ConflictError(f"agent of {sn} holds no live lease; register again", field="sn")
        rg.heartbeats[sn] = trio.current_time()
        return json_response({"status": task.status.value, "lease_ttl": ttl})

    @app.post("/api/v1/agent/<sn>/progress")
    async def progress(sn: str) -> Response:
        view = machines()
        sn = schema.validate_sn(sn)
        req = ProgressRequest.from_obj(await read_json(max_body))
        stored = await store.record_progress(
            idc,
            sn,
            step=req.step,
            percent=req.percent,
            message=req.message,
            current=await cached_task(view, sn),
        )
        observed(view, stored)
        return json_response({"status": stored.task.status.value})

    @app.post("/api/v1/agent/<sn>/logs")
    async def logs(sn: str) -> Response:
        view = machines()
        sn = schema.validate_sn(sn)
        req = LogRequest.from_obj(await read_json(max_body))
        stored = await store.append_logs(
            idc, sn, req.lines, level=req.level, current=await cached_task(view, sn)
        )
        observed(view, stored)
        return json_response({"status": stored.task.status.value})

    async def finish(sn: str, outcome: TaskStatus, reason: str) -> Response:
        view = machines()
        lease_id = await live_lease_id(sn)
        stored = await store.finish(
            idc, sn, outcome=outcome, reason=reason, current=await cached_task(view, sn)
        )
        observed(view, stored)
        await rg.revoke_quietly(lease_id)
        rg.heartbeats.pop(sn, None)
        return json_response({"status": stored.task.status.value})

    @app.post("/api/v1/agent/<sn>/complete")
    async def complete(sn: str) -> Response:
        sn = schema.validate_sn(sn)
        no_fields(await read_json(max_body, empty_ok=True))
        return await finish(sn, TaskStatus.COMPLETED, "")

    @app.post("/api/v1/agent/<sn>/fail")
    async def fail(sn: str) -> Response:
        sn = schema.validate_sn(sn)
        req = FailRequest.from_obj(await read_json(max_body))
        return await finish(sn, TaskStatus.FAILED, req.reason)

    return app
