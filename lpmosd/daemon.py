"""The supervisor: one etcd client, each role in its own nursery, signals, readiness."""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from lpmosd._trio_util import open_nursery
from lpmosd.config import Config, EtcdConfig
from lpmosd.etcd import EtcdClient, ensure_loop, open_client
from lpmosd.opsutil import etcd_credentials
from lpmosd.roles.control_plane import ControlPlane
from lpmosd.roles.regional import Regional
from lpmosd.store import Store

log = logging.getLogger("lpmosd.daemon")


@dataclass(eq=False)
class Daemon:
    """What is running: the roles and the URLs they serve."""

    client: EtcdClient
    urls: dict[str, str] = field(default_factory=dict)
    control_plane: ControlPlane | None = None
    regional: Regional | None = None


@asynccontextmanager
async def open_etcd(cfg: EtcdConfig) -> AsyncIterator[EtcdClient]:
    """An etcd client configured from the ``[etcd]`` section."""
    tls, auth = etcd_credentials(cfg)
    async with open_client(
        list(cfg.endpoints),
        tls=tls,
        auth=auth,
        request_timeout=cfg.request_timeout,
        keepalive_interval=cfg.keepalive_interval,
    ) as client:
        yield client


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) about our state; False when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(addr)
        sock.sendall(message.encode())
    return True


async def run_daemon(
    config: Config, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the configured roles until cancelled; reports a :class:`Daemon` once serving."""
    async with open_etcd(config.etcd) as client:
        store = Store(client)
        daemon = Daemon(client)
        async with open_nursery() as nursery:
            if config.control_plane is not None:
                daemon.control_plane = ControlPlane(config.control_plane, client, store)
                daemon.urls["control-plane"] = await nursery.start(daemon.control_plane.run)
            if config.regional is not None:
                daemon.regional = Regional(config.regional, client, store)
                daemon.urls["regional"] = await nursery.start(daemon.regional.run)
            log.info("lpmosd ready", extra={"roles": sorted(config.roles), **daemon.urls})
            sd_notify("READY=1")
            task_status.started(daemon)


async def serve_until_signalled(config: Config) -> None:
    """``lpmosd run``: the daemon until SIGTERM/SIGINT, then a bounded graceful stop."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with ensure_loop(), open_nursery() as nursery:
            await nursery.start(run_daemon, config)
            async for signum in signals:
                log.info("shutting down", extra={"signal": signal.Signals(signum).name})
                sd_notify("STOPPING=1")
                # Cleanups (session lease revoke, connection close) are shielded and
                # bounded individually; cancelling unwinds every role's nursery.
                nursery.cancel_scope.cancel()
                break
