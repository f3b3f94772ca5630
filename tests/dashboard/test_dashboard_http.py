"""The dashboard and the ops endpoints at the HTTP level, against real etcd.

Forms (validation next to the field, CSRF), roles (viewers see, operators act), escaping,
the Content-Security-Policy, live events with resume by ``Last-Event-ID``, the regional
status page and the Prometheus exposition.
"""

from __future__ import annotations

import re
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lpmosd.agent.client import AgentClient
from lpmosd.documents import TaskStatus

from .kit import FACTS, MAC, TIMEOUT, DaemonThread, login, read_events, since_of

FORM = {"idc": "dc1", "sn": "sn-001", "mac": MAC, "os_type": "demo", "os_version": "1"}


def keyspace(daemon: DaemonThread) -> dict[bytes, bytes]:
    async def read() -> dict[bytes, bytes]:
        r = await daemon.daemon.client.range(b"\0", range_end=b"\0")
        return {kv.key: kv.value for kv in r.kvs}

    return daemon.call(read)


def create(http: httpx.Client, csrf: str, **changes: str) -> httpx.Response:
    return http.post("/tasks/create", data={**FORM, **changes, "csrf_token": csrf})


def test_pages_need_a_login(daemon: DaemonThread) -> None:
    with httpx.Client(base_url=daemon.control_url, timeout=TIMEOUT) as http:
        for path in ("/", "/tasks/create", "/tasks/dc1/sn-001"):
            r = http.get(path)
            assert r.status_code == 303, path
            assert r.headers["location"].startswith("/login?next=")
        assert http.get("/events").status_code == 401
        r = http.post("/tasks/create", data=FORM)
        assert r.status_code == 303  # to the login page; nothing created
        assert http.get("/login").status_code == 200


def test_create_form_validates_next_to_the_field_and_redirects(
    daemon: DaemonThread, operator: tuple[httpx.Client, str]
) -> None:
    http, csrf = operator
    before = keyspace(daemon)
    r = create(http, csrf, mac="00:1a:2b:3c:4d")
    assert r.status_code == 400
    assert re.search(r'data-error-for="mac">[^<]*MAC', r.text), r.text
    assert 'value="00:1a:2b:3c:4d"' in r.text  # what was typed is kept
    r = create(http, csrf, sn="../etc")
    assert r.status_code == 400 and 'data-error-for="sn"' in r.text
    assert keyspace(daemon) == before

    r = create(http, csrf, mac="00-1A-2B-3C-4D-5E", disk_layout="", network_config="")
    assert r.status_code == 303
    assert r.headers["location"] == "/tasks/dc1/sn-001"
    page = http.get(r.headers["location"])
    assert page.status_code == 200
    # The enrolment secret is shown once, on this page only.
    secret = re.search(r'id="enrolment-secret">(lpe_[^<]+)<', page.text)
    assert secret is not None, page.text
    assert secret.group(1) not in http.get("/tasks/dc1/sn-001").text
    task = daemon.call(daemon.store.get_task, "dc1", "sn-001").task
    assert (task.mac, task.disk_layout, task.network_config) == (MAC, "auto", "dhcp")
    assert task.created_by == "alice"

    r = create(http, csrf)  # the same machine again: 409 next to sn
    assert r.status_code == 409 and 'data-error-for="sn"' in r.text


def test_a_post_without_the_csrf_token_is_refused(
    daemon: DaemonThread, operator: tuple[httpx.Client, str], api: httpx.Client
) -> None:
    http, csrf = operator
    before = keyspace(daemon)
    assert http.post("/tasks/create", data=FORM).status_code == 403
    assert http.post("/tasks/create", data={**FORM, "csrf_token": csrf + "x"}).status_code == 403
    assert keyspace(daemon) == before
    assert api.post("/api/v1/tasks", json=FORM).status_code == 201
    before = keyspace(daemon)
    for action in ("approve", "cancel", "enrolment"):
        r = http.post(f"/tasks/dc1/sn-001/{action}", data={"notes": "x", "reason": "x"})
        assert r.status_code == 403, action
    assert keyspace(daemon) == before
    r = http.post("/tasks/dc1/sn-001/cancel", data={"reason": "no", "csrf_token": csrf})
    assert r.status_code == 303
    assert daemon.call(daemon.store.get_task, "dc1", "sn-001").task.status == "cancelled"


def test_viewers_see_no_actions_and_may_not_act(
    daemon: DaemonThread, viewer_token: str, api: httpx.Client
) -> None:
    assert api.post("/api/v1/tasks", json=FORM).status_code == 201
    with httpx.Client(base_url=daemon.control_url, timeout=TIMEOUT) as http:
        csrf = login(http, viewer_token)
        page = http.get("/tasks/dc1/sn-001")
        assert page.status_code == 200
        assert "data-action=" not in page.text and "New task" not in page.text
        assert '<span id="leadership"' in page.text and ">active</span>" in page.text
        r = http.post("/tasks/dc1/sn-001/approve", data={"csrf_token": csrf})
        assert r.status_code == 403
        assert http.get("/tasks/create").status_code == 403
    assert daemon.call(daemon.store.get_task, "dc1", "sn-001").task.status == "pending"


def test_operator_actions_record_the_principal(
    daemon: DaemonThread, operator: tuple[httpx.Client, str], api: httpx.Client
) -> None:
    http, csrf = operator
    assert api.post("/api/v1/tasks", json=FORM).status_code == 201
    page = http.get("/tasks/dc1/sn-001").text
    assert 'data-action="approve"' in page
    assert 'data-action="delete"' not in page  # admins only
    r = http.post(
        "/tasks/dc1/sn-001/approve", data={"notes": "Hardware <verified>", "csrf_token": csrf}
    )
    assert r.status_code == 303
    page = http.get("/tasks/dc1/sn-001").text
    assert "Hardware &lt;verified&gt;" in page and "Hardware <verified>" not in page
    task = daemon.call(daemon.store.get_task, "dc1", "sn-001").task
    assert task.approval is not None and task.approval.approved_by == "alice"
    assert task.status_history[-1].actor == "alice"
    # Approving twice: the page says why, nothing changes.
    r = http.post("/tasks/dc1/sn-001/approve", data={"csrf_token": csrf})
    assert r.status_code == 409 and 'id="action-error"' in r.text


def test_pages_send_a_strict_csp_and_escape_agent_text(
    daemon: DaemonThread, operator: tuple[httpx.Client, str], api: httpx.Client
) -> None:
    http, _ = operator
    r = api.post("/api/v1/tasks", json=FORM)
    secret = r.json()["enrollment_secret"]

    async def hostile_agent() -> None:
        async with AgentClient(daemon.regional_url, "sn-001") as agent:
            await agent.register(MAC, FACTS.to_dict(), secret)
            await agent.logs(["<script>alert(1)</script>", "<img src=x onerror=alert(2)>"])

    daemon.call(hostile_agent)
    for path in ("/", "/tasks/dc1/sn-001", "/tasks/create", "/login"):
        r = http.get(path)
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "unsafe-inline" not in csp, path
        assert "<script>" not in r.text.replace('<script src="/static/dashboard/dashboard.js"', "")
        assert " style=" not in r.text  # nothing a CSP without unsafe-inline would block
    page = http.get("/tasks/dc1/sn-001").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    js = http.get("/static/dashboard/dashboard.js")
    assert js.status_code == 200 and "innerHTML" not in js.text


def test_events_resume_from_last_event_id_without_missing_a_change(
    daemon: DaemonThread, operator: tuple[httpx.Client, str], api: httpx.Client
) -> None:
    http, _ = operator
    since = since_of(http.get("/").text)
    assert api.post("/api/v1/tasks", json=FORM).status_code == 201
    (created,) = read_events(http, f"/events?since={since}", count=1)
    assert created.event == "task" and created.data["summary"]["status"] == "pending"
    assert created.data["counts"]["dc1"]["pending"] == 1

    # The browser is away while the task is approved and cancelled ...
    assert api.post("/api/v1/tasks/dc1/sn-001/approve", json={}).status_code == 200
    assert api.post("/api/v1/tasks/dc1/sn-001/cancel", json={}).status_code == 200
    # ... and comes back with the id of the last event it saw: both changes, in order.
    missed = read_events(
        http, f"/events?since={since}", count=2, headers={"Last-Event-ID": created.id}
    )
    assert [e.data["summary"]["status"] for e in missed] == ["approved", "cancelled"]
    assert all(e.event == "task" for e in missed)
    assert int(missed[0].id.split("-")[0]) > int(created.id.split("-")[0])

    # A task page's stream: the full document and only the log lines it lacks.
    page = http.get("/tasks/dc1/sn-001").text
    assert api.delete("/api/v1/tasks/dc1/sn-001").status_code == 200
    (gone,) = read_events(http, f"/events?machine=dc1/sn-001&since={since_of(page)}", count=1)
    assert gone.event == "deleted" and gone.data["key"] == "dc1/sn-001"

    # Too far behind (before the hub's first snapshot): reload.
    (reset,) = read_events(http, "/events", count=1, headers={"Last-Event-ID": "1-0"})
    assert reset.event == "reset"


def test_task_page_events_carry_log_deltas(
    daemon: DaemonThread, operator: tuple[httpx.Client, str], api: httpx.Client
) -> None:
    http, _ = operator
    assert api.post("/api/v1/tasks", json=FORM).status_code == 201
    page = http.get("/tasks/dc1/sn-001").text
    end = int(re.search(r'id="logs" data-end="(\d+)"', page).group(1))  # type: ignore[union-attr]
    assert api.post("/api/v1/tasks/dc1/sn-001/approve", json={"notes": "go"}).status_code == 200
    (ev,) = read_events(http, f"/events?machine=dc1/sn-001&since={since_of(page)}", count=1)
    assert ev.data["logs"]["start"] == end and ev.data["logs"]["replace"] is False
    assert len(ev.data["logs"]["lines"]) == 1 and "approved" in ev.data["logs"]["lines"][0]
    assert ev.data["detail"]["approval"]["notes"] == "go"


def test_regional_status_page(daemon: DaemonThread, api: httpx.Client) -> None:
    r = api.post("/api/v1/tasks", json=FORM)
    secret = r.json()["enrollment_secret"]

    async def register() -> None:
        async with AgentClient(daemon.regional_url, "sn-001") as agent:
            await agent.register(MAC, FACTS.to_dict(), secret)
            await agent.heartbeat()

    daemon.call(register)
    with httpx.Client(base_url=daemon.regional_url, timeout=TIMEOUT) as http:
        r = http.get("/")
    assert r.status_code == 200
    assert "unsafe-inline" not in r.headers["content-security-policy"]
    text = r.text
    assert 'id="state">running<' in text
    assert 'id="etcd-health">healthy<' in text
    assert daemon.config.etcd.endpoints[0] in text
    assert re.search(r'id="lease">[0-9a-f]+<', text)
    assert re.search(r'id="lease-remaining">\d+\.\d s<', text)
    assert "sn-001" in text and MAC in text and "status-pending" in text
    assert re.search(r"online, \d+s ago", text)  # the agent's last heartbeat
    assert secret not in text and "lpa_" not in text  # no secrets, no agent tokens


def test_metrics_parse_and_count_tasks_by_idc_and_status(
    daemon: DaemonThread, api: httpx.Client
) -> None:
    for sn in ("sn-001", "sn-002", "sn-003"):
        assert api.post("/api/v1/tasks", json={**FORM, "sn": sn}).status_code == 201
    assert api.post("/api/v1/tasks/dc1/sn-002/cancel", json={}).status_code == 200
    api.get("/readyz")

    def families(base: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        text = httpx.get(base + "/metrics", timeout=TIMEOUT).text
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    def settled() -> bool:
        m = families(daemon.control_url)
        return m["lpmosd_tasks"].get((("idc", "dc1"), ("status", "cancelled"))) == 1

    deadline = time.monotonic() + 5
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.05)
    m = families(daemon.control_url)
    tasks = m["lpmosd_tasks"]
    assert tasks[(("idc", "dc1"), ("status", TaskStatus.PENDING.value))] == 2
    assert tasks[(("idc", "dc1"), ("status", "cancelled"))] == 1
    assert tasks[(("idc", "dc1"), ("status", "completed"))] == 0
    assert m["lpmosd_role_running"][(("role", "control-plane"),)] == 1
    assert m["lpmosd_role_running"][(("role", "regional"),)] == 1
    assert "lpmosd_etcd_request_seconds_bucket" in m
    assert "lpmosd_etcd_active_leases" in m
    assert "lpmosd_etcd_watch_events_total" in m
    assert m["lpmosd_etcd_up"]
    codes = m["lpmosd_http_requests_total"]
    assert any(dict(k).get("route") == "/api/v1/tasks" for k in codes)
    regional = families(daemon.regional_url)
    assert regional["lpmosd_regional_servers"][(("idc", "dc1"),)] == 3
