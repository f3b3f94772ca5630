"""The agent against the real daemon (control plane + regional) on a real etcd.

The control-plane calls are made over HTTP as an operator would (the guide's curl body
verbatim); the agent is :func:`run_agent` in this process, or ``python -m lpmosd agent``
as a separate process. Plans are fast (simulated steps of a fraction of a second, or
short shell commands) so the whole file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
from provisioning_kit import (
    GUIDE_TASK,
    free_port,
    make_config,
    open_control_api,
    open_daemon,
    publish_os_types,
    wait_for,
)

from lpmosd import schema
from lpmosd.agent.client import RetryPolicy
from lpmosd.agent.main import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, AgentOptions, run_agent
from lpmosd.config import ROLE_CONTROL_PLANE, ROLE_REGIONAL, Config
from lpmosd.daemon import Daemon
from lpmosd.documents import Task
from lpmosd.etcd import open_client
from lpmosd.etcd_process import EtcdProcess
from lpmosd.plan import Plan, PlanStep
from lpmosd.store import Store
from lpmosd.tokens import Role

IDC, SN, MAC = "dc1", "sn-001", "00:1a:2b:3c:4d:5e"
OS = GUIDE_TASK["os_type"]  # "Ubuntu 22.04": the tests give it a fast plan


def sim(name: str, seconds: float = 0.05) -> PlanStep:
    return PlanStep(name=name, timeout=30, simulate=seconds)


def sh(name: str, script: str, timeout: float = 30) -> PlanStep:
    return PlanStep(name=name, command=("/bin/sh", "-c", script), timeout=timeout)


def with_plan(config: Config, steps: Sequence[PlanStep]) -> Config:
    """``config`` with ``steps`` as the plan of the guide's os_type."""
    rg = config.regional
    assert rg is not None
    plans = dict(rg.plans)
    plans[OS] = Plan(os_type=OS, steps=tuple(steps))
    return dataclasses.replace(
        config, regional=dataclasses.replace(rg, plans=types.MappingProxyType(plans))
    )


def agent_options(url: str, **kw: Any) -> AgentOptions:
    base: dict[str, Any] = {
        "regional_url": url,
        "sn": SN,
        "mac": MAC,
        "poll_interval": 0.05,
        "register_retry_interval": 0.1,
        "retry": RetryPolicy(initial=0.05, maximum=0.5, total=60),
        "log_flush_interval": 0.05,
        "kill_grace": 1.0,
    }
    base.update(kw)
    return AgentOptions(**base)


class Operator:
    """The control-plane API over HTTP, with an operator token."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        #: The enrolment secret of the last create or retry (for the agent's options).
        self.secret = ""

    async def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        r = await self.http.request(method, path, json=body)
        assert r.is_success, (method, path, r.status_code, r.text)
        out: dict[str, Any] = r.json()
        if "enrollment_secret" in out:
            self.secret = out.pop("enrollment_secret")
        # Read answers add the agent's state to the task document (not part of it).
        out.pop("agent_state", None)
        out.pop("agent_unreachable_since", None)
        return out

    async def create(self) -> dict[str, Any]:
        return await self.call("POST", "/api/v1/tasks", GUIDE_TASK)

    async def task(self) -> Task:
        return Task.from_dict(await self.call("GET", f"/api/v1/tasks/{IDC}/{SN}"))

    async def act(self, action: str, body: Any = None) -> Task:
        return Task.from_dict(await self.call("POST", f"/api/v1/tasks/{IDC}/{SN}/{action}", body))


@asynccontextmanager
async def operator_of(daemon: Daemon) -> AsyncIterator[Operator]:
    async with open_control_api(daemon, Role.OPERATOR) as http:
        http.timeout = httpx.Timeout(10)
        yield Operator(http)


async def meta_reported(store: Store) -> bool:
    return await store.get_meta(IDC, SN) is not None


def _pid_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def test_guide_flow(etcd: EtcdProcess) -> None:
    """curl create → agent registers with real facts → approve → install → completed."""
    config = with_plan(
        make_config(etcd.endpoints),
        [
            sim("partitioning"),
            sh("base_system", "echo installing {os_type} {os_version} on {sn} / {mac} in {idc}"),
            sh("network", 'echo "net=$LPMOS_NETWORK_CONFIG disk=$LPMOS_DISK_LAYOUT" >&2'),
            sim("bootloader"),
        ],
    )
    async with (
        open_daemon(config) as daemon,
        operator_of(daemon) as op,
        open_client(etcd.endpoints) as client,
    ):
        assert (await op.create())["status"] == "pending"
        store = Store(client)
        async with trio.open_nursery() as nursery:
            result: list[int] = []

            async def agent() -> None:
                result.append(
                    await run_agent(
                        agent_options(daemon.urls["regional"], enrollment_secret=op.secret)
                    )
                )

            nursery.start_soon(agent)
            await wait_for(lambda: meta_reported(store), what="hardware report")
            await trio.sleep(0.2)
            assert (await op.task()).status.value == "pending"  # the agent waits
            await op.act("approve", {"approved_by": "admin@example.com", "notes": "ok"})
        assert result == [EXIT_OK]

        task = await op.task()
        assert task.status.value == "completed"
        assert [c.status.value for c in task.status_history] == [
            "pending",
            "approved",
            "installing",
            "completed",
        ]
        assert {p.step: p.percent for p in task.progress} == {
            "hardware_collect": 100,
            "partitioning": 100,
            "base_system": 100,
            "network": 100,
            "bootloader": 100,
        }
        text = "\n".join(task.logs)
        assert f"installing Ubuntu 22.04 22.04 on {SN} / {MAC} in {IDC}" in text
        assert "net=dhcp disk=auto" in text
        assert "simulating step partitioning" in text

        # Raw keys: meta holds this machine's real facts; the lease is gone with the task.
        meta_kv = await client.get(schema.meta_key(IDC, SN))
        assert meta_kv is not None
        meta = json.loads(meta_kv.value)
        assert meta["cpu_cores"] >= 1 and meta["memory_bytes"] > 0
        assert await client.get(schema.lease_key(IDC, SN)) is None


async def test_failed_step_then_retry_resumes(etcd: EtcdProcess, tmp_path: Path) -> None:
    count, marker = tmp_path / "count", tmp_path / "marker"
    config = with_plan(
        make_config(etcd.endpoints),
        [
            sh("prepare", f"echo run >> {count}"),
            sh("flaky", f"if [ ! -e {marker} ]; then echo 'no marker yet' >&2; exit 7; fi"),
            sim("finish"),
        ],
    )
    async with open_daemon(config) as daemon, operator_of(daemon) as op:
        await op.create()
        await op.act("approve", {})
        url = daemon.urls["regional"]
        assert await run_agent(agent_options(url, enrollment_secret=op.secret)) == EXIT_FAILED
        task = await op.task()
        assert task.status.value == "failed"
        assert task.error is not None and "step flaky failed: exit code 7" in task.error
        assert "no marker yet" in task.error

        retried = await op.act("retry")
        assert retried.status.value == "approved"
        assert retried.resume_from == "flaky"
        marker.touch()
        # The retry issued a new enrolment secret (the first one died with the failure).
        assert await run_agent(agent_options(url, enrollment_secret=op.secret)) == EXIT_OK
        assert (await op.task()).status.value == "completed"
    assert count.read_text() == "run\n"  # "prepare" was not run again


async def test_operator_cancel_kills_the_running_step(etcd: EtcdProcess, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    config = with_plan(
        make_config(etcd.endpoints, heartbeat_interval=1, agent_lease_ttl=5),
        [sh("long", f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 60")],
    )
    async with open_daemon(config) as daemon, operator_of(daemon) as op:
        await op.create()
        await op.act("approve", {})
        async with trio.open_nursery() as nursery:
            result: list[int] = []

            async def agent() -> None:
                result.append(
                    await run_agent(
                        agent_options(daemon.urls["regional"], enrollment_secret=op.secret)
                    )
                )

            nursery.start_soon(agent)
            await wait_for(pidfile.exists, what="the step to start")
            await op.act("cancel", {"reason": "wrong rack"})
            cancelled_at = trio.current_time()
        assert result == [EXIT_CANCELLED]
        assert trio.current_time() - cancelled_at < 3  # within a heartbeat or two
        assert (await op.task()).status.value == "cancelled"
    await wait_for(lambda: _pid_gone(int(pidfile.read_text())), what="the step to die")


async def test_regional_restart_mid_install(etcd: EtcdProcess, tmp_path: Path) -> None:
    """The regional goes away for 2 s during a step: the agent keeps the step running,
    retries its calls, and the install completes with nothing failed or repeated."""
    started, count = tmp_path / "started", tmp_path / "count"
    port = free_port()
    config = with_plan(
        make_config(etcd.endpoints, regional_port=port),
        [
            sim("partitioning"),
            sh(
                "packages",
                f"echo run >> {count}; touch {started}; echo before; sleep 3; echo after",
            ),
            sim("bootloader"),
        ],
    )
    cp_config = dataclasses.replace(config, roles=frozenset({ROLE_CONTROL_PLANE}), regional=None)
    rg_config = dataclasses.replace(config, roles=frozenset({ROLE_REGIONAL}), control_plane=None)
    async with open_daemon(cp_config) as cp, operator_of(cp) as op:
        # The regional is not up yet: publish what it will offer, as its first start did.
        assert rg_config.regional is not None
        await publish_os_types(cp, "dc1", tuple(sorted(rg_config.regional.plans)))
        await op.create()
        await op.act("approve", {})
        async with trio.open_nursery() as nursery:
            result: list[int] = []

            async def agent() -> None:
                opts = agent_options(f"http://127.0.0.1:{port}", enrollment_secret=op.secret)
                result.append(await run_agent(opts))

            async with open_daemon(rg_config):
                nursery.start_soon(agent)
                await wait_for(started.exists, what="the long step")
            # The regional is down now (its port refuses connections).
            await trio.sleep(2)
            async with open_daemon(rg_config):
                with trio.fail_after(30):
                    while not result:  # noqa: ASYNC110 - the agent task sets it
                        await trio.sleep(0.05)
        assert result == [EXIT_OK]
        task = await op.task()
        assert task.status.value == "completed"
        assert "failed" not in [c.status.value for c in task.status_history]
        lines = [line.split("] ", 1)[-1] for line in task.logs]
        # A batch the old regional stored but could not answer for is sent again with the
        # same Idempotency-Key: recognised, stored once.
        assert lines.count("before") == 1 and lines.count("after") == 1
    assert count.read_text() == "run\n"


async def test_agent_process(etcd: EtcdProcess, tmp_path: Path) -> None:
    """``python -m lpmosd agent`` as its own process, against the daemon."""
    config = with_plan(make_config(etcd.endpoints), [sim("a"), sh("b", "echo from {sn}")])
    async with open_daemon(config) as daemon, operator_of(daemon) as op:
        await op.create()
        await op.act("approve", {})
        secret_file = tmp_path / "enrollment-secret"
        secret_file.write_text(op.secret + "\n")
        argv = [
            sys.executable,
            "-m",
            "lpmosd",
            "agent",
            f"--regional-url={daemon.urls['regional']}",
            f"--sn={SN}",
            f"--mac={MAC}",
            f"--enrollment-secret-file={secret_file}",
            "--poll-interval=0.1",
            "--log-format=json",
        ]
        with trio.fail_after(30):
            proc = await trio.run_process(argv, capture_stderr=True, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 0, err
        events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert any(e["msg"] == "install completed" for e in events)
        task = await op.task()
        assert task.status.value == "completed"
        assert any(line.endswith(f"from {SN}") for line in task.logs)
