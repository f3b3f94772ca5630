"""The supervisor: one etcd client, the roles and their HTTP apps, signals, readiness.

This is where roles and apps meet: each role is core state plus background work
(:mod:`lpmosd.roles`), each app is HTTP over it (:mod:`lpmosd.web`); the daemon builds
both and serves the app, so that web depends on the roles and never the other way.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio
from quart_trio import QuartTrio

from lpmosd._trio_util import open_nursery
from lpmosd.config import Config, ControlPlaneConfig, EtcdConfig, RegionalConfig
from lpmosd.etcd import EtcdClient, ensure_loop, open_client
from lpmosd.opsutil import etcd_credentials
from lpmosd.roles.control_plane import ControlPlane
from lpmosd.roles.regional import Regional
from lpmosd.store import Store
from lpmosd.web.agent_app import FAST_PATH, create_agent_app
from lpmosd.web.control_app import create_control_app
from lpmosd.web.lean import serve_lean
from lpmosd.web.server import serve_app

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
                cp = daemon.control_plane = ControlPlane(config.control_plane, client, store)
                app = create_control_app(cp)
                await nursery.start(cp.run)  # the view is synced before the API answers
                url = await nursery.start(_serve, app, config.control_plane)
                log.info("control plane listening", extra={"url": url})
                daemon.urls["control-plane"] = url
            if config.regional is not None:
                rg = daemon.regional = Regional(config.regional, client, store)
                # Served first: the regional advertises its URL in its session key.
                url = await nursery.start(_serve_regional, create_agent_app(rg), config.regional)
                await nursery.start(partial(rg.run, url=url))
                daemon.urls["regional"] = url
            log.info("lpmosd ready", extra={"roles": sorted(config.roles), **daemon.urls})
            sd_notify("READY=1")
            task_status.started(daemon)


async def _serve(
    app: QuartTrio,
    cfg: ControlPlaneConfig | RegionalConfig,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_app(
        app,
        host=cfg.listen,
        port=cfg.port,
        certfile=cfg.tls_cert_file,
        keyfile=cfg.tls_key_file,
        task_status=task_status,
    )


async def _serve_regional(
    app: QuartTrio, cfg: RegionalConfig, *, task_status: trio.TaskStatus[str]
) -> None:
    fast = app.extensions.get(FAST_PATH)
    if cfg.http_server == "lean" and cfg.tls_cert_file is None and fast is not None:
        await serve_lean(
            app.asgi_app,
            fast,
            host=cfg.listen,
            port=cfg.port,
            max_body=cfg.max_body_bytes,
            task_status=task_status,
        )
        return
    await _serve(app, cfg, task_status=task_status)


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
