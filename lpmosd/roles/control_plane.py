"""The control-plane role: operators' REST API and dashboard, plus the lease reaper.

It keeps one view of ``/os/`` (relist + watch). The reaper (:mod:`lpmosd.roles.reaper`)
listens to it: when an agent's lease key vanishes while its task is approved or
installing, the task is failed. Deletes lost to a compaction come back as explicit
deletions from the view's relist diff.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from lpmosd import schema
from lpmosd._trio_util import open_nursery
from lpmosd.compaction import Compactor
from lpmosd.config import ControlPlaneConfig
from lpmosd.etcd import EtcdClient, HeldLease
from lpmosd.roles.reaper import Reaper
from lpmosd.roles.session import SessionState, run_session, session_value
from lpmosd.store import Store
from lpmosd.tokens import TokenStore
from lpmosd.view import PrefixView
from lpmosd.web.server import serve_app

log = logging.getLogger("lpmosd.control_plane")

#: Session keys live beside the IDCs under a name no IDC can have (IDCs start alnum).
SESSION_PREFIX = "/os/_control-plane/"
SESSION_TTL = 10


@dataclass(eq=False)
class ControlPlane:
    """Shared state of the control-plane role, read by its HTTP app."""

    config: ControlPlaneConfig
    client: EtcdClient
    store: Store
    session: SessionState = field(default_factory=lambda: SessionState("control-plane"))
    view: PrefixView | None = None
    #: Operator API tokens; its cache runs in the session (see :meth:`_session_body`).
    tokens: TokenStore = field(init=False)

    #: Fails the tasks of agents whose lease key vanished; runs in the session.
    reaper: Reaper = field(init=False)

    #: Compacts etcd's history every ``config.compaction_interval`` seconds.
    compactor: Compactor = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = TokenStore(self.client)
        self.reaper = Reaper(self.store)
        self.compactor = Compactor(self.client, self.config.compaction_interval)

    #: Called with each session's view once it has synced (the dashboard's hub follows it).
    view_hooks: list[Callable[[PrefixView], None]] = field(default_factory=list)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the API and keep the session (view + reaper) alive until cancelled."""
        from lpmosd.web.control_app import create_control_app

        app = create_control_app(self)
        async with open_nursery() as nursery:
            await nursery.start(
                partial(
                    run_session,
                    self.client,
                    self.session,
                    key=SESSION_PREFIX + session_value_host(),
                    ttl=SESSION_TTL,
                    body=self._session_body,
                    value=session_value("control-plane"),
                )
            )
            url = await nursery.start(
                partial(
                    serve_app,
                    app,
                    host=self.config.listen,
                    port=self.config.port,
                    certfile=self.config.tls_cert_file,
                    keyfile=self.config.tls_key_file,
                )
            )
            if self.config.compaction_interval > 0:
                # Until leadership exists, every control plane runs it: the compactors
                # coordinate through etcd (see lpmosd.compaction), one compacts per round.
                await nursery.start(self.compactor.run)
            log.info("control plane listening", extra={"url": url})
            task_status.started(url)

    @property
    def reaped(self) -> int:
        """Tasks failed by this control plane's reaper (across sessions)."""
        return self.reaper.reaped

    @property
    def lease_losses(self) -> int:
        """Vanished lease keys the reaper has looked at (across sessions)."""
        return self.reaper.lease_losses

    async def _session_body(
        self, lease: HeldLease, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        view = PrefixView(self.client, schema.ROOT)
        try:
            async with open_nursery() as nursery:
                await nursery.start(view.run)
                await nursery.start(self.tokens.run)
                self.view = view
                for hook in self.view_hooks:
                    hook(view)
                await nursery.start(self.reaper.run, view)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.view = None


def session_value_host() -> str:
    """This host's name as a key part (sanitised to the schema's name rule)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "host"
    return name if name[0].isalnum() else f"h{name[:63]}"
