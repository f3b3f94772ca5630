"""The control-plane role: the state behind the operators' REST API and dashboard, and the
lease reaper.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from lpmosd import schema
from lpmosd._trio_util import open_nursery
from lpmosd.compaction import Compactor
from lpmosd.config import ControlPlaneConfig
from lpmosd.etcd import EtcdClient, Fence, HeldLease
from lpmosd.roles.disruption import DisruptionGuard, MarkFn
from lpmosd.roles.reaper import Reaper, orphans
from lpmosd.roles.session import SessionState, run_session, session_value
from lpmosd.store import Store
from lpmosd.tokens import TokenStore
from lpmosd.view import PrefixView

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
    view_hooks: list[Callable[[PrefixView], Awaitable[None]]] = field(default_factory=list)
    #: Tells one dead machine from a sick IDC (every instance keeps one per session; only
    #: the leader's fails tasks). None while no session runs, or when disabled.
    guard: DisruptionGuard | None = None
    #: Called when a task's "agent unreachable" mark changes (the dashboard's hub).
    unreachable_hooks: list[MarkFn] = field(default_factory=list)

    def agent_state(self, idc: str, sn: str) -> dict[str, str | None]:
        """``online`` (its lease is live), ``unreachable`` (silent while its IDC is in
        trouble: not failed) or ``offline``, as the API shows it."""
        view, guard = self.view, self.guard
        since = guard.unreachable_since(idc, sn) if guard else None
        if since is not None:
            return {"agent_state": "unreachable", "agent_unreachable_since": since}
        if view is not None and view.get(schema.lease_key(idc, sn)) is not None:
            return {"agent_state": "online"}
        return {"agent_state": "offline"}

    def _mark(self, idc: str, sn: str, unreachable: bool) -> None:
        for hook in self.unreachable_hooks:
            hook(idc, sn, unreachable)

    def _guard_fail(self, idc: str, sn: str, why: str) -> bool:
        """The guard's verdict: fail it (the leader's reaper), or wait (a standby)."""
        if not self.session.active:
            return False
        self.reaper.enqueue(idc, sn, why)
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the session (view, token cache; the reaper while leader) alive until
        cancelled. The daemon serves the API over this role."""
        await run_session(
            self.client,
            self.session,
            election=schema.CONTROL_PLANE_ELECTION,
            fence=self.fence,
            ttl=SESSION_TTL,
            body=self._session_body,
            leader_body=self._leader_body,
            value=session_value("control-plane"),
            task_status=task_status,
        )

    async def _session_body(
        self, lease: HeldLease, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Every instance: the view of ``/os/`` (API, dashboard) and the token cache."""
        view = PrefixView(self.client, schema.ROOT)
        guard = None
        if self.config.disruption.enabled:
            # Vanished leases go through the guard (a sick IDC is not failed); it follows
            # the view on every instance, so a standby that takes over decides at once.
            guard = DisruptionGuard(
                self.config.disruption,
                self.client,
                view,
                self._guard_fail,
                self._mark,
                leading=lambda: self.session.active,
            )
            view.listeners.append(guard.on_change)
        try:
            async with open_nursery() as nursery:
                await nursery.start(view.run)
                await nursery.start(self.tokens.run)
                self.view = view
                for hook in self.view_hooks:
                    await hook(view)
                if guard is not None:
                    guard.load()
                    # Found at start: what happened meanwhile is unknown (a TTL of grace).
                    for idc, sn in await orphans(view):
                        guard.found_orphan(idc, sn)
                    await nursery.start(guard.run)
                    self.guard = guard
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.view = None
            self.guard = None

    async def _leader_body(
        self, lease: HeldLease, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The leader only: the reaper (which scans for what it missed as it starts) and
        the compactor."""
        view = self.view
        assert view is not None, "the session body syncs the view before the election"
        async with open_nursery() as nursery:
            await nursery.start(
                partial(self.reaper.run, view, follow=not self.config.disruption.enabled)
            )
            if self.config.compaction_interval > 0:
                await nursery.start(self.compactor.run)
            task_status.started()
