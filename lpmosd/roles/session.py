"""A role's session: work that lives only while the role holds its etcd lease.

Each role keeps a session key bound to its own lease. The role's background work runs in
the session's nursery; when the lease is lost that nursery is cancelled (nothing of the old
session keeps running), the role reports "restarting", and a fresh session starts: new
lease, relist, carry on. The HTTP server outlives sessions and answers 503 meanwhile.
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

from lpmosd._trio_util import open_nursery
from lpmosd.errors import EtcdError, LeaseLost
from lpmosd.etcd import EtcdClient, HeldLease, open_lease
from lpmosd.timestamps import format_ts, utcnow

log = logging.getLogger("lpmosd.session")


@dataclass(eq=False)
class SessionState:
    """What the status pages and /readyz show about a role's session."""

    role: str
    state: str = "starting"  # starting | running | restarting
    lease: HeldLease | None = None
    restarts: int = 0
    last_error: str | None = None
    recent_errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def running(self) -> bool:
        """True while the role holds its session and its background work runs."""
        return self.state == "running"

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
    key: str,
    ttl: int,
    body: SessionBody,
    value: str,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``body`` under a session lease, restarting it with a fresh lease when lost.

    ``body`` is started like a nursery task: the role counts as running once it reports
    started (its views are synced and it can serve), not merely once the session key is
    written. Reports started after the first session is up.
    """
    reported = False
    backoff = 0.2
    while True:
        try:
            async with open_lease(client, ttl) as lease:
                await client.put(key, value, lease=lease.id)
                state.lease = lease
                async with open_nursery() as nursery:
                    await nursery.start(body, lease)
                    state.state = "running"
                    log.info("session started", extra={"role": state.role, "lease": lease.id})
                    backoff = 0.2
                    if not reported:
                        reported = True
                        task_status.started()
        except LeaseLost as exc:
            state.restarts += 1
            state.record_error(str(exc))
            log.warning("session lease lost; restarting", extra={"role": state.role})
        except EtcdError as exc:
            state.record_error(str(exc))
            log.warning("session failed; retrying", extra={"role": state.role, "error": str(exc)})
        finally:
            state.state = "restarting" if reported else "starting"
            state.lease = None
        await trio.sleep(backoff * (0.5 + random.random()))
        backoff = min(backoff * 2, 5.0)
