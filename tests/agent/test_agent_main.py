"""run_agent against the in-memory regional: the whole life of an agent, with faults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from lpmosd.agent.client import RetryPolicy
from lpmosd.agent.facts import HardwareFacts
from lpmosd.agent.main import (
    EXIT_CANCELLED,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_OK,
    AgentOptions,
    run_agent,
)
from lpmosd.documents import Nic

from .agent_fakes import API, FakeRegional, FakeTask

MAC = "00:1a:2b:3c:4d:5e"
FACTS = HardwareFacts(
    cpu_model="Test CPU",
    cpu_cores=4,
    memory_bytes=8 << 30,
    nics=(Nic(name="eno1", mac=MAC, speed_mbps=1000),),
    default_mac=MAC,
)


def options(regional: FakeRegional, **kw: Any) -> AgentOptions:
    base: dict[str, Any] = {
        "regional_url": "http://regional:8081",
        "sn": "sn-001",
        "facts": FACTS,
        "transport": regional.transport,
        "poll_interval": 0.02,
        "register_retry_interval": 0.02,
        "retry": RetryPolicy(initial=0.01, maximum=0.05, total=10),
        "log_flush_interval": 0.05,
        "kill_grace": 0.5,
    }
    base.update(kw)
    return AgentOptions(**base)


def sh_plan(*steps: tuple[str, str], timeout: float = 10) -> dict[str, Any]:
    return {
        "name": "test",
        "steps": [
            {"name": name, "command": ["/bin/sh", "-c", script], "timeout": timeout}
            for name, script in steps
        ],
    }


def _pid_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def _until(predicate: Any, timeout: float = 5) -> None:
    # Polling: the states we wait for (files, a fake's counters) have no event to wait on.
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


def percents(regional: FakeRegional, step: str) -> list[int]:
    return [p for s, p in regional.progress_calls if s == step]


async def test_demo_install_after_approval() -> None:
    regional = FakeRegional()
    task = regional.add_task()
    async with trio.open_nursery() as nursery:

        async def operator() -> None:
            await _until(lambda: regional.registrations == 1)
            await trio.sleep(0.2)
            assert task.status == "pending" and not regional.progress_calls  # waiting
            task.status = "approved"

        nursery.start_soon(operator)
        code = await run_agent(options(regional))
    assert code == EXIT_OK
    assert task.status == "completed"
    assert task.hardware == FACTS.to_dict()
    for step in ("partitioning", "base_system", "bootloader"):
        assert percents(regional, step) == [0, 50, 100]
        assert f"simulating step {step} for 0.05s (no command is run)" in task.log_lines
    assert task.log_lines[0] == "agent: plan demo: running partitioning, base_system, bootloader"
    assert [s for s, _ in regional.progress_calls][::3] == [
        "partitioning",
        "base_system",
        "bootloader",
    ]
    assert regional.heartbeats >= 1


async def test_start_returns_once_registered() -> None:
    regional = FakeRegional()
    task = regional.add_task()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_agent, options(regional))
        assert regional.registrations == 1
        assert task.status == "pending"
        nursery.cancel_scope.cancel()


async def test_command_plan_with_placeholders() -> None:
    regional = FakeRegional(
        plan={
            "name": "ubuntu",
            "steps": [
                {
                    "name": "show",
                    "command": ["/usr/bin/printf", "%s|", "{sn}", "{mac}", "{os_type}", "{idc}"],
                    "timeout": 5,
                },
                {"name": "env", "command": ["/bin/sh", "-c", "echo $LPMOS_DISK_LAYOUT"],
                 "timeout": 5},
            ],
        }
    )  # fmt: skip
    task = regional.add_task(status="approved", os_type="Ubuntu 22.04", disk_layout="raid1")
    assert await run_agent(options(regional)) == EXIT_OK
    assert f"sn-001|{MAC}|Ubuntu 22.04|dc1|" in task.log_lines
    assert "raid1" in task.log_lines
    assert task.status == "completed"


async def test_failing_step_fails_the_task() -> None:
    regional = FakeRegional(
        plan=sh_plan(
            ("ok", "echo fine"),
            ("write", "echo writing; echo 'disk full' >&2; exit 4"),
            ("never", "echo should not run"),
        )
    )
    task = regional.add_task(status="approved")
    assert await run_agent(options(regional)) == EXIT_FAILED
    assert task.status == "failed"
    assert task.reason == "step write failed: exit code 4; last output: writing | disk full"
    assert ("ERROR", task.reason) in task.logs
    assert percents(regional, "write") == [0]
    assert percents(regional, "never") == []
    assert "should not run" not in task.log_lines


async def test_step_timeout_fails_the_task() -> None:
    # The shortest timeout a plan may have (lpmosd.plan): 1 s.
    regional = FakeRegional(plan=sh_plan(("hang", "sleep 30"), timeout=1))
    task = regional.add_task(status="approved")
    with trio.fail_after(5):
        assert await run_agent(options(regional)) == EXIT_FAILED
    assert task.reason == "step hang failed: timed out after 1s"


async def test_cancel_seen_by_heartbeat_kills_the_step(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    regional = FakeRegional(plan=sh_plan(("long", f"echo $$ > {pidfile}; exec sleep 30")))
    task = regional.add_task(status="approved")
    async with trio.open_nursery() as nursery:

        async def operator() -> None:
            await _until(pidfile.exists)
            task.status = "cancelled"

        nursery.start_soon(operator)
        with trio.fail_after(5):
            assert await run_agent(options(regional)) == EXIT_CANCELLED
    await _until(lambda: _pid_gone(int(pidfile.read_text())))
    assert task.status == "cancelled"
    assert not any(p.endswith(("/complete", "/fail")) for _, p, _ in regional.calls)


async def test_cancel_seen_by_progress_409() -> None:
    plan = {
        "name": "demo",
        "steps": [{"name": "a", "command": [], "timeout": 5, "simulate": 0.4},
                  {"name": "b", "command": [], "timeout": 5, "simulate": 0.4}],
    }  # fmt: skip
    regional = FakeRegional(plan=plan, heartbeat_interval=100)  # one heartbeat, at the start
    task = regional.add_task(status="approved")
    async with trio.open_nursery() as nursery:

        async def operator() -> None:
            await _until(lambda: percents(regional, "a") == [0])
            task.status = "cancelled"

        nursery.start_soon(operator)
        assert await run_agent(options(regional)) == EXIT_CANCELLED
    assert regional.heartbeats == 1
    assert percents(regional, "b") == []


async def test_regional_failing_the_task_stops_the_agent(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    regional = FakeRegional(plan=sh_plan(("long", f"echo $$ > {pidfile}; exec sleep 30")))
    task = regional.add_task(status="approved")
    async with trio.open_nursery() as nursery:

        async def reaper() -> None:
            await _until(pidfile.exists)
            task.status = "failed"  # e.g. the control plane thought our lease was lost

        nursery.start_soon(reaper)
        assert await run_agent(options(regional)) == EXIT_FAILED
    await _until(lambda: _pid_gone(int(pidfile.read_text())))


async def test_cancelled_while_waiting_for_approval() -> None:
    regional = FakeRegional()
    task = regional.add_task()
    async with trio.open_nursery() as nursery:

        async def operator() -> None:
            await _until(lambda: regional.registrations == 1)
            task.status = "cancelled"

        nursery.start_soon(operator)
        assert await run_agent(options(regional)) == EXIT_CANCELLED


async def test_resume_from_and_steps_already_done() -> None:
    regional = FakeRegional()
    done = {"percent": 100, "timestamp": "2026-01-30T12:00:00Z", "message": "done"}
    task = regional.add_task(
        status="approved",
        resume_from="base_system",
        progress=[
            {"step": "hardware_collect", **done},
            {"step": "partitioning", "percent": 40, "timestamp": "2026-01-30T12:00:00Z",
             "message": ""},
            {"step": "bootloader", **done},
        ],
    )  # fmt: skip
    assert await run_agent(options(regional)) == EXIT_OK
    # partitioning is before resume_from, bootloader is already done.
    assert [s for s, _ in regional.progress_calls] == ["base_system"] * 3
    assert task.status == "completed"


async def test_waits_for_the_task_to_exist() -> None:
    regional = FakeRegional()
    async with trio.open_nursery() as nursery:

        async def operator() -> None:
            await _until(lambda: regional.registrations >= 3)
            regional.add_task(status="approved")

        nursery.start_soon(operator)
        assert await run_agent(options(regional)) == EXIT_OK
    assert regional.tasks["sn-001"].status == "completed"


async def test_mac_mismatch_is_retried_until_fixed() -> None:
    regional = FakeRegional()
    task = regional.add_task(mac="00:00:00:00:00:01", status="approved")
    async with trio.open_nursery() as nursery:

        async def operator() -> None:
            await _until(lambda: regional.registrations >= 2)
            task.mac = MAC

        nursery.start_soon(operator)
        assert await run_agent(options(regional)) == EXIT_OK


async def test_survives_a_regional_restart(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    regional = FakeRegional(
        plan=sh_plan(
            ("first", "echo one"),
            ("middle", f"echo run >> {counter}; echo before; sleep 1; echo after"),
            ("last", "echo three"),
        )
    )
    task = regional.add_task(status="approved")
    async with trio.open_nursery() as nursery:

        async def restart() -> None:
            await _until(lambda: percents(regional, "middle") == [0])
            regional.down = True  # the regional process is gone...
            await trio.sleep(1.5)
            regional.down = False
            regional.unavailable = 5  # ...then up, without its etcd session for a while

        nursery.start_soon(restart)
        assert await run_agent(options(regional)) == EXIT_OK
    assert counter.read_text() == "run\n"  # the step ran once, not restarted
    assert task.status == "completed"
    for step in ("first", "middle", "last"):
        assert percents(regional, step) == [0, 100]
    assert task.log_lines.count("before") == 1
    assert task.log_lines.count("after") == 1
    heartbeats = [p for _, p, _ in regional.calls if p.endswith("/heartbeat")]
    assert len(heartbeats) > 3  # heartbeats kept trying during the outage


async def test_reregisters_when_the_token_is_refused() -> None:
    regional = FakeRegional(issue_tokens=True, secret="s3cret")
    task = regional.add_task(status="approved")
    async with trio.open_nursery() as nursery:

        async def forget() -> None:
            await _until(lambda: percents(regional, "base_system") == [0])
            regional.revoke_tokens()

        nursery.start_soon(forget)
        code = await run_agent(options(regional, enrollment_secret="s3cret"))
    assert code == EXIT_OK
    assert task.status == "completed"
    assert regional.registrations == 2
    assert all(
        b.get("enrollment_secret") == "s3cret"
        for _, p, b in regional.calls
        if p.endswith("/register")
    )


async def test_lost_lease_while_pending_registers_again() -> None:
    """The regional says 409 "no live lease" on heartbeat: the task is still pending, so the
    agent registers again (new lease) instead of giving up."""
    regional = FakeRegional()
    task = regional.add_task()
    async with trio.open_nursery() as nursery:

        async def operator() -> None:
            await _until(lambda: regional.heartbeats >= 1)
            regional.lease_lost.add("sn-001")
            await _until(lambda: regional.registrations == 2)
            task.status = "approved"

        nursery.start_soon(operator)
        assert await run_agent(options(regional)) == EXIT_OK
    assert task.status == "completed"


async def test_lost_lease_after_the_task_failed_stops() -> None:
    regional = FakeRegional(plan=sh_plan(("long", "sleep 30")))
    task = regional.add_task(status="approved")
    async with trio.open_nursery() as nursery:

        async def reaper() -> None:
            await _until(lambda: percents(regional, "long") == [0])
            task.status = "failed"
            regional.lease_lost.add("sn-001")

        nursery.start_soon(reaper)
        with trio.fail_after(5):
            assert await run_agent(options(regional)) == EXIT_FAILED
    assert regional.registrations == 1


async def test_refused_registration_exits_2() -> None:
    regional = FakeRegional(secret="s3cret")
    regional.add_task(status="approved")
    assert await run_agent(options(regional, enrollment_secret="wrong")) == EXIT_ERROR
    assert regional.registrations == 1


async def test_unreachable_regional_exits_2() -> None:
    regional = FakeRegional()
    regional.down = True
    opts = options(
        regional, register_timeout=0.3, retry=RetryPolicy(initial=0.01, maximum=0.02, total=0.1)
    )
    with trio.fail_after(5):
        assert await run_agent(opts) == EXIT_ERROR


async def test_no_mac_exits_2(tmp_path: Path) -> None:
    regional = FakeRegional()
    opts = options(regional, facts=None, sysroot=tmp_path)  # empty tree: no NIC
    assert await run_agent(opts) == EXIT_ERROR
    assert regional.calls == []


async def test_facts_and_default_mac_from_sysroot(tmp_path: Path) -> None:
    net = tmp_path / "sys/class/net/eth0"
    (net / "device").mkdir(parents=True)
    (net / "address").write_text("02:AA:BB:CC:DD:EE\n")
    regional = FakeRegional()
    task = regional.add_task(mac="02:aa:bb:cc:dd:ee", status="approved")
    assert await run_agent(options(regional, facts=None, sysroot=tmp_path)) == EXIT_OK
    assert task.hardware is not None
    assert task.hardware["nics"] == [{"name": "eth0", "mac": "02:aa:bb:cc:dd:ee",
                                      "speed_mbps": None}]  # fmt: skip


async def test_no_plan_fails_the_task() -> None:
    regional = FakeRegional()
    regional.serve_plan = False
    task = regional.add_task(status="approved", os_type="Plan9")
    assert await run_agent(options(regional)) == EXIT_FAILED
    assert task.reason == "cannot install: no install plan for os_type 'Plan9'"


async def test_malformed_plan_fails_the_task() -> None:
    regional = FakeRegional(plan={"name": "x", "steps": [{"name": "a", "command": "rm -rf /"}]})
    task = regional.add_task(status="approved")
    assert await run_agent(options(regional)) == EXIT_FAILED
    assert task.reason == "cannot install: plan.steps[0].command: must be a list of strings"


async def test_unexpected_refusal_fails_the_task() -> None:
    """A 400 on a progress report (a regional bug or a contract mismatch): the agent gives
    up (exit 2) but fails the task first, so the operator need not wait for the lease."""
    regional = FakeRegional()
    task = regional.add_task(status="approved")

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/progress"):
            regional.calls.append((request.method, request.url.path, None))
            return httpx.Response(400, json={"error": "percent is wrong", "field": "percent"})
        return await regional.handle(request)

    assert await run_agent(options(regional, transport=httpx.MockTransport(handler))) == EXIT_ERROR
    assert task.status == "failed"
    assert task.reason == "agent error: HTTP 400: percent is wrong"


async def test_lost_answer_to_complete() -> None:
    """complete landed but its answer was lost: the retry gets 409, the task says completed."""
    regional = FakeRegional()
    task = regional.add_task(status="approved")
    lost = False

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal lost
        response = await regional.handle(request)
        if request.url.path.endswith("/complete") and not lost:
            lost = True
            raise httpx.ReadError("connection reset", request=request)
        return response

    opts = options(regional, transport=httpx.MockTransport(handler))
    assert await run_agent(opts) == EXIT_OK
    assert task.status == "completed"
    completes = [p for _, p, _ in regional.calls if p == f"{API}/sn-001/complete"]
    assert len(completes) == 2


@pytest.mark.parametrize("status", ["completed", "cancelled"])
async def test_finished_task_is_not_registrable(status: str) -> None:
    """A machine booting into the agent after its task ended waits for a new task."""
    regional = FakeRegional()
    regional.add_task(status=status)
    opts = options(regional, register_timeout=0.2)
    assert await run_agent(opts) == EXIT_ERROR
    assert regional.registrations >= 2


def test_fake_task_defaults() -> None:
    assert FakeTask(sn="x", mac=MAC).view()["status"] == "pending"
