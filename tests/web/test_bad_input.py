"""Hostile and careless input on every endpoint of both APIs.

Every case must get a 4xx JSON error (``{"error": ..., "field": ...}`` naming the field
where the request reached a handler), never a 5xx, and must write nothing: the whole
keyspace (every key, value, mod revision and lease) is compared before and after.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from provisioning_kit import (
    GUIDE_TASK,
    HARDWARE,
    keyspace,
    make_config,
    open_control_api,
    open_daemon,
    register_agent,
)

from lpmosd.documents import MachineMeta, TaskStatus
from lpmosd.etcd import EtcdClient
from lpmosd.etcd_process import EtcdProcess
from lpmosd.store import Store
from lpmosd.timestamps import utcnow

# A 413 closes the connection while httpx is still sending the body; httpx then reads the
# answer fine but leaves its body iterator unfinished, which Trio reports at GC time.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Async generator 'httpx._content.*was garbage collected:ResourceWarning"
)

MAC = GUIDE_TASK["mac"]
TWO_MIB = 2 * 1024 * 1024

#: Names that must never become a key part, percent-encoded for a URL path segment.
BAD_NAMES_IN_PATH = {
    "%2E%2E": "..",
    "%2E": ".",
    "-lead": "leading dash",
    "a%00b": "NUL",
    "sn-001%0A": "trailing newline",
    "%D1%95n-001": "Cyrillic dze look-alike",
    "sn%E2%80%90001": "unicode hyphen",
    "%EF%BD%93%EF%BD%8E001": "fullwidth letters",
    "sn%20001": "space",
    "x" * 65: "too long",
    "sn%5C001": "backslash",
}
#: Names that must be refused in a JSON body field.
BAD_NAMES = [
    "",
    "..",
    ".",
    "a/b",
    "../../etc",
    "/os/dc1",
    "a\x00b",
    "sn-001\n",
    "ѕn-001",
    "sn‐001",
    "ｓｎ001",
    "sn 001",
    "x" * 65,
    "_hidden",
    "sn\u200b001",
]
BAD_MACS = [
    "00:1a:2b:3c:4d",
    "00:1a:2b:3c:4d:5e:6f",
    "zz:1a:2b:3c:4d:5e",
    "00:1a:2b:3c:4d:5e\n",
    "00:1a-2b:3c:4d:5e",
    "001a.2b3c.4d5e.6f",
    "",
    "０0:1a:2b:3c:4d:5e",
]


@dataclass
class Case:
    """One request and what must come back."""

    method: str
    path: str
    body: Any = None  # JSON-encoded unless bytes; None: no body
    status: int = 400
    field: str | None = "body"  # None: no handler matched, no field to name

    def describe(self) -> str:
        body = self.body if isinstance(self.body, bytes) else json.dumps(self.body)
        return f"{self.method} {self.path} {str(body)[:120]}"


@dataclass
class World:
    client: EtcdClient
    cp: httpx.AsyncClient  # with an admin token
    agent: httpx.AsyncClient  # with sn-001's agent token
    #: (idc, sn) -> the enrolment secret of its task.
    secrets: dict[tuple[str, str], str]


@pytest.fixture
async def world(
    etcd: EtcdProcess, aio_loop: None, store: Store, client: EtcdClient
) -> AsyncIterator[World]:
    """A daemon with both roles for dc1, a task installing (sn-001, its agent registered
    through the API), one pending (sn-002), and one of another IDC (dc2/sn-777)."""
    from lpmosd.api_requests import CreateTaskRequest

    async with (
        open_daemon(make_config(etcd.endpoints)) as daemon,
        open_control_api(daemon) as cp,
        httpx.AsyncClient(base_url=daemon.urls["regional"], timeout=30) as agent,
    ):
        cp.timeout = httpx.Timeout(30)
        meta = MachineMeta.from_report(HARDWARE, now=utcnow())
        secrets: dict[tuple[str, str], str] = {}
        for idc, sn in (("dc1", "sn-001"), ("dc1", "sn-002"), ("dc2", "sn-777")):
            req = CreateTaskRequest.from_obj({**GUIDE_TASK, "idc": idc, "sn": sn})
            _, secrets[idc, sn] = await store.create_enrolled_task(req, actor="test")
            if sn == "sn-001":
                r, auth = await register_agent(agent, sn=sn, mac=MAC, secret=secrets[idc, sn])
                assert r.status_code == 200, r.text
                agent.headers.update(auth)
                continue
            lease = await client.lease_grant(60)
            await store.register_agent(idc, sn, mac=MAC, meta=meta, lease_id=lease.id)
        for idc, sn in (("dc1", "sn-001"), ("dc2", "sn-777")):
            await store.approve(idc, sn, approved_by="op")
            await store.record_progress(idc, sn, step="partitioning", percent=5, message="")
        assert (await store.get_task("dc1", "sn-001")).task.status is TaskStatus.INSTALLING
        yield World(client, cp, agent, secrets)


async def send(http: httpx.AsyncClient, case: Case) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if case.body is None:
        content = None
    elif isinstance(case.body, bytes):
        content = case.body
    else:
        content = json.dumps(case.body).encode()
    return await http.request(case.method, case.path, content=content, headers=headers)


async def check_cases(world: World, http: httpx.AsyncClient, cases: list[Case]) -> None:
    before = await keyspace(world.client)
    problems: list[str] = []
    for case in cases:
        r = await send(http, case)
        try:
            body = r.json()
        except ValueError:
            problems.append(f"{case.describe()}: {r.status_code} non-JSON {r.text[:80]!r}")
            continue
        if r.status_code >= 500:
            problems.append(f"{case.describe()}: 5xx {r.status_code} {body}")
        elif r.status_code != case.status:
            problems.append(f"{case.describe()}: {r.status_code} (want {case.status}) {body}")
        elif not isinstance(body, dict) or not isinstance(body.get("error"), str):
            problems.append(f"{case.describe()}: not an error document: {body}")
        elif case.field is not None and body.get("field") != case.field:
            problems.append(f"{case.describe()}: field {body.get('field')!r} != {case.field!r}")
    after = await keyspace(world.client)
    changed = sorted(k.decode() for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"keys written by refused requests: {changed}"
    assert not problems, "\n".join(problems)


def body_cases(method: str, path: str, *, empty_ok: bool) -> list[Case]:
    """Malformed JSON of every kind, on one endpoint that takes a JSON object."""
    cases = [
        Case(method, path, b"{"),
        Case(method, path, b'{"a": 1,}'),
        Case(method, path, b"\xff\xfe{}"),
        Case(method, path, b'{"a": NaN}'),
        Case(method, path, b'{"a": Infinity}'),
        Case(method, path, b"[" * 100_000 + b"]" * 100_000),
        Case(method, path, b"[]"),
        Case(method, path, b"null"),
        Case(method, path, b'"text"'),
        Case(method, path, b"42"),
        Case(method, path, b"x" * TWO_MIB, status=413),
        Case(method, path, {"pad": "x" * TWO_MIB}, status=413),
    ]
    if not empty_ok:
        cases.append(Case(method, path, b""))
        cases.append(Case(method, path, b"  \n"))
    return cases


# ----------------------------------------------------------------- control plane


async def test_create_task_bad_input(world: World) -> None:
    p = "/api/v1/tasks"
    cases = body_cases("POST", p, empty_ok=False)
    cases.append(Case("POST", p, b'{"idc": "dc1", "idc": "dc9", "sn": "a"}', field="idc"))
    for missing in ("idc", "sn", "mac", "os_type"):
        body = {k: v for k, v in GUIDE_TASK.items() if k != missing}
        cases.append(Case("POST", p, body, field=missing))
    wrong_types: dict[str, Any] = {
        "idc": 1,
        "sn": ["sn-001"],
        "mac": 0x001A2B3C4D5E,
        "os_type": {"name": "ubuntu"},
        "os_version": 22.04,
        "disk_layout": True,
        "network_config": None,
    }
    for key, value in wrong_types.items():
        cases.append(Case("POST", p, {**GUIDE_TASK, key: value}, field=key))
    for name in BAD_NAMES:
        cases.append(Case("POST", p, {**GUIDE_TASK, "sn": name}, field="sn"))
        cases.append(Case("POST", p, {**GUIDE_TASK, "idc": name}, field="idc"))
    for mac in BAD_MACS:
        cases.append(Case("POST", p, {**GUIDE_TASK, "mac": mac}, field="mac"))
    for key in ("os_type", "os_version", "disk_layout", "network_config"):
        cases.append(Case("POST", p, {**GUIDE_TASK, key: "x" * 129}, field=key))
        cases.append(Case("POST", p, {**GUIDE_TASK, key: "a\nb"}, field=key))
        cases.append(Case("POST", p, {**GUIDE_TASK, key: "a\x00b"}, field=key))
    cases.append(Case("POST", p, {**GUIDE_TASK, "os_type": ""}, field="os_type"))
    cases.append(Case("POST", p, {**GUIDE_TASK, "priority": 1}, field="priority"))
    cases.append(Case("POST", p, {**GUIDE_TASK, "status": "completed"}, field="status"))
    # A live task already exists for dc1/sn-001.
    cases.append(Case("POST", p, {**GUIDE_TASK}, status=409, field="sn"))
    await check_cases(world, world.cp, cases)


async def test_task_paths_bad_names(world: World) -> None:
    cases: list[Case] = []
    for raw in BAD_NAMES_IN_PATH:
        for suffix, method in (
            ("", "GET"),
            ("", "DELETE"),
            ("/approve", "POST"),
            ("/cancel", "POST"),
            ("/retry", "POST"),
        ):
            cases.append(Case(method, f"/api/v1/tasks/dc1/{raw}{suffix}", field="sn"))
            cases.append(Case(method, f"/api/v1/tasks/{raw}/sn-001{suffix}", field="idc"))
    # "/" inside a name cannot even match a route: a JSON 404 (no field to name).
    for method, path in (
        ("GET", "/api/v1/tasks/dc1/a%2Fb"),
        ("DELETE", "/api/v1/tasks/dc1/a%2Fb"),
        ("POST", "/api/v1/tasks/dc1/a%2Fb/approve"),
        ("POST", "/api/v1/tasks/dc1/sn-001/explode"),
    ):
        cases.append(Case(method, path, status=404, field=None))
    for method, action in (("GET", ""), ("DELETE", ""), ("POST", "/approve")):
        cases.append(Case(method, f"/api/v1/tasks/dc1/sn-404{action}", status=404, field="sn"))
        cases.append(Case(method, f"/api/v1/tasks/dc9/sn-001{action}", status=404, field="sn"))
    # Method not allowed is a 405 JSON error too.
    cases.append(Case("PUT", "/api/v1/tasks/dc1/sn-001", status=405, field=None))
    await check_cases(world, world.cp, cases)


async def test_task_actions_bad_bodies(world: World) -> None:
    cases: list[Case] = []
    for action in ("approve", "cancel", "retry"):
        p = f"/api/v1/tasks/dc1/sn-002/{action}"
        cases += body_cases("POST", p, empty_ok=True)
        cases.append(Case("POST", p, {"surprise": True}, field="surprise"))
    p = "/api/v1/tasks/dc1/sn-002/approve"
    for bad in (5, "", "a\nb", "x" * 129, ["op"]):
        cases.append(Case("POST", p, {"approved_by": bad}, field="approved_by"))
    for bad_notes in (5, None, ["n"], "x" * 2001):
        cases.append(Case("POST", p, {"notes": bad_notes}, field="notes"))
    for action in ("cancel", "retry"):
        p = f"/api/v1/tasks/dc1/sn-002/{action}"
        for bad_reason in (5, None, "x" * 2001):
            cases.append(Case("POST", p, {"reason": bad_reason}, field="reason"))
    await check_cases(world, world.cp, cases)


async def test_list_endpoints_bad_queries(world: World) -> None:
    cases = [
        Case("GET", "/api/v1/tasks?status=bogus", field="status"),
        Case("GET", "/api/v1/tasks?status=PENDING", field="status"),
        Case("GET", "/api/v1/servers", field="idc"),
        Case("GET", "/api/v1/servers?idc=", field="idc"),
    ]
    for raw in BAD_NAMES_IN_PATH:
        cases.append(Case("GET", f"/api/v1/tasks?idc={raw}", field="idc"))
        cases.append(Case("GET", f"/api/v1/servers?idc={raw}", field="idc"))
    cases.append(Case("GET", "/api/v1/tasks?idc=a%2Fb", field="idc"))
    cases.append(Case("GET", "/api/v1/servers?idc=..%2F..", field="idc"))
    await check_cases(world, world.cp, cases)


# --------------------------------------------------------------------------- agent


async def test_register_bad_input(world: World) -> None:
    p = "/api/v1/agent/register"
    secret = world.secrets["dc1", "sn-002"]
    good: dict[str, Any] = {
        "sn": "sn-002",
        "mac": MAC,
        "hardware": HARDWARE,
        "enrollment_secret": secret,
    }
    cases = body_cases("POST", p, empty_ok=False)
    for missing in ("sn", "mac", "hardware"):
        cases.append(
            Case("POST", p, {k: v for k, v in good.items() if k != missing}, field=missing)
        )
    for name in BAD_NAMES:
        cases.append(Case("POST", p, {**good, "sn": name}, field="sn"))
    for mac in BAD_MACS:
        cases.append(Case("POST", p, {**good, "mac": mac}, field="mac"))
    cases.append(Case("POST", p, {**good, "sn": 5}, field="sn"))
    cases.append(Case("POST", p, {**good, "mac": None}, field="mac"))
    cases.append(Case("POST", p, {**good, "idc": "dc2"}, field="idc"))

    def hw(**changes: Any) -> dict[str, Any]:
        return {**good, "hardware": {**HARDWARE, **changes}}

    cases += [
        Case("POST", p, {**good, "hardware": "lots"}, field="hardware"),
        Case("POST", p, {**good, "hardware": None}, field="hardware"),
        Case("POST", p, {**good, "hardware": {}}, field="hardware.cpu_model"),
        Case("POST", p, hw(cpu_cores="28"), field="hardware.cpu_cores"),
        Case("POST", p, hw(cpu_cores=True), field="hardware.cpu_cores"),
        Case("POST", p, hw(cpu_cores=2.5), field="hardware.cpu_cores"),
        Case("POST", p, hw(memory_bytes=-1), field="hardware.memory_bytes"),
        Case("POST", p, hw(memory_bytes=2**64), field="hardware.memory_bytes"),
        Case("POST", p, hw(cpu_model="x" * 257), field="hardware.cpu_model"),
        Case("POST", p, hw(cpu_model="evil\n[ERROR] forged"), field="hardware.cpu_model"),
        Case("POST", p, hw(disks="sda"), field="hardware.disks"),
        Case("POST", p, hw(disks=[{"name": "sda"}]), field="hardware.disks[0].size_bytes"),
        Case(
            "POST",
            p,
            hw(nics=[{"name": "eno1", "mac": "nope"}]),
            field="hardware.nics[0].mac",
        ),
        Case("POST", p, hw(disks=[{}] * 257), field="hardware.disks"),
        Case("POST", p, hw(dmi={"vendor": 5}), field="hardware.dmi.vendor"),
        Case("POST", p, hw(reported_at="2026-01-30T12:00:00Z"), field="hardware.reported_at"),
        Case("POST", p, hw(gpu="none"), field="hardware.gpu"),
        # Not this regional's, or no task at all: 404. Wrong MAC for the task: 409.
        Case("POST", p, {**good, "sn": "sn-777"}, status=404, field="sn"),
        Case("POST", p, {**good, "sn": "sn-404"}, status=404, field="sn"),
        Case("POST", p, {**good, "mac": "00:00:5e:00:53:01"}, status=409, field="mac"),
        # No, a wrong, another task's, or a non-string secret.
        Case(
            "POST",
            p,
            {k: v for k, v in good.items() if k != "enrollment_secret"},
            status=401,
            field="enrollment_secret",
        ),
        Case("POST", p, {**good, "enrollment_secret": "lpe_" + "A" * 43}, 401, "enrollment_secret"),
        Case("POST", p, {**good, "enrollment_secret": ""}, 401, "enrollment_secret"),
        Case(
            "POST",
            p,
            {**good, "enrollment_secret": world.secrets["dc1", "sn-001"]},
            401,
            "enrollment_secret",
        ),
        Case("POST", p, {**good, "enrollment_secret": 5}, field="enrollment_secret"),
        Case("POST", p, {**good, "enrollment_secret": "x" * 257}, field="enrollment_secret"),
        # sn-001's secret was used by its agent, which is alive: a replay is refused.
        Case(
            "POST",
            p,
            {**good, "sn": "sn-001", "enrollment_secret": world.secrets["dc1", "sn-001"]},
            409,
            "enrollment_secret",
        ),
    ]
    # Not as sn-001's agent (whose token would make the replay its own re-registration).
    async with httpx.AsyncClient(base_url=world.agent.base_url, timeout=30) as stranger:
        await check_cases(world, stranger, cases)


AGENT_ACTIONS = ("heartbeat", "progress", "logs", "complete", "fail")
VALID_BODY: dict[str, Any] = {
    "heartbeat": {},
    "progress": {"step": "packages", "percent": 10},
    "logs": {"lines": ["hello"]},
    "complete": {},
    "fail": {"reason": "x"},
}


async def test_agent_paths_bad_names_and_wrong_idc(world: World) -> None:
    cases: list[Case] = []
    for raw in BAD_NAMES_IN_PATH:
        cases.append(Case("GET", f"/api/v1/agent/{raw}/task", field="sn"))
        for action in AGENT_ACTIONS:
            cases.append(
                Case("POST", f"/api/v1/agent/{raw}/{action}", VALID_BODY[action], field="sn")
            )
    # Another IDC's server, nobody's, another server of this IDC: sn-001's token is no good.
    for sn in ("sn-777", "sn-404", "sn-002"):
        cases.append(Case("GET", f"/api/v1/agent/{sn}/task", status=403, field="sn"))
        for action in AGENT_ACTIONS:
            cases.append(
                Case("POST", f"/api/v1/agent/{sn}/{action}", VALID_BODY[action], 403, "sn")
            )
    for path in ("/api/v1/agent/a%2Fb/task", "/api/v1/agent/sn-001/reboot"):
        cases.append(Case("POST", path, {}, status=404, field=None))
    await check_cases(world, world.agent, cases)


async def test_agent_action_bad_bodies(world: World) -> None:
    cases: list[Case] = []
    for action in AGENT_ACTIONS:
        p = f"/api/v1/agent/sn-001/{action}"
        cases += body_cases("POST", p, empty_ok=action in ("heartbeat", "complete"))
        cases.append(Case("POST", p, {**VALID_BODY[action], "extra": 1}, field="extra"))
    p = "/api/v1/agent/sn-001/progress"
    for step in ("Partitioning", "a/b", "", "..", "-x", "x" * 65, 5, None, "part\u0131tion"):
        cases.append(Case("POST", p, {"step": step, "percent": 5}, field="step"))
    for pct in (101, -1, "50", 50.5, True, None, 2**70):
        cases.append(Case("POST", p, {"step": "packages", "percent": pct}, field="percent"))
    cases.append(Case("POST", p, {"percent": 5}, field="step"))
    cases.append(Case("POST", p, {"step": "packages"}, field="percent"))
    for msg in (5, None, "x" * 2001):
        cases.append(
            Case("POST", p, {"step": "packages", "percent": 5, "message": msg}, field="message")
        )
    p = "/api/v1/agent/sn-001/logs"
    cases += [
        Case("POST", p, {}, field="lines"),
        Case("POST", p, {"lines": "one line"}, field="lines"),
        Case("POST", p, {"lines": []}, field="lines"),
        Case("POST", p, {"lines": [1]}, field="lines[0]"),
        Case("POST", p, {"lines": ["ok", None]}, field="lines[1]"),
        Case("POST", p, {"lines": ["x"] * 101}, field="lines"),
        Case("POST", p, {"lines": ["x" * 2001]}, field="lines[0]"),
        Case("POST", p, {"line": "a", "lines": ["b"]}, field="lines"),
        Case("POST", p, {"line": 5}, field="line"),
        Case("POST", p, {"lines": ["a"], "level": "TRACE"}, field="level"),
        Case("POST", p, {"lines": ["a"], "level": "info"}, field="level"),
    ]
    p = "/api/v1/agent/sn-001/fail"
    for reason in ("", "   ", 5, None, "x" * 2001):
        cases.append(Case("POST", p, {"reason": reason}, field="reason"))
    cases.append(Case("POST", p, {}, field="reason"))
    await check_cases(world, world.agent, cases)


async def test_chunked_oversized_body_is_413(world: World) -> None:
    """No Content-Length: the limit must hold while streaming, too."""

    class Chunks:
        """64 chunks of 64 KiB, streamed (an iterator object, not an async generator:
        the server hangs up mid-body, and an unfinished generator would warn at GC)."""

        def __init__(self) -> None:
            self.left = 64

        def __aiter__(self) -> Chunks:
            return self

        async def __anext__(self) -> bytes:
            if not self.left:
                raise StopAsyncIteration
            self.left -= 1
            return b"x" * 65536

    before = await keyspace(world.client)
    for http, path in (
        (world.cp, "/api/v1/tasks"),
        (world.agent, "/api/v1/agent/register"),
        (world.agent, "/api/v1/agent/sn-001/progress"),
    ):
        r = await http.post(path, content=Chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, (path, r.status_code, r.text)
        assert r.json()["field"] == "body"
    assert await keyspace(world.client) == before
