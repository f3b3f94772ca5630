"""The regional's agent API (``/api/v1/agent``): what agents on installing machines call.

See ``lpmosd/web/openapi/agent.yaml``. This module is HTTP only: it parses requests, limits
the rate and concurrency of callers, and maps errors; what each call does (enrolment, agent
tokens, leases, task writes) is :class:`lpmosd.agent_service.AgentService`.

Reports (progress, logs, complete, fail) answer 200 with ``committed: true`` once etcd has
them, or 202 with ``committed: false, journaled: true`` when the regional journaled them
because etcd is unreachable (applied later, in order; the agent need not retry).

Per client IP address a token bucket (``regional.rate_limit_per_second``/``_burst``)
answers 429 with ``Retry-After`` beyond the limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from quart import Response, request
from quart_trio import QuartTrio

from lpmosd import schema
from lpmosd.agent_service import AgentService, Reported, TaskEndedError, bearer_token
from lpmosd.api_requests import (
    FailRequest,
    FirstBootRequest,
    LogRequest,
    ProgressRequest,
    RegisterRequest,
)
from lpmosd.documents import Task
from lpmosd.metrics import REGISTRY
from lpmosd.plan import plan_to_wire
from lpmosd.timestamps import format_ts, utcnow
from lpmosd.web.admission import OVERLOAD_MESSAGE, Admission
from lpmosd.web.agent_fast import (
    OP_ID_HEADER,
    AgentFastPath,
    heard_body,
    op_id_of,
    reported_reply,
    retry_after,
    task_ended_reply,
)
from lpmosd.web.boot_app import install_boot_routes
from lpmosd.web.common import (
    error_body,
    error_response,
    install_common,
    json_response,
    no_fields,
    read_json,
)
from lpmosd.web.ops import etcd_probe
from lpmosd.web.ratelimit import RateLimiter
from lpmosd.web.status_page import install_status_page

if TYPE_CHECKING:
    from lpmosd.roles.regional import Regional

RATE_LIMITED = Counter(
    "lpmosd_rate_limited_total", "Agent API requests refused with 429.", registry=REGISTRY
)


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
        "ssh_authorized_keys": list(task.ssh_authorized_keys),
    }


def _authorization() -> str | None:
    return request.headers.get("Authorization")


def _op_id() -> str | None:
    """The request's operation id (``Idempotency-Key``), recorded in the task with its
    change: a request repeated after a lost answer is recognised, not applied twice."""
    return op_id_of(request.headers.get(OP_ID_HEADER))


#: Where :func:`create_agent_app` leaves the app's :class:`AgentFastPath` (app.extensions).
FAST_PATH = "lpmosd.agent_fast_path"


async def send_overloaded(send: Any, retry_after: int) -> None:
    """The 429 of an overloaded regional, straight over ASGI (nothing else runs)."""
    body = error_body(OVERLOAD_MESSAGE)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def create_agent_app(rg: Regional) -> QuartTrio:
    """Build the agent API app over the regional's agent service (and its status page)."""
    app = QuartTrio("lpmosd.regional")
    cfg = rg.config
    agents: AgentService = rg.agents
    max_body = cfg.max_body_bytes

    async def readiness() -> tuple[bool, dict[str, Any]]:
        # A standby is not ready: a load balancer in front of two regionals sends agents
        # to the active one.
        ok = rg.session.active and rg.machines is not None
        # Ask etcd itself (cached ~1 s): the session notices an outage only after its TTL.
        etcd_ok, etcd = await etcd_probe(rg.client).check()
        detail = {
            "role": "regional",
            "idc": cfg.idc,
            "session": rg.session.state,
            "leadership": rg.session.leadership,
            "etcd": etcd,
        }
        return ok and etcd_ok, detail

    install_common(
        app, name="regional", readiness=readiness, max_body=max_body, metrics=cfg.metrics_public
    )
    install_status_page(app, rg)
    install_boot_routes(app, rg.boot)

    @app.errorhandler(TaskEndedError)
    async def _task_ended(exc: TaskEndedError) -> Response:
        status, body, headers = task_ended_reply(exc)
        return Response(body, status=status, content_type="application/json", headers=headers)

    limiter = RateLimiter(cfg.rate_limit_per_second, cfg.rate_limit_burst)

    @app.before_request
    async def _rate_limit() -> Response | None:
        if not request.path.startswith("/api/"):
            return None  # probes and metrics scrapers are not agents
        wait = limiter.take(request.remote_addr or "unknown")
        if wait <= 0:
            return None
        RATE_LIMITED.inc()
        response = error_response(429, "too many requests; slow down")
        response.headers["Retry-After"] = retry_after(wait)
        return response

    # Admission control (lpmosd.web.admission): a few agent writes at once, the others
    # queued in arrival order, 429 + Retry-After beyond the queue's bound. Heartbeats are
    # exempt.
    admission = Admission(cfg.max_active_writes, cfg.max_queued_writes)
    inner_asgi = app.asgi_app

    async def admitted_asgi(scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope.get("type") == "http" else ""
        if (
            scope.get("method") == "POST"
            and path.startswith("/api/")
            and not path.endswith("/heartbeat")
        ):
            if admission.overloaded():
                await send_overloaded(send, admission.retry_after)
                return
            async with admission.limiter:
                await inner_asgi(scope, receive, send)
            return
        await inner_asgi(scope, receive, send)

    app.asgi_app = admitted_asgi  # type: ignore[method-assign]
    # The same routes below Quart, for the lean server (lpmosd.web.lean).
    app.extensions[FAST_PATH] = AgentFastPath(
        agents,
        limiter=limiter,
        admission=admission,
        max_body=max_body,
        rate_limited=RATE_LIMITED,
    )

    def status(reported: Reported) -> Response:
        code, body = reported_reply(reported)
        return json_response(body, code)

    @app.post("/api/v1/agent/register")
    async def register() -> Response:
        agents.machines()  # 503 before reading anything while the session is down
        req = RegisterRequest.from_obj(await read_json(max_body), now=utcnow())
        reg = await agents.register(req, _authorization())
        return json_response(
            {
                "task": task_view(reg.task),
                "plan": plan_to_wire(reg.plan),
                "lease_ttl": cfg.agent_lease_ttl,
                "heartbeat_interval": cfg.heartbeat_interval,
                "agent_token": reg.agent_token,
            }
        )

    @app.get("/api/v1/agent/<sn>/task")
    async def get_task(sn: str) -> Response:
        task = agents.task(await agents.authorize(sn, _authorization()))
        return json_response({"task": task_view(task), "plan": plan_to_wire(agents.plan_for(task))})

    @app.post("/api/v1/agent/<sn>/heartbeat")
    async def heartbeat(sn: str) -> Response:
        call = await agents.authorize(sn, _authorization())
        no_fields(await read_json(max_body, empty_ok=True))
        return json_response(heard_body(await agents.heartbeat(call)))

    @app.post("/api/v1/agent/<sn>/progress")
    async def progress(sn: str) -> Response:
        call = await agents.authorize(sn, _authorization())
        req = ProgressRequest.from_obj(await read_json(max_body))
        return status(await agents.progress(call, req, op_id=_op_id()))

    @app.post("/api/v1/agent/<sn>/logs")
    async def logs(sn: str) -> Response:
        call = await agents.authorize(sn, _authorization())
        req = LogRequest.from_obj(await read_json(max_body))
        return status(await agents.logs(call, req, op_id=_op_id()))

    @app.post("/api/v1/agent/<sn>/complete")
    async def complete(sn: str) -> Response:
        call = await agents.authorize(sn, _authorization())
        no_fields(await read_json(max_body, empty_ok=True))
        return status(await agents.complete(call, op_id=_op_id()))

    @app.post("/api/v1/agent/<sn>/fail")
    async def fail(sn: str) -> Response:
        call = await agents.authorize(sn, _authorization())
        req = FailRequest.from_obj(await read_json(max_body))
        return status(await agents.fail(call, req, op_id=_op_id()))

    # --- first boot of the installed system ("deployed means booted") ---------------------

    @app.post("/api/v1/agent/<sn>/first-boot-credential")
    async def first_boot_credential(sn: str) -> Response:
        """The agent, during post_install: a one-time credential for the new system."""
        call = await agents.authorize(sn, _authorization())
        no_fields(await read_json(max_body, empty_ok=True))
        return json_response({"credential": await agents.first_boot_credential(call)})

    @app.post("/api/v1/agent/<sn>/first-boot")
    async def first_boot(sn: str) -> Response:
        """The installed system, once: its first-boot credential as the bearer token."""
        agents.machines()
        sn = schema.validate_sn(sn)
        credential = bearer_token(_authorization())
        req = FirstBootRequest.from_obj(await read_json(max_body, empty_ok=True))
        task = await agents.first_boot(sn, credential, req)
        first = task.first_boot_at
        return json_response(
            {
                "status": task.status.value,
                "first_boot_at": None if first is None else format_ts(first),
            }
        )

    return app
