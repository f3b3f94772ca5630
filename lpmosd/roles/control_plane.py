"""The control-plane role: operators' REST API and dashboard, plus the lease reaper.

Several control planes may run: each serves the API and dashboard from its own view; they
stand for election on their session leases and only the leader reaps (its writes fenced
on its election key, so a paused former leader that wakes fails nothing).

It keeps one view of ``/os/`` (relist + watch). The leader's reaper
(:mod:`lpmosd.roles.reaper`) listens to it: when an agent's lease key vanishes while its
task is approved or installing, the task is failed. Deletes lost to a compaction come back
as explicit deletions from the view's relist diff. The leader also compacts etcd's
history (:mod:`lpmosd.compaction`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from lpmosd import schema
from lpmosd._trio_util import open_nursery
from lpmosd.compaction import Compactor
from lpmosd.config import ControlPlaneConfig
from lpmosd.etcd import EtcdClient, Fence, HeldLease
from lpmosd.roles.reaper import Reaper
from lpmosd.roles.session import SessionState, run_session, session_value
from lpmosd.store import Store
from lpmosd.tokens import TokenStore
from lpmosd.view import PrefixView
from lpmosd.web.server import serve_app

log = logging.getLogger("lpmosd.control_plane")

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
    #: The leadership term the leader-only work (the reaper) writes under.
    fence: Fence = field(init=False)
    #: ``store`` fenced on the leadership: what the reaper writes with. The API writes
    #: through ``store`` itself: it works on every instance.
    leader_store: Store = field(init=False)
    #: The leader's reaper: fails the tasks of agents whose lease key vanished.
    reaper: Reaper = field(init=False)
    #: The leader's compactor: etcd's history, every ``config.compaction_interval`` s.
    compactor: Compactor = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = TokenStore(self.client)
        self.fence = Fence("control-plane")
        self.leader_store = self.store.fenced(self.fence)
        self.reaper = Reaper(self.leader_store)
        self.compactor = Compactor(self.client, self.config.compaction_interval)

    @property
    def reaped(self) -> int:
        """Tasks failed by this control plane's reaper (across terms)."""
        return self.reaper.reaped

    @property
    def lease_losses(self) -> int:
        """Vanished lease keys the reaper has looked at (across terms)."""
        return self.reaper.lease_losses

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
                    election=schema.CONTROL_PLANE_ELECTION,
                    fence=self.fence,
                    ttl=SESSION_TTL,
                    body=self._session_body,
                    leader_body=self._leader_body,
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
            log.info("control plane listening", extra={"url": url})
            task_status.started(url)

    async def _session_body(
        self, lease: HeldLease, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Every instance: the view of ``/os/`` (API, dashboard) and the token cache."""
        view = PrefixView(self.client, schema.ROOT)
        try:
            async with open_nursery() as nursery:
                await nursery.start(view.run)
                await nursery.start(self.tokens.run)
                self.view = view
                for hook in self.view_hooks:
                    hook(view)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.view = None

    async def _leader_body(
        self, lease: HeldLease, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The leader only: the reaper (which scans for what it missed as it starts) and
        the compactor."""
        view = self.view
        assert view is not None, "the session body syncs the view before the election"
        async with open_nursery() as nursery:
            await nursery.start(self.reaper.run, view)
            if self.config.compaction_interval > 0:
                await nursery.start(self.compactor.run)
            task_status.started()
