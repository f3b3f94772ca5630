"""The control-plane role: operators' REST API and dashboard, plus the lease reaper.

Several control planes may run: each serves the API and dashboard from its own view; they
stand for election on their session leases and only the leader reaps (its writes fenced
on its election key, so a paused former leader that wakes fails nothing).

It keeps one view of ``/os/`` (relist + watch). The reaper listens to it: when an agent's
lease key vanishes while its task is approved or installing, the task is failed ("agent
heartbeat lost", with the last step), guarded on the lease key still being absent so an
agent that re-registered meanwhile is left alone. Deletes lost to a compaction come back
as explicit deletions from the view's relist diff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from lpmosd import hooks, schema
from lpmosd._trio_util import open_nursery
from lpmosd.config import ControlPlaneConfig
from lpmosd.errors import EtcdError, InputError, NotLeaderError
from lpmosd.etcd import Compare, EtcdClient, Fence, HeldLease
from lpmosd.models import ACTIVE_AGENT, Task, TaskStatus
from lpmosd.roles.session import SessionState, run_session, session_value
from lpmosd.store import Store, StoredTask
from lpmosd.tokens import TokenStore
from lpmosd.view import Change, PrefixView
from lpmosd.web.server import serve_app

log = logging.getLogger("lpmosd.control_plane")

SESSION_TTL = 10
HEARTBEAT_LOST = "agent heartbeat lost"
#: Reaper tasks sharing the queue of vanished lease keys.
REAPER_WORKERS = 16


@dataclass(eq=False)
class ControlPlane:
    """Shared state of the control-plane role, read by its HTTP app."""

    config: ControlPlaneConfig
    client: EtcdClient
    store: Store
    session: SessionState = field(default_factory=lambda: SessionState("control-plane"))
    view: PrefixView | None = None
    reaped: int = 0
    #: Operator API tokens; its cache runs in the session (see :meth:`_session_body`).
    tokens: TokenStore = field(init=False)
    #: The leadership term the leader-only work (the reaper) writes under.
    fence: Fence = field(init=False)
    #: ``store`` fenced on the leadership: what the reaper writes with. The API writes
    #: through ``store`` itself: it works on every instance.
    leader_store: Store = field(init=False)
    _reap_send: trio.MemorySendChannel[tuple[str, str, str]] | None = field(
        init=False, default=None
    )

    def __post_init__(self) -> None:
        self.tokens = TokenStore(self.client)
        self.fence = Fence("control-plane")
        self.leader_store = self.store.fenced(self.fence)

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

        def on_change(change: Change) -> None:
            send = self._reap_send
            if send is None:
                return  # a standby: the leader reaps (and a new leader scans at start)
            parsed = schema.parse_key(change.key)
            if parsed is None or parsed.kind != "lease" or change.kv is not None:
                return
            try:
                send.send_nowait((parsed.idc, parsed.sn, "deleted"))
            except trio.WouldBlock:
                log.error("reaper queue full", extra={"sn": parsed.sn})

        view.listeners.append(on_change)
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
        """The leader only: the reaper."""
        view = self.view
        assert view is not None, "the session body syncs the view before the election"
        reap_send, reap_recv = trio.open_memory_channel[tuple[str, str, str]](10_000)
        try:
            async with open_nursery() as nursery:
                # Several reapers: when many agents die at once (a rack loses power) their
                # tasks are failed in parallel, not one Txn after another.
                for _ in range(REAPER_WORKERS):
                    nursery.start_soon(self._reap, reap_recv)
                self._reap_send = reap_send
                self._reap_orphans(view, reap_send)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._reap_send = None

    def _reap_orphans(
        self, view: PrefixView, send: trio.MemorySendChannel[tuple[str, str, str]]
    ) -> None:
        """At session start: installing tasks with no lease key lost their agent while we
        were away (the delete happened before our watch began)."""
        for key, kv in list(view.items.items()):
            parsed = schema.parse_key(key)
            if parsed is None or parsed.kind != "task":
                continue
            if view.get(schema.lease_key(parsed.idc, parsed.sn)) is not None:
                continue
            try:
                task = Task.from_json(kv.value)
            except Exception:
                continue
            if task.status is TaskStatus.INSTALLING:
                send.send_nowait((parsed.idc, parsed.sn, "absent at start"))

    async def _reap(self, receive: trio.MemoryReceiveChannel[tuple[str, str, str]]) -> None:
        async for idc, sn, why in receive:
            stored = await self._reap_one(idc, sn)
            if stored is not None:
                self.reaped += 1
                view = self.view
                if view is not None and stored.kv is not None:
                    view.observe(stored.kv)
                log.warning(
                    "agent offline: task failed",
                    extra={"idc": idc, "sn": sn, "lease_key": why},
                )

    async def _reap_one(self, idc: str, sn: str) -> StoredTask | None:
        """Fail one task whose agent's lease key vanished; None when it is left alone.

        Never gives up on etcd errors (retried with backoff: a reap lost here would not
        come back, as the delete event is consumed) and never dies of a bad document.
        """
        lease_key = schema.lease_key(idc, sn)
        backoff = 0.05
        while True:
            view = self.view
            current = view.get(schema.task_key(idc, sn)) if view else None
            try:
                await hooks.reach("reaper.before-fail")
                return await self.leader_store.fail(
                    idc,
                    sn,
                    HEARTBEAT_LOST,
                    actor="reaper",
                    only_if=ACTIVE_AGENT,
                    guards=[Compare.absent(lease_key)],
                    current=current,
                )
            except NotLeaderError as exc:
                # Leadership lost: the next leader reaps (its start-up scan sees the task).
                log.warning("reap refused", extra={"idc": idc, "sn": sn, "error": str(exc)})
                return None
            except InputError as exc:
                log.error(
                    "cannot reap: invalid task document",
                    extra={"idc": idc, "sn": sn, "error": exc.message},
                )
                return None
            except EtcdError as exc:
                log.warning(
                    "reap failed; retrying", extra={"idc": idc, "sn": sn, "error": str(exc)}
                )
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
