"""The regional's agent API (``/api/v1/agent``): what agents on installing machines call.

See ``lpmosd/web/openapi/agent.yaml``. Every write is one atomic Txn on the task document,
CAS'd against the revision already in the regional's watch cache (no read first).

Authentication (see :mod:`lpmosd.credentials` for what is stored):

- ``register`` needs the task's enrolment secret (``enrollment_secret``), issued to the
  operator when the task was created or retried and delivered to the machine in its boot
  parameters. A good secret, for a live task, with the task's MAC, buys a fresh agent token
  (``agent_token``) bound to that task, and marks the secret used.
- A used secret enrols again when the caller also presents the current agent token (the
  same agent registering again), or when no live agent holds the task: its lease is gone,
  or it has been silent for 1.5 heartbeat intervals (a rebooted or restarted agent is
  never stuck, and whoever else learned the secret cannot push out a working agent).
  Otherwise 409. Re-enrolling replaces the agent token: the old one stops working.
- Every other call needs ``Authorization: Bearer <agent_token>`` of the path's server:
  no/unknown token 401, another server's token 403. A token is valid only while its task
  is live (pending, approved, installing): once the task is completed, failed or cancelled
  it is revoked, and using it answers 401 with ``task_status`` (the holder proved it owns
  the token, so it may learn how its task ended and stop accordingly). Retrying,
  re-creating or deleting the task deletes the stored token.
- Per client IP address a token bucket (``regional.rate_limit_per_second``/``_burst``)
  answers 429 with ``Retry-After`` beyond the limit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from quart import Response, request
from quart_trio import QuartTrio

from lpmosd import schema
from lpmosd.credentials import MAX_SECRET_CHARS, AgentToken, Enrolment, hash_secret
from lpmosd.errors import (
    AuthenticationError,
    ConflictError,
    LeaseNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
    ValidationError,
)
from lpmosd.etcd import Compare, KeyValue, put
from lpmosd.metrics import REGISTRY
from lpmosd.models import (
    ACTIVE_AGENT,
    FailRequest,
    FirstBootRequest,
    LogRequest,
    MachineMeta,
    ProgressRequest,
    Task,
    TaskStatus,
    format_ts,
    utcnow,
    valid_op_id,
)
from lpmosd.store import LIVE, StoredTask
from lpmosd.view import PrefixView
from lpmosd.web.boot_app import install_boot_routes
from lpmosd.web.common import (
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

import trio

#: Agent API writes (everything but heartbeats) handled at once; more wait in order.
MAX_ACTIVE_REQUESTS = 64

_REGISTER_FIELDS = frozenset({"sn", "mac", "hardware", "enrollment_secret"})

AGENT_AUTH_FAILURES = Counter(
    "lpmosd_agent_auth_failures_total",
    "Refused agent API calls by reason.",
    ["reason"],
    registry=REGISTRY,
)
RATE_LIMITED = Counter(
    "lpmosd_rate_limited_total", "Agent API requests refused with 429.", registry=REGISTRY
)


#: The header that names one agent request, the same on each of its retries.
OP_ID_HEADER = "Idempotency-Key"


def _op_id() -> str | None:
    """The request's operation id (``Idempotency-Key``), recorded in the task with its
    change: a request repeated after a lost answer is recognised, not applied twice."""
    value = request.headers.get(OP_ID_HEADER)
    if value is None:
        return None
    if len(value) > 64 or not valid_op_id(value):
        raise ValidationError(
            f"{OP_ID_HEADER} must be 1-64 letters, digits or _.:-", field=OP_ID_HEADER
        )
    return f"agent:{value}"


def _bearer() -> str:
    """The request's bearer token; AuthenticationError (401) without a usable one."""
    header = request.headers.get("Authorization")
    if header is None:
        raise AuthenticationError(
            "agent token required: register, then send 'Authorization: Bearer <agent_token>'",
            field="authorization",
        )
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > MAX_SECRET_CHARS:
        raise AuthenticationError("Authorization must be 'Bearer <token>'", field="authorization")
    return value


def _refuse(reason: str, message: str, field: str = "authorization") -> AuthenticationError:
    AGENT_AUTH_FAILURES.labels(reason).inc()
    return AuthenticationError(message, field=field)


class _TaskEnded(AuthenticationError):
    """401 for a genuine agent token whose task has ended; the answer names the status."""

    def __init__(self, task_status: TaskStatus) -> None:
        super().__init__(f"agent token revoked: the task is {task_status}", field="authorization")
        self.task_status = task_status


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


def create_agent_app(rg: Regional) -> QuartTrio:
    """Build the agent API app over the regional's state."""
    app = QuartTrio("lpmosd.regional")
    cfg = rg.config
    store = rg.store
    idc = cfg.idc
    max_body = cfg.max_body_bytes

    async def readiness() -> tuple[bool, dict[str, Any]]:
        # A standby is not ready: a load balancer in front of two regionals sends agents
        # to the active one.
        ok = rg.session.active and rg.machines is not None
        # Ask etcd itself (cached ~1 s): the session notices an outage only after its TTL.
        etcd_ok, etcd = await etcd_probe(rg.client).check()
        detail = {
            "role": "regional",
            "idc": idc,
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

    @app.errorhandler(_TaskEnded)
    async def _task_ended(exc: _TaskEnded) -> Response:
        AGENT_AUTH_FAILURES.labels("ended").inc()
        response = json_response(
            {"error": exc.message, "field": exc.field, "task_status": exc.task_status.value},
            401,
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="lpmosd-agent"'
        return response

    limiter = RateLimiter(cfg.rate_limit_per_second, cfg.rate_limit_burst)
    # A used secret may enrol again once the agent holding it has been this long silent.
    takeover_after = cfg.heartbeat_interval * 1.5

    @app.before_request
    async def _rate_limit() -> Response | None:
        if not request.path.startswith("/api/"):
            return None  # probes and metrics scrapers are not agents
        wait = limiter.take(request.remote_addr or "unknown")
        if wait <= 0:
            return None
        RATE_LIMITED.inc()
        response = error_response(429, "too many requests; slow down")
        response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return response

    # Admission control: at most MAX_ACTIVE_REQUESTS agent API writes run at once; the
    # others wait their turn, in arrival order. Heartbeats (they keep leases alive) are
    # exempt. An overloaded regional then queues requests instead of stretching every etcd
    # call, its own session keepalives included, past their deadlines (measured: 1,000
    # agents flat out made the session lease lapse, and with it every agent's task).
    active = trio.CapacityLimiter(MAX_ACTIVE_REQUESTS)
    inner_asgi = app.asgi_app

    async def admitted_asgi(scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope.get("type") == "http" else ""
        if (
            scope.get("method") == "POST"
            and path.startswith("/api/")
            and not path.endswith("/heartbeat")
        ):
            async with active:
                await inner_asgi(scope, receive, send)
            return
        await inner_asgi(scope, receive, send)

    app.asgi_app = admitted_asgi  # type: ignore[method-assign]

    def machines() -> PrefixView:
        view = rg.machines
        if not rg.session.running or view is None:
            raise UnavailableError("regional is restarting its etcd session; retry shortly")
        if not rg.session.active:
            raise UnavailableError(
                f"this regional is a standby for {idc}; use the active one (retry shortly)"
            )
        return view

    async def live_lease_id(sn: str) -> int | None:
        # The view may not have the lease key of a registration a moment ago yet.
        return rg.lease_id(sn) or await store.get_lease_id(idc, sn)

    def plan_view(task: Task) -> dict[str, Any] | None:
        plan = cfg.plan_for(task.os_type)
        if plan is None:
            return None
        return {
            "name": plan.os_type,
            "image": plan.image,
            "steps": [
                {
                    "name": s.name,
                    "command": list(s.command),
                    "timeout": int(s.timeout),
                    "simulate": s.simulate,
                    **({"action": s.action} if s.action is not None else {}),
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

    # --- credentials ----------------------------------------------------------------------

    def enrolment_problem(task_kv: KeyValue, enrol_kv: KeyValue | None, secret: str) -> str:
        """Why ``secret`` does not enrol an agent for this task ("" when it does)."""
        if enrol_kv is None:
            return (
                "no enrolment secret has been issued for this task; an operator can issue "
                "one (POST /api/v1/tasks/{idc}/{sn}/enrollment on the control plane)"
            )
        try:
            enrolment = Enrolment.from_json(enrol_kv.value)
        except ValidationError:
            return "the task's enrolment record is unreadable; issue a new secret"
        if not enrolment.matches(secret):
            return "wrong enrollment_secret"
        task = Task.from_json(task_kv.value)
        if enrolment.task_id != task.task_id:
            return "enrollment_secret belongs to an earlier task of this server"
        if task.status not in LIVE:
            return f"task is {task.status}: its enrolment has ended"
        return ""

    async def check_enrolment(
        view: PrefixView, sn: str, secret: str, task_kv: KeyValue
    ) -> tuple[KeyValue, KeyValue, Enrolment]:
        """The task and enrolment (fresh enough to guard a Txn) that ``secret`` opens."""
        key = schema.enrolment_key(idc, sn)
        enrol_kv = view.get(key)
        if enrolment_problem(task_kv, enrol_kv, secret):
            # The cache may lag (a task or secret issued a moment ago): decide on etcd's.
            fresh = await store.get_task(idc, sn)
            assert fresh.kv is not None
            task_kv, enrol_kv = fresh.kv, await rg.client.get(key)
            problem = enrolment_problem(task_kv, enrol_kv, secret)
            if problem:
                raise _refuse("enrolment", problem, field="enrollment_secret")
        assert enrol_kv is not None
        return task_kv, enrol_kv, Enrolment.from_json(enrol_kv.value)

    async def refuse_if_agent_alive(sn: str) -> None:
        """A used secret: 409 while the agent that used it still heartbeats."""
        lease_id = await live_lease_id(sn)
        if not lease_id:
            return
        info = await rg.client.lease_time_to_live(lease_id)
        if info is None:
            return
        silent = info.granted_ttl - info.ttl
        if silent < takeover_after:
            AGENT_AUTH_FAILURES.labels("secret_in_use").inc()
            raise ConflictError(
                f"this enrolment secret was used by an agent that is still alive (heard from "
                f"{silent}s ago); a restarted agent can enrol again once the old one has been "
                f"silent for {takeover_after:g}s",
                field="enrollment_secret",
            )

    def token_problem(token_kv: KeyValue | None, token: str) -> bool:
        if token_kv is None:
            return True
        try:
            return not AgentToken.from_json(token_kv.value).matches(token)
        except ValidationError:
            return True

    async def holds_agent_token(view: PrefixView, sn: str) -> bool:
        """Whether a register call carries the current agent token of ``sn``: the live agent
        itself registering again (e.g. after its lease expired), not a newcomer."""
        try:
            token = _bearer()
        except AuthenticationError:
            return False
        key = schema.agent_token_key(idc, sn)
        token_kv = view.get(key)
        if token_problem(token_kv, token):
            token_kv = await rg.client.get(key)
        return not token_problem(token_kv, token)

    async def authorize(view: PrefixView, sn: str) -> KeyValue:
        """Check the caller's agent token against ``sn``; returns the task's KeyValue."""
        token = _bearer()
        key = schema.agent_token_key(idc, sn)
        token_kv = view.get(key)
        if token_problem(token_kv, token):
            token_kv = await rg.client.get(key)  # registered a moment ago?
            if token_kv is None or token_problem(token_kv, token):
                other = rg.agent_tokens.get(hash_secret(token))
                if other is not None and other != sn:
                    AGENT_AUTH_FAILURES.labels("other_server").inc()
                    raise PermissionDeniedError(
                        f"this agent token belongs to another server, not {sn}", field="sn"
                    )
                raise _refuse("token", "unknown or revoked agent token; register again")
        assert token_kv is not None
        record = AgentToken.from_json(token_kv.value)
        try:
            task_kv = await ensure_task(view, sn)
            assert task_kv is not None
            task = rg.writer.task_of(task_kv)
            if task.task_id != record.task_id or task.status not in LIVE:
                # The cache may lag (the task was re-created or retried a moment ago):
                # refuse only on etcd's word.
                fresh = await store.get_task(idc, sn)
                task, task_kv = fresh.task, fresh.kv
        except NotFoundError:
            raise _refuse("ended", "the task of this agent token is gone") from None
        assert task_kv is not None
        if task.task_id != record.task_id:
            raise _refuse("ended", "the task of this agent token is gone")
        if task.status not in LIVE:
            raise _TaskEnded(task.status)
        return task_kv

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
        secret = body.get("enrollment_secret")
        if secret is None:
            raise _refuse(
                "enrolment",
                "enrollment_secret is required (from the machine's boot parameters)",
                field="enrollment_secret",
            )
        if not isinstance(secret, str) or len(secret) > MAX_SECRET_CHARS:
            raise ValidationError(
                f"enrollment_secret must be a string of at most {MAX_SECRET_CHARS} characters",
                field="enrollment_secret",
            )
        if "hardware" not in body:
            raise ValidationError("hardware is required", field="hardware")
        try:
            meta = MachineMeta.from_report(body["hardware"], now=utcnow())
        except ValidationError as exc:
            # Name the field as the client spelled it: hardware.disks[0].size_bytes.
            where = f"hardware.{exc.field}" if exc.field else "hardware"
            raise ValidationError(f"{where}: {exc.message}", field=where) from None
        current = await ensure_task(view, sn)
        assert current is not None
        current, enrol_kv, enrolment = await check_enrolment(view, sn, secret, current)
        if enrolment.mac != mac:
            raise ConflictError(f"MAC {mac} does not match the task's MAC for {sn}", field="mac")
        if enrolment.used_at is not None and not await holds_agent_token(view, sn):
            await refuse_if_agent_alive(sn)
        now = utcnow()
        record, agent_token = AgentToken.issue(task_id=enrolment.task_id, mac=mac, now=now)
        enrolment_key = schema.enrolment_key(idc, sn)
        old_lease = await live_lease_id(sn)
        lease = await rg.client.lease_grant(cfg.agent_lease_ttl)
        try:
            stored = await store.register_agent(
                idc,
                sn,
                mac=mac,
                meta=meta,
                lease_id=lease.id,
                current=current,
                credentials=(
                    put(schema.agent_token_key(idc, sn), record.to_json()),
                    put(enrolment_key, enrolment.used(now).to_json()),
                ),
                # Two registrations racing with one secret: only one commits.
                guards=(Compare.mod_revision(enrolment_key, "==", enrol_kv.mod_revision),),
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
                "agent_token": agent_token,
            }
        )

    @app.get("/api/v1/agent/<sn>/task")
    async def get_task(sn: str) -> Response:
        view = machines()
        sn = schema.validate_sn(sn)
        task = Task.from_json((await authorize(view, sn)).value)
        return json_response({"task": task_view(task), "plan": plan_view(task)})

    @app.post("/api/v1/agent/<sn>/heartbeat")
    async def heartbeat(sn: str) -> Response:
        view = machines()
        sn = schema.validate_sn(sn)
        task_kv = await authorize(view, sn)
        no_fields(await read_json(max_body, empty_ok=True))
        task = rg.writer.task_of(task_kv)
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
        task_kv = await authorize(view, sn)
        req = ProgressRequest.from_obj(await read_json(max_body))
        stored = await rg.writer.record_progress(
            idc,
            sn,
            step=req.step,
            percent=req.percent,
            message=req.message,
            current=task_kv,
            op_id=_op_id(),
        )
        observed(view, stored)
        return json_response({"status": stored.task.status.value})

    @app.post("/api/v1/agent/<sn>/logs")
    async def logs(sn: str) -> Response:
        view = machines()
        sn = schema.validate_sn(sn)
        task_kv = await authorize(view, sn)
        req = LogRequest.from_obj(await read_json(max_body))
        stored = await store.append_logs(
            idc, sn, req.lines, level=req.level, current=task_kv, op_id=_op_id()
        )
        observed(view, stored)
        return json_response({"status": stored.task.status.value})

    async def finish(
        view: PrefixView, sn: str, task_kv: KeyValue, outcome: TaskStatus, reason: str
    ) -> Response:
        lease_id = await live_lease_id(sn)
        stored = await store.finish(
            idc, sn, outcome=outcome, reason=reason, current=task_kv, op_id=_op_id()
        )
        observed(view, stored)
        await rg.revoke_quietly(lease_id)
        rg.heartbeats.pop(sn, None)
        return json_response({"status": stored.task.status.value})

    @app.post("/api/v1/agent/<sn>/complete")
    async def complete(sn: str) -> Response:
        view = machines()
        sn = schema.validate_sn(sn)
        task_kv = await authorize(view, sn)
        no_fields(await read_json(max_body, empty_ok=True))
        return await finish(view, sn, task_kv, TaskStatus.COMPLETED, "")

    @app.post("/api/v1/agent/<sn>/fail")
    async def fail(sn: str) -> Response:
        view = machines()
        sn = schema.validate_sn(sn)
        task_kv = await authorize(view, sn)
        req = FailRequest.from_obj(await read_json(max_body))
        return await finish(view, sn, task_kv, TaskStatus.FAILED, req.reason)

    # --- first boot of the installed system ("deployed means booted") ---------------------

    @app.post("/api/v1/agent/<sn>/first-boot-credential")
    async def first_boot_credential(sn: str) -> Response:
        """The agent, during post_install: a one-time credential for the new system."""
        view = machines()
        sn = schema.validate_sn(sn)
        task_kv = await authorize(view, sn)
        no_fields(await read_json(max_body, empty_ok=True))
        task = rg.writer.task_of(task_kv)
        credential = await store.issue_first_boot(idc, sn, task=task)
        return json_response({"credential": credential})

    @app.post("/api/v1/agent/<sn>/first-boot")
    async def first_boot(sn: str) -> Response:
        """The installed system, once: its first-boot credential as the bearer token."""
        view = machines()
        sn = schema.validate_sn(sn)
        credential = _bearer()
        req = FirstBootRequest.from_obj(await read_json(max_body, empty_ok=True))
        try:
            stored = await store.record_first_boot(idc, sn, credential, hostname=req.hostname)
        except AuthenticationError as exc:
            raise _refuse("first_boot", exc.message) from None
        observed(view, stored)
        first = stored.task.first_boot_at
        return json_response(
            {
                "status": stored.task.status.value,
                "first_boot_at": None if first is None else format_ts(first),
            }
        )

    return app
