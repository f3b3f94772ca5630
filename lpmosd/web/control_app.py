"""The control-plane HTTP app: the operators' REST API (``/api/v1``) and ops endpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Response, request
from quart_trio import QuartTrio

from lpmosd import schema
from lpmosd.errors import ValidationError
from lpmosd.models import ApproveRequest, CreateTaskRequest, TaskStatus, sanitize_text
from lpmosd.web.common import install_common, json_response, read_json

if TYPE_CHECKING:
    from lpmosd.roles.control_plane import ControlPlane

_ACTION_FIELDS = frozenset({"reason"})


def _actor() -> str:
    """Who is acting. Without authentication configured everyone is "anonymous"."""
    return "anonymous"


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
    return sanitize_text(reason)


def create_control_app(cp: ControlPlane) -> QuartTrio:
    """Build the control-plane app over the role's state."""
    app = QuartTrio("lpmosd.control_plane")
    store = cp.store
    max_body = cp.config.max_body_bytes

    async def readiness() -> tuple[bool, dict[str, Any]]:
        ok = cp.session.running and cp.view is not None
        return ok, {"role": "control-plane", "session": cp.session.state}

    install_common(app, name="control-plane", readiness=readiness, max_body=max_body)

    @app.post("/api/v1/tasks")
    async def create_task() -> Response:
        req = CreateTaskRequest.from_obj(await read_json(max_body))
        task = await store.create_task(req, actor=_actor())
        return json_response(task.to_dict(), 201)

    @app.get("/api/v1/tasks")
    async def list_tasks() -> Response:
        idc_arg = request.args.get("idc")
        idc = schema.validate_idc(idc_arg) if idc_arg else None
        status = _status_filter(request.args.get("status"))
        tasks = await store.list_tasks(idc=idc, status=status)
        return json_response({"tasks": [t.to_dict() for t in tasks], "count": len(tasks)})

    @app.get("/api/v1/tasks/<idc>/<sn>")
    async def get_task(idc: str, sn: str) -> Response:
        stored = await store.get_task(schema.validate_idc(idc), schema.validate_sn(sn))
        return json_response(stored.task.to_dict())

    @app.post("/api/v1/tasks/<idc>/<sn>/approve")
    async def approve(idc: str, sn: str) -> Response:
        idc, sn = schema.validate_idc(idc), schema.validate_sn(sn)
        req = ApproveRequest.from_obj(await read_json(max_body, empty_ok=True))
        task = await store.approve(
            idc, sn, approved_by=req.approved_by or _actor(), notes=req.notes
        )
        return json_response(task.to_dict())

    @app.post("/api/v1/tasks/<idc>/<sn>/cancel")
    async def cancel(idc: str, sn: str) -> Response:
        idc, sn = schema.validate_idc(idc), schema.validate_sn(sn)
        reason = _reason(await read_json(max_body, empty_ok=True))
        task = await store.cancel(idc, sn, actor=_actor(), reason=reason)
        return json_response(task.to_dict())

    @app.post("/api/v1/tasks/<idc>/<sn>/retry")
    async def retry(idc: str, sn: str) -> Response:
        idc, sn = schema.validate_idc(idc), schema.validate_sn(sn)
        _reason(await read_json(max_body, empty_ok=True))
        task = await store.retry(idc, sn, actor=_actor())
        return json_response(task.to_dict())

    @app.delete("/api/v1/tasks/<idc>/<sn>")
    async def delete_task(idc: str, sn: str) -> Response:
        idc, sn = schema.validate_idc(idc), schema.validate_sn(sn)
        await store.delete_task(idc, sn)
        return json_response({"deleted": True, "idc": idc, "sn": sn})

    @app.get("/api/v1/servers")
    async def list_servers() -> Response:
        idc_arg = request.args.get("idc")
        if not idc_arg:
            raise ValidationError("idc is required", field="idc")
        servers = await store.list_servers(schema.validate_idc(idc_arg))
        return json_response({"servers": [s.to_dict() for s in servers], "count": len(servers)})

    return app
