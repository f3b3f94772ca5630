"""``lpmosd dev``: a private etcd, both roles for one IDC, and a demo install, zero config."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from dataclasses import dataclass

import trio

from lpmosd._trio_util import open_nursery
from lpmosd.config import dev_config
from lpmosd.daemon import Daemon, run_daemon
from lpmosd.errors import ConflictError, NotFoundError
from lpmosd.etcd import ensure_loop
from lpmosd.etcd_process import EtcdProcess
from lpmosd.models import CreateTaskRequest, TaskStatus

log = logging.getLogger("lpmosd.dev")

DEMO_SN = "demo-001"
DEMO_MAC = "52:54:00:12:34:56"


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


async def run_demo(daemon: Daemon, idc: str, regional_url: str) -> int:
    """Create a demo task, run an in-process agent, approve once it has reported hardware."""
    from lpmosd.agent.main import AgentOptions, run_agent

    assert daemon.control_plane is not None
    store = daemon.control_plane.store
    req = CreateTaskRequest(idc=idc, sn=DEMO_SN, mac=DEMO_MAC, os_type="demo", os_version="1")
    # A live demo task from an earlier run (same etcd): carry on with it.
    with contextlib.suppress(ConflictError):
        await store.create_task(req, actor="lpmosd-dev")
    _say(f"demo: task {idc}/{DEMO_SN} created; starting its agent")
    started = trio.current_time()
    async with open_nursery() as nursery:
        result: list[int] = []

        async def agent() -> None:
            opts = AgentOptions(regional_url=regional_url, sn=DEMO_SN, mac=DEMO_MAC)
            result.append(await run_agent(opts))

        nursery.start_soon(agent)
        # Approve once the agent has reported its hardware, as an operator would.
        while (await store.get_meta(idc, DEMO_SN)) is None:  # noqa: ASYNC110 - polls etcd
            await trio.sleep(0.2)
        stored = await store.get_task(idc, DEMO_SN)
        if stored.task.status is TaskStatus.PENDING:
            await store.approve(
                idc, DEMO_SN, approved_by="lpmosd-dev", notes="hardware reported; auto-approved"
            )
            _say("demo: hardware reported; task approved")
    try:
        final = (await store.get_task(idc, DEMO_SN)).task.status
    except NotFoundError:
        final = None
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
                _say(
                    f"\nlpmosd dev is up (Ctrl-C stops everything)\n"
                    f"  dashboard + API : {cp}/   (e.g. curl {cp}/api/v1/tasks)\n"
                    f"  agent API ({opts.idc}) : {rg}/\n"
                )
                if opts.demo:
                    nursery.start_soon(run_demo, daemon, opts.idc, rg)
                async for _ in signals:
                    _say("stopping ...")
                    nursery.cancel_scope.cancel()
                    break
    finally:
        if etcd is not None:
            with trio.CancelScope(shield=True):
                await etcd.aclose()
    return 0
