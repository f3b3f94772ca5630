"""The control-plane HTTP app: the operators' REST API (``/api/v1``) and ops endpoints.

See ``lpmosd/web/openapi/control.yaml``. Every API route needs a token (or a browser
session, see :mod:`lpmosd.web.auth`): reads need ``viewer``; create, approve, cancel, retry
and enrolment secrets ``operator``; delete and token management ``admin``. The actor
recorded in a task (``created_by``, ``approval.approved_by``, ``status_history[].actor``) is
always the authenticated principal's name: an ``approved_by`` in the body is ignored (the
guide's curl still works, but nobody can approve in someone else's name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Response, request
from quart_trio import QuartTrio

from lpmosd import schema
from lpmosd.api_requests import ApproveRequest, CreateTaskRequest
from lpmosd.boot.ostypes import check_os_type
from lpmosd.documents import MAX_TEXT_CHARS, TaskStatus
from lpmosd.errors import ValidationError
from lpmosd.fields import sanitize_text
from lpmosd.task_pages import parse_limit
from lpmosd.timestamps import utcnow
from lpmosd.tokens import Role, parse_expiry, validate_token_name
from lpmosd.web.auth import csrf_token, current_principal, install_auth, require_role
from lpmosd.web.common import install_common, json_response, metrics_response, read_json
from lpmosd.web.dashboard import install_dashboard
from lpmosd.web.ops import etcd_probe

if TYPE_CHECKING:
    from lpmosd.roles.control_plane import ControlPlane

_ACTION_FIELDS = frozenset({"reason"})
_TOKEN_FIELDS = frozenset({"name", "role", "expires"})


def _actor() -> str:
    """Who is acting: the authenticated principal."""
    return current_principal().name


def _token_request(body: object) -> tuple[str, Role, object]:
    if not isinstance(body, dict):
        raise ValidationError("body must be a JSON object", field="body")
    for key in body:
        if key not in _TOKEN_FIELDS:
            raise ValidationError(f"unknown field {key!r}", field=str(key))
    if "name" not in body:
        raise ValidationError("name is required", field="name")
    if "role" not in body:
        raise ValidationError("role is required", field="role")
    return validate_token_name(body["name"]), Role.parse(body["role"]), body.get("expires")


def _status_filter(value: str | None) -> TaskStatus | None:
    if value is None or value == "":
        return None
    try:
        return TaskStatus(value)
    except ValueError:
        raise ValidationError(
            f"status must be one of {', '.join(s.value for s in TaskStatus)}", field="status"
        ) from None


def _reason(body: object) -> str:
    if not isinstance(body, dict):
        raise ValidationError("body must be a JSON object", field="body")
    for key in body:
        if key not in _ACTION_FIELDS:
            raise ValidationError(f"unknown field {key!r}", field=str(key))
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 2000:
        raise ValidationError("reason must be a string of at most 2000 characters", "reason")
    return sanitize_text(reason, MAX_TEXT_CHARS)


def create_control_app(cp: ControlPlane) -> QuartTrio:
    """Build the control-plane app over the role's state."""
    app = QuartTrio("lpmosd.control_plane")
    store = cp.store
    max_body = cp.config.max_body_bytes

    async def readiness() -> tuple[bool, dict[str, Any]]:
        ok = cp.session.running and cp.view is not None
        # Ask etcd itself (cached ~1 s): the session notices an outage only after its TTL.
        etcd_ok, etcd = await etcd_probe(cp.client).check()
        # A standby control plane is ready: the API and dashboard work on every instance.
        detail = {
            "role": "control-plane",
            "session": cp.session.state,
            "leadership": cp.session.leadership,
            "etcd": etcd,
        }
        return ok and etcd_ok, detail

    public_metrics = cp.config.metrics_public
    install_common(
        app,
        name="control-plane",
        readiness=readiness,
        max_body=max_body,
        metrics=public_metrics,
    )
    install_auth(app, cp.tokens, secure_cookies=cp.config.tls_cert_file is not None)
    install_dashboard(app, cp)
    tokens = cp.tokens

    if not public_metrics:

        @app.get("/metrics")
        @require_role(Role.VIEWER)
        async def metrics() -> Response:
            return await metrics_response()

    @app.get("/api/v1/whoami")
    @require_role(Role.VIEWER)
    async def whoami() -> Response:
        principal = current_principal()
        body = {"name": principal.name, "role": principal.role.label}
        if csrf := csrf_token():
            # A browser session's scripts read it here (same origin only: no CORS).
            body["csrf_token"] = csrf
        return json_response(body)

    @app.post("/api/v1/tasks")
    @require_role(Role.OPERATOR)
    async def create_task() -> Response:
        req = CreateTaskRequest.from_obj(await read_json(max_body))
        check_os_type(req.os_type, req.idc, await store.get_os_types(req.idc))
        task, secret = await store.create_enrolled_task(req, actor=_actor())
        # The secret is shown this once (it is stored hashed): for the boot parameters.
        return json_response({**task.to_dict(), "enrollment_secret": secret}, 201)

    @app.get("/api/v1/tasks")
    @require_role(Role.VIEWER)
    async def list_tasks() -> Response:
        idc_arg = request.args.get("idc")
        idc = schema.validate_idc(idc_arg) if idc_arg else None
        status = _status_filter(request.args.get("status"))
        token = request.args.get("continue") or None
        limit = parse_limit(request.args.get("limit"), continuing=token is not None)
        metadata: dict[str, str] = {}
        if limit is None:
            # No limit: the whole list in one answer, as before paging existed.
            tasks = await store.list_tasks(idc=idc, status=status)
        else:
            page = await store.list_task_page(
                idc=idc, status=status, limit=limit, continue_token=token
            )
            tasks = page.tasks
            metadata["resourceVersion"] = str(page.revision)
            if page.continue_token is not None:
                metadata["continue"] = page.continue_token
        listed = [{**t.to_dict(), **cp.agent_state(t.idc, t.sn)} for t in tasks]
        return json_response({"tasks": listed, "count": len(tasks), "metadata": metadata})

    @app.get("/api/v1/tasks/<idc>/<sn>")
    @require_role(Role.VIEWER)
    async def get_task(idc: str, sn: str) -> Response:
        idc, sn = schema.validate_idc(idc), schema.validate_sn(sn)
        stored = await store.get_task(idc, sn)
        return json_response({**stored.task.to_dict(), **cp.agent_state(idc, sn)})

    @app.post("/api/v1/tasks/<idc>/<sn>/approve")
    @require_role(Role.OPERATOR)
    async def approve(idc: str, sn: str) -> Response:
        idc, sn = schema.validate_idc(idc), schema.validate_sn(sn)
        # ``approved_by`` in the body is validated but ignored: the approver is whoever
        # authenticated (compatible with the guide's curl, unforgeable).
        req = ApproveRequest.from_obj(await read_json(max_body, empty_ok=True))
        task = await store.approve(idc, sn, approved_by=_actor(), notes=req.notes)
        return json_response(task.to_dict())

    @app.post("/api/v1/tasks/<idc>/<sn>/cancel")
    @require_role(Role.OPERATOR)
    async def cancel(idc: str, sn: str) -> Response:
        idc, sn = schema.validate_idc(idc), schema.validate_sn(sn)
        reason = _reason(await read_json(max_body, empty_ok=True))
        task = await store.cancel(idc, sn, actor=_actor(), reason=reason)
        return json_response(task.to_dict())

    @app.post("/api/v1/tasks/<idc>/<sn>/retry")
    @require_role(Role.OPERATOR)
    async def retry(idc: str, sn: str) -> Response:
        idc, sn = schema.validate_idc(idc), schema.validate_sn(sn)
        _reason(await read_json(max_body, empty_ok=True))
        task, secret = await store.retry_enrolled(idc, sn, actor=_actor())
        return json_response({**task.to_dict(), "enrollment_secret": secret})

    @app.post("/api/v1/tasks/<idc>/<sn>/enrollment")
    @require_role(Role.OPERATOR)
    async def reissue_enrollment(idc: str, sn: str) -> Response:
        idc, sn = schema.validate_idc(idc), schema.validate_sn(sn)
        body = await read_json(max_body, empty_ok=True)
        if not isinstance(body, dict) or body:
            raise ValidationError("body must be empty or {}", field="body")
        task, secret = await store.reissue_enrolment(idc, sn, actor=_actor())
        return json_response(
            {"idc": idc, "sn": sn, "task_id": task.task_id, "enrollment_secret": secret}
        )

    @app.delete("/api/v1/tasks/<idc>/<sn>")
    @require_role(Role.ADMIN)
    async def delete_task(idc: str, sn: str) -> Response:
        idc, sn = schema.validate_idc(idc), schema.validate_sn(sn)
        await store.delete_task(idc, sn)
        return json_response({"deleted": True, "idc": idc, "sn": sn})

    @app.get("/api/v1/servers")
    @require_role(Role.VIEWER)
    async def list_servers() -> Response:
        idc_arg = request.args.get("idc")
        if not idc_arg:
            raise ValidationError("idc is required", field="idc")
        servers = await store.list_servers(schema.validate_idc(idc_arg))
        return json_response({"servers": [s.to_dict() for s in servers], "count": len(servers)})

    # --- operator tokens (admin) ------------------------------------------------------

    @app.get("/api/v1/tokens")
    @require_role(Role.ADMIN)
    async def list_tokens() -> Response:
        now = utcnow()
        records = [r.public_dict(now) for r in await tokens.list()]
        return json_response({"tokens": records, "count": len(records)})

    @app.post("/api/v1/tokens")
    @require_role(Role.ADMIN)
    async def create_token() -> Response:
        name, role, expires = _token_request(await read_json(max_body))
        record, token = await tokens.create(
            name, role, actor=_actor(), expires_in=parse_expiry(expires)
        )
        # The token is shown this once; only its hash is stored.
        return json_response({**record.public_dict(utcnow()), "token": token}, 201)

    @app.delete("/api/v1/tokens/<name>")
    @require_role(Role.ADMIN)
    async def revoke_token(name: str) -> Response:
        record = await tokens.revoke(validate_token_name(name), actor=_actor())
        return json_response(record.public_dict(utcnow()))

    return app
