"""``lpmosd dev``: a private etcd, both roles for one IDC, and a demo install, zero config.

It creates an admin API token (``dev-admin``) at start and prints it: the API needs one,
and the demo itself goes through the API with it, as an operator would (create the task,
hand its enrolment secret to the agent, approve).
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from lpmosd._trio_util import open_nursery
from lpmosd.config import dev_config
from lpmosd.daemon import Daemon, run_daemon
from lpmosd.etcd import ensure_loop
from lpmosd.etcd_process import EtcdProcess
from lpmosd.tokens import Role

log = logging.getLogger("lpmosd.dev")

DEMO_SN = "demo-001"
DEMO_MAC = "52:54:00:12:34:56"
DEV_TOKEN_NAME = "dev-admin"


@dataclass(frozen=True, slots=True)
class DevOptions:
    """What ``lpmosd dev`` runs."""

    etcd_endpoints: list[str] | None = None
    control_plane_port: int = 8080
    regional_port: int = 8081
    demo: bool = True
    idc: str = "dc1"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def run_demo(daemon: Daemon, idc: str, regional_url: str, token: str) -> int:
    """Create a demo task through the API, run an in-process agent with the task's
    enrolment secret, approve once the agent has reported its hardware."""
    from lpmosd.agent.main import AgentOptions, run_agent

    base = daemon.urls["control-plane"]
    headers = {"Authorization": f"Bearer {token}"}
    task_path = f"/api/v1/tasks/{idc}/{DEMO_SN}"
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as api:

        async def call(method: str, path: str, body: Any = None) -> httpx.Response:
            return await api.request(method, path, json=body)

        r = await call(
            "POST",
            "/api/v1/tasks",
            {"idc": idc, "sn": DEMO_SN, "mac": DEMO_MAC, "os_type": "demo", "os_version": "1"},
        )
        if r.status_code == 409:
            # A live demo task from an earlier run (same etcd): a fresh secret for it.
            r = await call("POST", f"{task_path}/enrollment", {})
        r.raise_for_status()
        secret = r.json()["enrollment_secret"]
        _say(f"demo: task {idc}/{DEMO_SN} created; starting its agent")
        started = trio.current_time()
        async with open_nursery() as nursery:
            result: list[int] = []

            async def agent() -> None:
                opts = AgentOptions(
                    regional_url=regional_url, sn=DEMO_SN, mac=DEMO_MAC, enrollment_secret=secret
                )
                result.append(await run_agent(opts))

            nursery.start_soon(agent)
            # Approve once the agent has reported its hardware, as an operator would.
            while True:
                task = (await call("GET", task_path)).json()
                if any(p.get("step") == "hardware_collect" for p in task.get("progress", [])):
                    break
                await trio.sleep(0.2)
            if task.get("status") == "pending":
                r = await call("POST", f"{task_path}/approve", {"notes": "auto-approved"})
                r.raise_for_status()
                _say("demo: hardware reported; task approved")
        r = await call("GET", task_path)
        final = r.json().get("status") if r.status_code == 200 else None
    took = trio.current_time() - started
    _say(f"demo: agent exited {result[0]}; task is {final} after {took:.1f}s")
    return result[0]


async def run_dev(opts: DevOptions) -> int:
    """Run everything until Ctrl-C."""
    etcd: EtcdProcess | None = None
    if opts.etcd_endpoints is None:
        etcd = EtcdProcess(name="lpmosd-dev")
        await etcd.astart()
        endpoints = etcd.endpoints
        _say(f"etcd: private server at {etcd.endpoint} (data in {etcd.workdir})")
    else:
        endpoints = opts.etcd_endpoints
    config = dev_config(
        etcd_endpoints=endpoints,
        idc=opts.idc,
        control_plane_port=opts.control_plane_port,
        regional_port=opts.regional_port,
    )
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with ensure_loop(), open_nursery() as nursery:
                daemon: Daemon = await nursery.start(run_daemon, config)
                cp, rg = daemon.urls["control-plane"], daemon.urls["regional"]
                assert daemon.control_plane is not None
                # Dev only: an admin token, re-created on every start and printed for the
                # developer's terminal (lpmosd never prints or logs tokens otherwise).
                _, token = await daemon.control_plane.tokens.create(
                    DEV_TOKEN_NAME, Role.ADMIN, actor="lpmosd-dev", replace_active=True
                )
                _say(
                    f"\nlpmosd dev is up (Ctrl-C stops everything)\n"
                    f"  dashboard + API : {cp}/   (sign in with the admin token)\n"
                    f"  admin token     : {token}\n"
                    f'  e.g.            : curl -H "Authorization: Bearer {token}" '
                    f"{cp}/api/v1/tasks\n"
                    f"  agent API ({opts.idc}) : {rg}/\n"
                )
                if opts.demo:
                    nursery.start_soon(run_demo, daemon, opts.idc, rg, token)
                async for _ in signals:
                    _say("stopping ...")
                    nursery.cancel_scope.cancel()
                    break
    finally:
        if etcd is not None:
            with trio.CancelScope(shield=True):
                await etcd.aclose()
    return 0
