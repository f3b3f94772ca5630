"""The operators' dashboard on the control plane's port: tasks table, create form, task page.

Pages render from the :class:`~lpmosd.web.live.LiveHub` (the control plane's watched view),
never from per-request etcd reads, and update in place from ``/events`` (server-sent
events from the same hub). Viewers see everything; operators also get the action forms
(create, approve, cancel, retry); admins may delete finished tasks. Every state-changing
form carries a CSRF token, every value is HTML-escaped by Jinja's autoescape, and pages are
sent with a Content-Security-Policy that allows no inline script or style.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode

import trio
from quart import Blueprint, Response, render_template, request, url_for
from quart_trio import QuartTrio

from lpmosd import schema
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.boot.ostypes import OsTypes, check_os_type
from lpmosd.documents import MachineMeta, Task, TaskStatus
from lpmosd.errors import EtcdError, InputError, NotFoundError, UnavailableError, ValidationError
from lpmosd.etcd import leader_of
from lpmosd.timestamps import format_ts
from lpmosd.view import PrefixView
from lpmosd.web.auth import (
    Role,
    check_csrf,
    csrf_token,
    current_principal,
    require_page_role,
    require_role,
)
from lpmosd.web.live import (
    LiveHub,
    log_delta,
    machine_id,
    parse_event_id,
    task_detail,
    task_summary,
)
from lpmosd.web.ops import ROLE_METRICS
from lpmosd.web.pages import CSP, format_bytes, page_headers
from lpmosd.web.table_pages import table_page

if TYPE_CHECKING:
    from lpmosd.roles.control_plane import ControlPlane

log = logging.getLogger("lpmosd.dashboard")

#: Seconds between SSE comments that keep idle connections (and proxies) open.
KEEPALIVE: Final = 15.0
#: At most one ``counts`` event per this many seconds per tasks-table stream.
COUNTS_INTERVAL: Final = 1.0
#: How long an enrolment secret waits to be shown (seconds), and how many may wait.
SECRET_TTL: Final = 600.0
MAX_SECRETS: Final = 1000
#: How long a page waits for the hub to show the operator's own write (read-your-writes).
OWN_WRITE_WAIT: Final = 2.0

#: The create form: (field, label, placeholder, suggestions).
CREATE_FIELDS: Final = (
    ("idc", "IDC", "dc1", ()),
    ("sn", "Serial number", "sn-001", ()),
    ("mac", "MAC address", "00:1a:2b:3c:4d:5e", ()),
    # The choices are what the IDCs' regionals publish (see _create_fields).
    ("os_type", "OS", "debian-12", ()),
    ("os_version", "OS version", "22.04", ()),
    ("disk_layout", "Disk layout", "auto", ("auto", "lvm", "raid1", "raid10")),
    ("network_config", "Network config", "dhcp", ("dhcp", "static", "bond")),
)
_REQUIRED: Final = frozenset({"idc", "sn", "mac", "os_type"})
_DEFAULTS: Final = {"disk_layout": "auto", "network_config": "dhcp"}

#: Which actions a status allows (the state machine of lpmosd.lifecycle).
ACTIONS_BY_STATUS: Final[dict[str, tuple[str, ...]]] = {
    "pending": ("approve", "cancel", "enrolment"),
    "approved": ("cancel", "enrolment"),
    "installing": ("cancel", "enrolment"),
    "failed": ("retry", "delete"),
    "completed": ("delete",),
    "cancelled": ("delete",),
}


def _statuses() -> list[str]:
    return [s.value for s in TaskStatus]


class OneTimeSecrets:
    """Enrolment secrets waiting to be shown once, on the next page of the same session.

    A secret exists in clear only in the response to the operator who made it. The form
    posts redirect (303) to the task page, so the secret waits here, keyed by the browser
    session's CSRF token (a per-session secret) and the machine, until that page is shown
    — at most :data:`SECRET_TTL` seconds and :data:`MAX_SECRETS` entries.
    """

    def __init__(self) -> None:
        self._items: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def put(self, session: str, machine: str, secret: str) -> None:
        """Keep ``secret`` for the session's next view of ``machine``."""
        if not session:
            return
        self._items[(session, machine)] = (secret, trio.current_time() + SECRET_TTL)
        while len(self._items) > MAX_SECRETS:
            self._items.popitem(last=False)

    def pop(self, session: str, machine: str) -> str | None:
        """The waiting secret (forgotten as it is returned), if any and not expired."""
        found = self._items.pop((session, machine), None)
        if found is None or trio.current_time() > found[1]:
            return None
        return found[0]


def os_type_choices(view: PrefixView | None) -> tuple[str, ...]:
    """Every OS type some IDC's regional published (``/os/{idc}/os-types``), sorted."""
    if view is None:
        return ()
    names: set[str] = set()
    for key, kv in view.items.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == "os-types":
            try:
                names.update(OsTypes.from_json(kv.value).os_types)
            except ValidationError:
                continue
    return tuple(sorted(names))


def _create_fields(view: PrefixView | None) -> tuple[tuple[str, str, str, tuple[str, ...]], ...]:
    choices = os_type_choices(view)
    return tuple(
        (name, label, placeholder, choices if name == "os_type" else suggestions)
        for name, label, placeholder, suggestions in CREATE_FIELDS
    )


def _cursor(value: str | None) -> str:
    """A page cursor (``?after=`` / ``?before=``): a machine id, else "" (the first page)."""
    if not value:
        return ""
    idc, _, sn = value.partition("/")
    if schema.NAME_RE.fullmatch(idc) is None or schema.NAME_RE.fullmatch(sn) is None:
        return ""
    return value


def _machine_arg(value: str | None) -> str | None:
    """Validate ``?machine=idc/sn`` (it only selects events, but keep names clean)."""
    if not value:
        return None
    idc, _, sn = value.partition("/")
    return machine_id(schema.validate_idc(idc), schema.validate_sn(sn))


def install_dashboard(app: QuartTrio, cp: ControlPlane) -> LiveHub:
    """Add the dashboard pages and ``/events`` to the control-plane app; returns its hub."""
    hub = LiveHub()
    ROLE_METRICS.add_hub(hub)
    ROLE_METRICS.add_session(cp.session)
    cp.view_hooks.append(hub.load)
    cp.unreachable_hooks.append(hub.set_unreachable)
    if cp.view is not None:
        hub.attach(cp.view)
    store = cp.store
    secrets = OneTimeSecrets()
    bp = Blueprint(
        "dashboard",
        __name__,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static/dashboard",
    )
    bp.after_request(page_headers)
    bp.add_app_template_filter(format_bytes, "bytes")
    bp.add_app_template_filter(format_ts, "ts")

    def context(**extra: Any) -> dict[str, Any]:
        principal = current_principal()
        return {
            "principal": principal,
            "can_operate": principal.role >= Role.OPERATOR,
            "can_admin": principal.role >= Role.ADMIN,
            "csrf": csrf_token(),
            "hub_live": hub.live and cp.view is not None,
            "leadership": cp.session.leadership,
            "since": hub.last_id,
            "statuses": _statuses(),
            **extra,
        }

    # ------------------------------------------------------------------ tasks table

    @bp.get("/")
    @require_page_role(Role.VIEWER)
    async def index() -> str:
        idc = request.args.get("idc", "")
        status = request.args.get("status", "")
        if idc and schema.NAME_RE.fullmatch(idc) is None:
            idc = ""
        if status not in _statuses():
            status = ""
        # Cursors are machine ids; anything else starts at the first page.
        after, before = _cursor(request.args.get("after")), _cursor(request.args.get("before"))
        page = table_page(hub, idc=idc, status=status, after=after, before=before)
        rows = []
        for m in page.machines:
            state = hub.machines[m]
            assert state.task is not None
            rows.append(
                task_summary(
                    state.task, agent_online=state.agent_online, unreachable=state.unreachable
                )
            )
        all_counts = hub.counts_dict()
        counts = {s: 0 for s in _statuses()}
        for name, per_idc in all_counts.items():
            if not idc or name == idc:
                for s, n in per_idc.items():
                    counts[s] += n

        def query(**changes: str) -> str:
            args = {"idc": idc, "status": status, **changes}
            return urlencode({k: v for k, v in args.items() if v})

        # The live stream sends this page's rows only: from its first row (open on the
        # first page) to its last (open on the last page, so new tasks appear there).
        window = {
            "from": rows[0]["key"] if rows and page.has_prev else "",
            "to": rows[-1]["key"] if rows and page.has_next else "",
        }
        return await render_template(
            "dashboard/index.html",
            **context(
                rows=rows,
                counts=counts,
                total=sum(counts.values()),
                matching=counts[status] if status else sum(counts.values()),
                page=page,
                window=window,
                idcs=sorted(all_counts),
                idc=idc,
                status=status,
                query=query,
            ),
        )

    # ------------------------------------------------------------------ create

    async def create_form(
        values: dict[str, str], errors: dict[str, str], status: int = 200
    ) -> tuple[str, int]:
        fields = _create_fields(cp.view)
        page = await render_template(
            "dashboard/create.html",
            **context(fields=fields, values=values, errors=errors, required=_REQUIRED),
        )
        return page, status

    @bp.get("/tasks/create")
    @require_page_role(Role.OPERATOR)
    async def create_page() -> tuple[str, int]:
        return await create_form(dict(_DEFAULTS), {})

    @bp.post("/tasks/create")
    @require_page_role(Role.OPERATOR)
    async def create_submit() -> Response | tuple[str, int]:
        await check_csrf()
        form = await request.form
        values = {name: form.get(name, "").strip() for name, *_ in CREATE_FIELDS}
        # Empty optional fields take the API's defaults, as the curl body would.
        body = {k: v for k, v in values.items() if v or k in _REQUIRED}
        try:
            req = CreateTaskRequest.from_obj(body)
            check_os_type(req.os_type, req.idc, await store.get_os_types(req.idc))
            task, secret = await store.create_enrolled_task(req, actor=current_principal().name)
        except InputError as exc:
            field = exc.field if exc.field in values else "_form"
            return await create_form(values, {field: exc.message}, exc.status)
        except (EtcdError, UnavailableError) as exc:
            log.warning("create from dashboard failed", extra={"error": str(exc)})
            return await create_form(values, {"_form": "etcd is unavailable; try again"}, 503)
        log.info(
            "task created from the dashboard",
            extra={"idc": task.idc, "sn": task.sn, "by": current_principal().name},
        )
        secrets.put(csrf_token(), machine_id(task.idc, task.sn), secret)
        await _wait_own_write(hub, task)
        return _see_other(url_for(".task_page", idc=task.idc, sn=task.sn))

    # ------------------------------------------------------------------ task page

    async def task_page_response(
        idc: str, sn: str, *, error: str | None = None, status: int = 200
    ) -> tuple[str, int]:
        since = hub.last_id
        state = hub.machine(idc, sn)
        task: Task | None = state.task if state else None
        meta: MachineMeta | None = state.meta if state else None
        online = state.agent_online if state else False
        unreachable = state.unreachable if state else False
        if task is None:
            # The hub may lag a task created a moment ago (or etcd was away): ask once.
            # Events after ``since`` re-deliver it, which the page applies idempotently.
            try:
                task = (await store.get_task(idc, sn)).task
            except NotFoundError:
                page = await render_template(
                    "dashboard/missing.html", **context(idc=idc, sn=sn, since=since)
                )
                return page, 404
            meta = await store.get_meta(idc, sn)
        page = await render_template(
            "dashboard/task.html",
            **context(
                since=since,
                task=task,
                summary=task_summary(task, agent_online=online, unreachable=unreachable),
                detail=task_detail(task),
                logs=log_delta(task, None),
                meta=meta,
                actions=ACTIONS_BY_STATUS,
                allowed=ACTIONS_BY_STATUS[task.status.value],
                error=error,
                machine=machine_id(idc, sn),
                # Shown once: only on the page right after the action that made it.
                enrolment_secret=secrets.pop(csrf_token(), machine_id(idc, sn)),
                regional_url=_regional_url(cp, idc),
            ),
        )
        return page, status

    @bp.get("/tasks/<idc>/<sn>")
    @require_page_role(Role.VIEWER)
    async def task_page(idc: str, sn: str) -> tuple[str, int]:
        idc, sn = schema.validate_idc(idc), schema.validate_sn(sn)
        return await task_page_response(idc, sn)

    async def act(
        idc: str, sn: str, action: Callable[[str, str], Any]
    ) -> Response | tuple[str, int]:
        """Run one state change; redirect (303) to the task page, or show why not."""
        await check_csrf()
        idc, sn = schema.validate_idc(idc), schema.validate_sn(sn)
        try:
            result = await action(idc, sn)
        except InputError as exc:
            return await task_page_response(idc, sn, error=exc.message, status=exc.status)
        except (EtcdError, UnavailableError) as exc:
            log.warning("dashboard action failed", extra={"error": str(exc)})
            return await task_page_response(
                idc, sn, error="etcd is unavailable; try again", status=503
            )
        if isinstance(result, tuple):
            result, secret = result
            secrets.put(csrf_token(), machine_id(idc, sn), secret)
        if isinstance(result, Task):
            await _wait_own_write(hub, result)
            return _see_other(url_for(".task_page", idc=idc, sn=sn))
        await hub.wait_for(lambda: hub.machine(idc, sn) is None, OWN_WRITE_WAIT)
        return _see_other(url_for(".index"))

    async def form_text(name: str, limit: int = 2000) -> str:
        value: str = (await request.form).get(name, "")
        if len(value) > limit:
            raise InputError(f"{name} must be at most {limit} characters", field=name)
        return value

    @bp.post("/tasks/<idc>/<sn>/approve")
    @require_page_role(Role.OPERATOR)
    async def approve(idc: str, sn: str) -> Response | tuple[str, int]:
        async def do(idc: str, sn: str) -> Task:
            notes = await form_text("notes")
            return await store.approve(idc, sn, approved_by=current_principal().name, notes=notes)

        return await act(idc, sn, do)

    @bp.post("/tasks/<idc>/<sn>/cancel")
    @require_page_role(Role.OPERATOR)
    async def cancel(idc: str, sn: str) -> Response | tuple[str, int]:
        async def do(idc: str, sn: str) -> Task:
            reason = await form_text("reason")
            return await store.cancel(idc, sn, actor=current_principal().name, reason=reason)

        return await act(idc, sn, do)

    @bp.post("/tasks/<idc>/<sn>/retry")
    @require_page_role(Role.OPERATOR)
    async def retry(idc: str, sn: str) -> Response | tuple[str, int]:
        async def do(idc: str, sn: str) -> tuple[Task, str]:
            # A retried install re-enrols: the machine gets a fresh secret.
            return await store.retry_enrolled(idc, sn, actor=current_principal().name)

        return await act(idc, sn, do)

    @bp.post("/tasks/<idc>/<sn>/enrolment")
    @require_page_role(Role.OPERATOR)
    async def reissue(idc: str, sn: str) -> Response | tuple[str, int]:
        async def do(idc: str, sn: str) -> tuple[Task, str]:
            return await store.reissue_enrolment(idc, sn, actor=current_principal().name)

        return await act(idc, sn, do)

    @bp.post("/tasks/<idc>/<sn>/delete")
    @require_page_role(Role.ADMIN)
    async def delete(idc: str, sn: str) -> Response | tuple[str, int]:
        async def do(idc: str, sn: str) -> None:
            await store.delete_task(idc, sn)
            log.info(
                "task deleted from the dashboard",
                extra={"idc": idc, "sn": sn, "by": current_principal().name},
            )

        return await act(idc, sn, do)

    # ------------------------------------------------------------------ events

    @bp.get("/events")
    @require_role(Role.VIEWER)
    async def events() -> Response:
        machine = _machine_arg(request.args.get("machine"))
        # A table page's rows: machines from ``from`` to ``to`` (empty: unbounded).
        lo = _cursor(request.args.get("from")) or None
        hi = _cursor(request.args.get("to")) or None
        # On reconnect the browser sends the last id it got; a fresh page passes ?since=.
        since = parse_event_id(request.headers.get("Last-Event-ID")) or parse_event_id(
            request.args.get("since")
        )
        hub.check_capacity()  # refuse (503) before the stream starts

        async def stream() -> AsyncIterator[bytes]:
            # Subscribing inside the body: the hub forgets us whenever the body ends,
            # including when the browser goes away (quart closes the generator).
            with hub.subscribe(machine=machine, since=since, lo=lo, hi=hi) as sub:
                # No id on this one: it must not move the browser's Last-Event-ID.
                live = json.dumps({"live": hub.live and cp.view is not None})
                yield f"retry: 2000\nevent: hello\ndata: {live}\n\n".encode()
                for old in sub.backlog:
                    yield old.encode()
                table = machine is None
                counts_sent, counts_due = -1, 0.0
                last_sent = trio.current_time()
                while True:
                    now = trio.current_time()
                    if table and counts_sent != hub.counts_version and now >= counts_due:
                        # Counts move with every machine, most of them on other pages: at
                        # most one ``counts`` frame per COUNTS_INTERVAL, not one each.
                        counts_sent, counts_due = hub.counts_version, now + COUNTS_INTERVAL
                        yield hub.counts_frame().encode()
                        last_sent = now
                    frame: str | None = None
                    with trio.move_on_after(COUNTS_INTERVAL if table else KEEPALIVE):
                        try:
                            frame = await sub.receive.receive()
                        except trio.EndOfChannel:
                            return  # too slow, or reset: the browser reconnects
                    if frame is not None:
                        yield frame.encode()
                        last_sent = trio.current_time()
                    elif trio.current_time() - last_sent >= KEEPALIVE:
                        yield b": keepalive\n\n"
                        last_sent = trio.current_time()

        resp = Response(stream(), content_type="text/event-stream")
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
        resp.timeout = None  # an event stream lasts as long as the page
        return resp

    @app.after_request
    async def _html_csp(resp: Response) -> Response:
        # Pages outside the blueprint (the login page rendered from our template) too.
        if resp.mimetype == "text/html":
            resp.headers.setdefault("Content-Security-Policy", CSP)
        return resp

    app.register_blueprint(bp)
    return hub


def _regional_url(cp: ControlPlane, idc: str) -> str | None:
    """The agent API URL the IDC's active regional announced in its session key, if any."""
    view = cp.view
    if view is None:
        return None
    prefix = schema.regional_election_prefix(idc)
    kv = leader_of([kv for key, kv in list(view.items.items()) if key.startswith(prefix)])
    if kv is None:
        return None
    try:
        url = json.loads(kv.value).get("url")
    except (ValueError, AttributeError):
        return None
    return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None


def _see_other(location: str) -> Response:
    """303: after a form post the browser GETs the result (no re-post on reload)."""
    resp = Response("", status=303)
    resp.headers["Location"] = location
    return resp


async def _wait_own_write(hub: LiveHub, task: Task) -> None:
    """Let the hub catch up with a write this request made, so the next page shows it."""
    key = machine_id(task.idc, task.sn)

    def caught_up() -> bool:
        state = hub.machines.get(key)
        t = state.task if state else None
        # Every write appends a log line, so the absolute log end orders versions.
        return (
            t is not None
            and t.task_id == task.task_id
            and t.logs_dropped + len(t.logs) >= task.logs_dropped + len(task.logs)
        )

    await hub.wait_for(caught_up, OWN_WRITE_WAIT)
