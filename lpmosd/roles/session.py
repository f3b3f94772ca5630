"""A role's session: work that lives only while the role holds its etcd lease.

Each role keeps a session key bound to its own lease. The role's background work runs in
the session's nursery; when the lease is lost that nursery is cancelled (nothing of the old
session keeps running), the role reports "restarting", and a fresh session starts: new
lease, relist, carry on. The HTTP server outlives sessions and answers 503 meanwhile.

The session key is also the role's candidacy in a leader election (see
:mod:`lpmosd.etcd.election`): several instances of a role may run, one leads ("active"),
the others wait ("standby") and take over when the leader's lease goes. While it leads the
role's :class:`~lpmosd.etcd.Fence` holds the term, so its fenced writes are accepted only
while its key is still the one etcd has.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from lpmosd import hooks
from lpmosd._trio_util import open_nursery
from lpmosd.errors import EtcdError, EtcdUnavailableError, LeaseLost
from lpmosd.etcd import EtcdClient, Fence, HeldLease, nominate, open_lease, wait_for_leadership
from lpmosd.timestamps import format_ts, utcnow

log = logging.getLogger("lpmosd.session")


@dataclass(eq=False)
class SessionState:
    """What the status pages and /readyz show about a role's session."""

    role: str
    state: str = "starting"  # starting | running | restarting
    #: "active" while this instance leads its election, "standby" while it waits.
    leadership: str = "standby"
    lease: HeldLease | None = None
    #: The candidate key of the current session, and since when (trio clock) it leads.
    key: str | None = None
    active_since: float | None = None
    leader_changes: int = 0
    #: True while the last word on etcd is that it does not answer (keepalives or a new
    #: lease failed as unreachable); False once it answers, or when the session merely ran
    #: out (e.g. the process was paused past its TTL) and etcd may well be fine.
    etcd_unreachable: bool = False
    restarts: int = 0
    last_error: str | None = None
    recent_errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def running(self) -> bool:
        """True while the role holds its session and its background work runs."""
        return self.state == "running"

    @property
    def active(self) -> bool:
        """True while the role holds its session and leads its election."""
        return self.running and self.leadership == "active"

    def record_error(self, message: str) -> None:
        """Remember an error for the status page (the last 20)."""
        self.last_error = message
        self.recent_errors.append((format_ts(utcnow()), message))
        del self.recent_errors[:-20]


SessionBody = Callable[[HeldLease, trio.TaskStatus[None]], Awaitable[None]]


def session_value(role: str, extra: dict[str, str] | None = None) -> str:
    """The session key's value: who holds it, since when."""
    return json.dumps(
        {
            "role": role,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": format_ts(utcnow()),
            **(extra or {}),
        },
        separators=(",", ":"),
    )


async def run_session(
    client: EtcdClient,
    state: SessionState,
    *,
    election: str,
    fence: Fence,
    ttl: int,
    body: SessionBody,
    value: str,
    leader_body: SessionBody | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``body`` under a session lease, restarting it with a fresh lease when lost.

    The session key is this instance's candidate key under the ``election`` prefix. ``body``
    runs on every instance, started like a nursery task: the role counts as running once it
    reports started (its views are synced and it can serve), not merely once the session
    key is written. Once the candidate leads, ``fence`` holds its term and ``leader_body``
    starts. Reports started once the first session is up and knows whether it leads
    (active, with ``leader_body`` started) or waits (standby).
    """
    reported = False
    backoff = 0.2
    while True:
        try:
            async with open_lease(client, ttl) as lease:
                state.etcd_unreachable = False
                key, revision = await nominate(client, election, lease.id, value)
                state.lease, state.key = lease, key
                async with open_nursery() as nursery:
                    await nursery.start(body, lease)
                    state.state = "running"
                    log.info(
                        "session started",
                        extra={"role": state.role, "lease": lease.id, "key": key},
                    )
                    backoff = 0.2

                    def report() -> None:
                        # Up once it knows whether it leads: a lone instance is never
                        # seen as a standby for a moment after start.
                        nonlocal reported
                        if not reported:
                            reported = True
                            task_status.started()

                    await wait_for_leadership(
                        client, election, key, revision, lease.id, on_standby=report
                    )
                    fence.hold(key.encode(), revision)
                    state.leadership, state.active_since = "active", trio.current_time()
                    state.leader_changes += 1
                    log.warning("leadership won", extra={"role": state.role, "key": key})
                    if leader_body is not None:
                        await nursery.start(leader_body, lease)
                    report()
                    await hooks.reach(f"{state.role}.active")
        except LeaseLost as exc:
            state.etcd_unreachable = exc.unreachable
            state.restarts += 1
            state.record_error(str(exc))
            log.warning(
                "session lease lost; restarting: %s",
                exc.reason,
                extra={"role": state.role, "lease": exc.lease_id, "unreachable": exc.unreachable},
            )
        except EtcdError as exc:
            state.etcd_unreachable = isinstance(exc, EtcdUnavailableError)
            state.record_error(str(exc))
            log.warning("session failed; retrying", extra={"role": state.role, "error": str(exc)})
        finally:
            fence.release()
            state.state = "restarting" if reported else "starting"
            state.leadership, state.active_since = "standby", None
            state.lease = state.key = None
        await hooks.reach(f"{state.role}.session-ended")
        await trio.sleep(backoff * (0.5 + random.random()))
        backoff = min(backoff * 2, 5.0)
