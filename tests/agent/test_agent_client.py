"""The agent API client: retries, errors, the bearer token, response parsing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
import trio.testing

from lpmosd.agent.client import (
    AgentAPIError,
    AgentClient,
    RegionalUnavailableError,
    RetryPolicy,
    TaskView,
)
from lpmosd.plan import PlanError, plan_from_wire, plan_to_wire

from .agent_fakes import API, FakeRegional

FAST = RetryPolicy(initial=0.01, maximum=0.05, total=2.0)
HW: dict[str, Any] = {"cpu_model": "x", "cpu_cores": 1, "memory_bytes": 1, "disks": [], "nics": []}


def client(regional: FakeRegional, retry: RetryPolicy = FAST) -> AgentClient:
    return AgentClient("http://regional:8081/", "sn-001", retry=retry, transport=regional.transport)


async def test_register_and_calls() -> None:
    regional = FakeRegional()
    task = regional.add_task(status="approved")
    async with client(regional) as c:
        reg = await c.register("00:1a:2b:3c:4d:5e", HW)
        assert reg.task.status == "approved"
        assert reg.task.placeholders()["os_type"] == "demo"
        assert reg.plan is not None and reg.plan.step_names[0] == "partitioning"
        assert reg.heartbeat_interval == 0.05 and reg.lease_ttl == 30
        assert reg.agent_token is None and not c.has_token
        assert (await c.heartbeat()).status == "approved"
        await c.progress("partitioning", 10, "go")
        await c.logs(["a", "b"], "WARN")
        await c.logs([], "INFO")  # nothing to send: no call
        assert await c.complete() == "completed"
    assert task.hardware == HW
    assert task.logs == [("WARN", "a"), ("WARN", "b")]
    assert [(m, p) for m, p, _ in regional.calls] == [
        ("POST", f"{API}/register"),
        ("POST", f"{API}/sn-001/heartbeat"),
        ("POST", f"{API}/sn-001/progress"),
        ("POST", f"{API}/sn-001/logs"),
        ("POST", f"{API}/sn-001/complete"),
    ]


async def test_retries_503_and_connection_errors(autojump_clock: trio.testing.MockClock) -> None:
    regional = FakeRegional()
    regional.add_task()
    regional.unavailable = 5
    async with client(regional, RetryPolicy(initial=0.5, maximum=2, total=60)) as c:
        await c.register("00:1a:2b:3c:4d:5e", HW)
        regional.down = True

        async def back_up() -> None:
            await trio.sleep(20)
            regional.down = False

        async with trio.open_nursery() as nursery:
            nursery.start_soon(back_up)
            started = trio.current_time()
            assert (await c.get_task()).task.status == "pending"
            assert 20 <= trio.current_time() - started <= 23
    assert regional.registrations == 1
    attempts = [p for _, p, _ in regional.calls].count(f"{API}/sn-001/task")
    assert 10 <= attempts <= 16  # backoff capped at 2 s (±20 %) over 20 s


async def test_retry_budget_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    regional = FakeRegional()
    regional.down = True
    async with client(regional, RetryPolicy(initial=1, maximum=5, total=30)) as c:
        started = trio.current_time()
        with pytest.raises(RegionalUnavailableError, match="no answer after 30s"):
            await c.heartbeat()
        assert trio.current_time() - started == pytest.approx(30)


async def test_retry_after_is_honoured(autojump_clock: trio.testing.MockClock) -> None:
    answers = [httpx.Response(503, headers={"Retry-After": "3"}, json={"error": "restarting"})]

    def handler(request: httpx.Request) -> httpx.Response:
        if answers:
            return answers.pop()
        return httpx.Response(200, json={"status": "installing", "lease_ttl": 30})

    async with AgentClient(
        "http://r", "sn-001", retry=RetryPolicy(initial=0.1, maximum=5, total=60),
        transport=httpx.MockTransport(handler),
    ) as c:  # fmt: skip
        started = trio.current_time()
        await c.heartbeat()
        assert 3 <= trio.current_time() - started <= 4.5  # Retry-After plus jitter


async def test_overload_429_is_retried_after_retry_after_with_jitter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Agents refused together come back spread out, none before Retry-After."""
    refused: set[int] = set()
    waited: list[float] = []

    async def one(i: int) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            if i not in refused:
                refused.add(i)
                return httpx.Response(429, headers={"Retry-After": "2"}, json={"error": "busy"})
            return httpx.Response(200, json={"status": "installing", "committed": True})

        async with AgentClient(
            "http://r", f"sn-{i:03d}", retry=RetryPolicy(initial=0.1, maximum=5, total=60),
            transport=httpx.MockTransport(handler),
        ) as c:  # fmt: skip
            started = trio.current_time()
            await c.progress("step", 10, "")
            waited.append(trio.current_time() - started)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i)
    assert len(waited) == 20
    assert all(2 <= w <= 3 for w in waited)
    assert len({round(w, 3) for w in waited}) > 10  # spread, not all at once


@pytest.mark.parametrize(
    ("status", "body", "message", "field"),
    [
        (404, {"error": "no task for sn-001", "field": "sn"}, "no task for sn-001", "sn"),
        (409, {"error": "task is cancelled", "field": "status"}, "task is cancelled", "status"),
        (400, "not json", "Bad Request", None),
        (413, ["odd"], "Request Entity Too Large", None),
    ],
)
async def test_errors_carry_status_message_and_field(
    status: int, body: Any, message: str, field: str | None
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    async with AgentClient("http://r", "sn-001", transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(AgentAPIError) as info:
            await c.progress("x", 1, "")
    assert not isinstance(info.value, RegionalUnavailableError)
    assert (info.value.status, info.value.message, info.value.field) == (status, message, field)


@pytest.mark.parametrize("body", ["[]", "nope", '{"task": {"sn": 1}}', '{"task": []}'])
async def test_malformed_responses(body: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=body)

    async with AgentClient("http://r", "sn-001", transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(AgentAPIError, match="malformed response"):
            await c.get_task()


async def test_bearer_token_and_reregistration_on_401() -> None:
    regional = FakeRegional(issue_tokens=True, secret="s3cret")
    regional.add_task(status="approved")
    async with client(regional) as c:
        with pytest.raises(AgentAPIError) as info:
            await c.register("00:1a:2b:3c:4d:5e", HW, "wrong")
        assert info.value.status == 401
        reg = await c.register("00:1a:2b:3c:4d:5e", HW, "s3cret")
        assert reg.agent_token == "tok-2" and c.has_token
        await c.progress("a", 1, "")
        regional.revoke_tokens()  # e.g. the regional lost its token store
        await c.progress("a", 2, "")  # 401 -> register again -> repeated once
        assert regional.registrations == 3
        # Two calls hitting 401 together register once.
        regional.revoke_tokens()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.heartbeat)
            nursery.start_soon(c.progress, "a", 3, "")
        assert regional.registrations == 4
    auth = [p for m, p, b in regional.calls if p.endswith("/progress")]
    # 1 ok; 1 refused + 1 repeated; 1 refused + 1 repeated (concurrently with the heartbeat)
    assert len(auth) == 5
    assert regional.tasks["sn-001"].percent("a") == 3


async def test_401_without_registration_is_an_error() -> None:
    regional = FakeRegional(issue_tokens=True)
    regional.add_task()
    async with client(regional) as c:
        with pytest.raises(AgentAPIError) as info:
            await c.heartbeat()
    assert info.value.status == 401


def test_task_view_is_lenient_about_extras() -> None:
    view = TaskView.from_obj(
        {
            "task_id": "t",
            "sn": "sn-1",
            "status": "installing",
            "new_field": {"x": 1},
            "progress": [{"step": "a", "percent": 100, "timestamp": "x", "message": ""}],
            "resume_from": "b",
        }
    )
    assert view.progress == {"a": 100}
    assert view.resume_from == "b"
    assert view.os_type == ""


def test_plan_from_wire() -> None:
    assert plan_from_wire(None) is None
    plan = plan_from_wire(
        {
            "name": "ubuntu",
            "steps": [
                {"name": "a", "command": ["/bin/echo", "{sn}"], "timeout": 5, "simulate": None},
                {"name": "b", "command": [], "timeout": 5.5, "simulate": 1},
            ],
            "future": "ignored",
        }
    )
    assert plan is not None
    assert plan.os_type == "ubuntu" and plan.step_names == ("a", "b")
    assert plan.steps[0].command == ("/bin/echo", "{sn}") and plan.steps[0].simulate is None
    assert plan.steps[1].timeout == 5.5 and plan.steps[1].simulate == 1.0
    assert plan_from_wire(plan_to_wire(plan)) == plan


@pytest.mark.parametrize(
    ("plan", "error"),
    [
        ([], "plan: must be an object"),
        ({"steps": []}, "plan.name: must be a string"),
        ({"name": "x", "steps": {}}, "plan.steps: must be a list of objects"),
        ({"name": "x", "steps": []}, r"plan.steps: must have 1\.\.64 steps"),
        ({"name": "x", "steps": [{"name": "a"}]}, r"steps\[0\]\.command: is required"),
        ({"name": "x", "steps": [{"name": "Bad Name", "simulate": 1}]}, r"steps\[0\]\.name"),
        ({"name": "x", "steps": [{"name": "", "simulate": 1}]}, r"steps\[0\]\.name"),
        ({"name": "x", "steps": [{"name": "a", "command": "rm -rf /"}]}, "list of strings"),
        ({"name": "x", "steps": [{"name": "a", "command": ["rm"]}]}, "absolute program path"),
        ({"name": "x", "steps": [{"name": "a", "command": ["/a", "{x.y}"]}]}, "placeholder"),
        ({"name": "x", "steps": [{"name": "a", "command": ["/a"], "timeout": True}]}, "number"),
        ({"name": "x", "steps": [{"name": "a", "command": ["/a"], "timeout": 0}]}, "1..86400"),
        ({"name": "x", "steps": [{"name": "a", "simulate": 1}, {"name": "a", "simulate": 1}]},
         "duplicate step name"),
    ],
)  # fmt: skip
def test_plan_from_wire_errors(plan: object, error: str) -> None:
    with pytest.raises(PlanError, match=error):
        plan_from_wire(plan)


async def test_several_regionals_move_on_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """An IDC's active and standby regionals: an unreachable one or a standby's 503 sends
    the call to the next URL without waiting; it waits only once every URL was tried."""
    regional = FakeRegional()
    regional.add_task()
    role = {"a": "active", "b": "standby"}

    async def route(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if role[host] == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if role[host] == "standby":
            return httpx.Response(503, json={"error": "this regional is a standby"})
        return await regional.transport.handle_async_request(request)

    async with AgentClient(
        ["http://a:8081", "http://b:8081/"],
        "sn-001",
        retry=RetryPolicy(initial=0.5, maximum=2, total=60),
        transport=httpx.MockTransport(route),
    ) as c:
        await c.register("00:1a:2b:3c:4d:5e", HW)
        assert c.regional_url == "http://a:8081"
        # The active one dies and the standby takes over: no wait.
        role.update(a="down", b="active")
        started = trio.current_time()
        assert (await c.get_task()).task.status == "pending"
        assert trio.current_time() == started and c.regional_url == "http://b:8081"
        # Both unavailable for a while: then it backs off, and comes back to whichever
        # answers first.
        role.update(a="standby", b="down")

        async def take_over() -> None:
            await trio.sleep(5)
            role["a"] = "active"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take_over)
            assert (await c.heartbeat()).status == "pending"
            assert 5 <= trio.current_time() - started <= 8
        assert c.regional_url == "http://a:8081"


def test_needs_a_regional_url() -> None:
    with pytest.raises(ValueError, match="at least one"):
        AgentClient([], "sn-001")
