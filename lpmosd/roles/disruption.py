"""Disruption-aware failure detection: tell one dead machine from a sick IDC.

The reaper used to fail every task whose agent's lease key vanished. When a whole IDC goes
quiet at once (its regional hangs, loses etcd, or the agents' network fails) that failed
every install of the IDC although the machines were fine. Like Kubernetes' node lifecycle
controller, which stops evicting when a large share of a zone goes unhealthy at once, the
:class:`DisruptionGuard` looks at the IDC before a vanished lease fails its task:

- the IDC is *disrupted* while its regional holds no session (its session key is gone), or
  while a large share of its agents is silent: their lease vanished within the last lease
  TTL, or a sample of its live leases, asked of etcd, has not been refreshed for a while;
- it counts as *recovering* for one lease TTL after it is healthy again (agents re-register
  one heartbeat at a time after an outage).

A vanished lease in a healthy IDC fails its task after ``decision_delay`` (as before, within
the lease TTL + 1 s). Otherwise the task is marked "agent unreachable" (API, dashboard,
``lpmosd_agents_unreachable``) and left alone: when its agent is heard again (its lease key
comes back) the mark goes; when the agent stays silent for a full lease TTL after the IDC
is healthy again, the task is failed. All of it lives in the control plane's memory: a
restarted control plane starts from what etcd shows (see ``ControlPlane._reap_orphans``).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from lpmosd import schema
from lpmosd._trio_util import open_nursery
from lpmosd.config import DisruptionConfig
from lpmosd.documents import Task
from lpmosd.errors import EtcdError
from lpmosd.etcd import EtcdClient, KeyValue
from lpmosd.lifecycle import ACTIVE_AGENT
from lpmosd.store import parse_lease_value
from lpmosd.timestamps import format_ts, utcnow
from lpmosd.view import Change, PrefixView

log = logging.getLogger("lpmosd.disruption")

#: Lease TTL assumed for an IDC whose regional did not announce one (the config default).
DEFAULT_LEASE_TTL = 30.0
#: How often unreachable tasks and pending decisions are looked at again.
RECHECK_INTERVAL = 0.25
#: An IDC's assessment (which may ask etcd about leases) is reused for this long.
ASSESS_CACHE = 0.5

#: Called to fail a task: (idc, sn, why); False when this instance may not (a standby
#: control plane: the decision waits until it leads). Must not block.
FailFn = Callable[[str, str, str], bool]
#: Called when a task's "agent unreachable" mark changes: (idc, sn, unreachable).
MarkFn = Callable[[str, str, bool], None]


def regional_idc(key: str) -> str | None:
    """The IDC of a regional's session key (its candidacy, ``/os/{idc}/regional/{id}``)."""
    if not key.startswith(schema.ROOT):
        return None
    parts = key[len(schema.ROOT) :].split("/")
    if len(parts) != 3 or parts[1] != "regional" or not parts[2]:
        return None
    return parts[0] if schema.NAME_RE.fullmatch(parts[0]) else None


def _has_regional(view: PrefixView, idc: str) -> KeyValue | None:
    """The session key of the IDC's leading regional (the lowest create revision among
    its candidates, active or about to be), if any regional holds a session."""
    prefix = schema.regional_election_prefix(idc)
    keys = [kv for key, kv in view.items.items() if key.startswith(prefix)]
    return min(keys, key=lambda kv: kv.create_revision, default=None)


@dataclass(eq=False)
class IdcHealth:
    """What the guard knows of one IDC."""

    #: Trio time since when the IDC has been healthy without a break; None while disrupted.
    calm_since: float | None = -math.inf
    #: Why the IDC is disrupted (for logs and the API), "" when it is not.
    reason: str = ""
    #: Agent lease TTL announced by the IDC's regional.
    lease_ttl: float = DEFAULT_LEASE_TTL
    #: Machines whose lease key exists (sn -> lease id).
    live: dict[str, int] = field(default_factory=dict)
    #: sn -> trio time its lease vanished (the last lease TTL's worth).
    vanished: dict[str, float] = field(default_factory=dict)
    #: sn -> (trio time a vanished lease is to be decided, how it vanished).
    pending: dict[str, tuple[float, str]] = field(default_factory=dict)
    #: sn -> wall-clock timestamp (RFC 3339) since when its agent is unreachable.
    unreachable: dict[str, str] = field(default_factory=dict)
    #: sn -> trio time before which an unreachable task is not failed (found at start).
    deadlines: dict[str, float] = field(default_factory=dict)
    assessed_at: float = -math.inf
    #: Share of silent agents at the last assessment (0..1).
    silent_share: float = 0.0

    @property
    def disrupted(self) -> bool:
        """True while the IDC is disrupted (not merely recovering)."""
        return self.calm_since is None

    def recovering(self, now: float) -> bool:
        """Disrupted, or healthy again for less than a lease TTL."""
        return self.calm_since is None or now - self.calm_since < self.lease_ttl


@dataclass(eq=False)
class DisruptionGuard:
    """Decides, for each vanished agent lease, between failing the task and waiting.

    Feed it every change of the control plane's view (:meth:`on_change`) and run
    :meth:`run` in the session; it calls ``fail`` for the tasks to fail (the reaper's queue)
    and ``mark`` whenever a task's "agent unreachable" mark changes.
    """

    config: DisruptionConfig
    client: EtcdClient
    view: PrefixView
    fail: FailFn
    mark: MarkFn
    #: Whether this instance leads (only the leader fails tasks; a standby keeps track so
    #: it can decide at once when it takes over).
    leading: Callable[[], bool]
    idcs: dict[str, IdcHealth] = field(default_factory=dict)
    _wake: trio.Event = field(default_factory=trio.Event)

    # ------------------------------------------------------------------ reading

    def unreachable_since(self, idc: str, sn: str) -> str | None:
        """When the agent of ``idc/sn`` was marked unreachable (None: it is not)."""
        health = self.idcs.get(idc)
        return health.unreachable.get(sn) if health else None

    def unreachable_counts(self) -> dict[str, int]:
        """Unreachable agents per IDC (the metric)."""
        return {idc: len(h.unreachable) for idc, h in self.idcs.items()}

    def disrupted_idcs(self) -> dict[str, str]:
        """IDC -> why, for every IDC disrupted right now."""
        return {idc: h.reason for idc, h in self.idcs.items() if h.disrupted}

    # ------------------------------------------------------------------ feeding

    def _health(self, idc: str) -> IdcHealth:
        health = self.idcs.get(idc)
        if health is None:
            health = self.idcs[idc] = IdcHealth()
            kv = _has_regional(self.view, idc)
            if kv is None:
                health.calm_since, health.reason = None, "regional has no session"
            else:
                health.lease_ttl = _announced_ttl(kv.value)
        return health

    def load(self) -> None:
        """Take the view's current keys in (call once, after it synced).

        Tasks found without a lease are then given to :meth:`found_orphan`.
        """
        for key, kv in list(self.view.items.items()):
            idc = regional_idc(key)
            if idc is not None:
                self._health(idc)
                continue
            parsed = schema.parse_key(key)
            if parsed is not None and parsed.kind == "lease":
                self._health(parsed.idc).live[parsed.sn] = kv.lease or (
                    parse_lease_value(kv.value) or 0
                )

    def on_change(self, change: Change) -> None:
        """A view listener: lease keys, regional session keys and tasks."""
        idc = regional_idc(change.key)
        if idc is not None:
            self._regional_changed(idc, change)
            return
        parsed = schema.parse_key(change.key)
        if parsed is None:
            return
        if parsed.kind == "lease":
            if change.kv is not None:
                self._heard(parsed.idc, parsed.sn, change.kv.lease)
            else:
                self.lease_vanished(parsed.idc, parsed.sn)
        elif parsed.kind == "task":
            health = self.idcs.get(parsed.idc)
            sn = parsed.sn
            if health is None or (sn not in health.pending and sn not in health.unreachable):
                return  # parse task documents only for the machines we wait for
            if change.kv is None or not _active(change.kv.value):
                # The task ended (or went away): nothing is left to decide about its agent.
                self._forget(parsed.idc, sn)

    def lease_vanished(self, idc: str, sn: str, why: str = "deleted") -> None:
        """An agent lease key vanished (``why``: how we learned it): decide after
        ``decision_delay``."""
        health = self._health(idc)
        now = trio.current_time()
        health.live.pop(sn, None)
        task = self.view.get(schema.task_key(idc, sn))
        if task is None or not _active(task.value):
            # Finished (the agent's lease goes with it), or gone: nothing to decide. Deciding
            # later could hit the task's next life (retried a moment after it failed).
            return
        health.vanished[sn] = now
        if sn not in health.unreachable:
            health.pending[sn] = (now + self.config.decision_delay, why)
        self._wake.set()

    def found_orphan(self, idc: str, sn: str, why: str = "absent at start") -> None:
        """A live task without a lease found when we started. What happened before is
        unknown (this control plane, or its session, just started; etcd may just be back
        from an outage): its agent gets a full lease TTL from now to be heard again."""
        health = self._health(idc)
        if sn in health.unreachable:
            return
        health.unreachable[sn] = format_ts(utcnow())
        health.deadlines[sn] = trio.current_time() + health.lease_ttl
        log.warning(
            "agent unreachable at start: task kept a lease TTL", extra={"idc": idc, "sn": sn}
        )
        self.mark(idc, sn, True)
        self._wake.set()

    def _heard(self, idc: str, sn: str, lease: int) -> None:
        health = self._health(idc)
        health.live[sn] = lease
        health.vanished.pop(sn, None)
        health.pending.pop(sn, None)
        health.deadlines.pop(sn, None)
        if health.unreachable.pop(sn, None) is not None:
            log.info("agent heard again", extra={"idc": idc, "sn": sn})
            self.mark(idc, sn, False)

    def _forget(self, idc: str, sn: str) -> None:
        health = self.idcs.get(idc)
        if health is None:
            return
        health.pending.pop(sn, None)
        health.deadlines.pop(sn, None)
        if health.unreachable.pop(sn, None) is not None:
            self.mark(idc, sn, False)

    def _regional_changed(self, idc: str, change: Change) -> None:
        health = self._health(idc)
        now = trio.current_time()
        if change.kv is None:
            leader = _has_regional(self.view, idc)
            if leader is not None:
                prev = change.prev
                if prev is not None and prev.create_revision < leader.create_revision:
                    # The active regional went; the next one takes over from now (its
                    # agents' leases may lapse meanwhile): recovering, a lease TTL of grace.
                    log.warning("regional leader changed: IDC recovering", extra={"idc": idc})
                    health.calm_since, health.reason = now, ""
                    health.assessed_at = -math.inf
                return
            if not health.disrupted:
                log.warning("regional lost its session: IDC disrupted", extra={"idc": idc})
            health.calm_since, health.reason = None, "regional has no session"
        else:
            health.lease_ttl = _announced_ttl(change.kv.value)
            if change.prev is None and health.disrupted:
                # Back: healthy from now on, unless the agents say otherwise.
                health.calm_since, health.reason = now, ""
                health.assessed_at = -math.inf
                log.info("regional has a session again", extra={"idc": idc})
        self._wake.set()

    # ------------------------------------------------------------------ deciding

    async def assess(self, idc: str) -> IdcHealth:
        """Bring the IDC's health up to date (asking etcd about a sample of its leases)."""
        health = self._health(idc)
        now = trio.current_time()
        if now - health.assessed_at < ASSESS_CACHE:
            return health
        health.assessed_at = now
        for sn, when in list(health.vanished.items()):
            if now - when > health.lease_ttl:
                del health.vanished[sn]
        if _has_regional(self.view, idc) is None:
            health.calm_since, health.reason = None, "regional has no session"
            return health
        sampled, silent = await self._sample_silence(health)
        live = len(health.live)
        gone = len(health.vanished)
        # Vanished leases count as silent; the sample stands for every live lease.
        silent_agents = gone + (live * silent / sampled if sampled else 0.0)
        total = gone + live
        share = silent_agents / total if total else 0.0
        health.silent_share = share
        cfg = self.config
        if share >= cfg.silent_share and silent_agents >= cfg.min_silent_agents:
            if not health.disrupted:
                log.warning(
                    "many agents silent at once: IDC disrupted",
                    extra={"idc": idc, "silent": round(silent_agents), "agents": total},
                )
            health.calm_since = None
            health.reason = f"{round(silent_agents)} of {total} agents silent"
        elif health.disrupted:
            log.info("IDC healthy again", extra={"idc": idc, "silent_share": round(share, 2)})
            health.calm_since, health.reason = now, ""
        return health

    async def _sample_silence(self, health: IdcHealth) -> tuple[int, int]:
        """(sampled, silent) over a random sample of the IDC's live leases."""
        leases = [lease for lease in health.live.values() if lease]
        if len(leases) > self.config.sample_size:
            leases = random.sample(leases, self.config.sample_size)
        counts = [0, 0]

        async def ask(lease: int) -> None:
            try:
                info = await self.client.lease_time_to_live(lease)
            except EtcdError:
                return  # unknown: neither silent nor alive
            counts[0] += 1
            if info is None:
                counts[1] += 1  # expired between the view and now
            elif info.granted_ttl - info.ttl > self.config.silent_after * info.granted_ttl:
                counts[1] += 1

        async with open_nursery() as nursery:
            for lease in leases:
                nursery.start_soon(ask, lease)
        return counts[0], counts[1]

    async def _decide(self, idc: str) -> None:
        health = await self.assess(idc)
        now = trio.current_time()
        for sn, (due, why) in list(health.pending.items()):
            if due > now:
                continue
            if self.view.get(schema.lease_key(idc, sn)) is not None:
                del health.pending[sn]
                continue  # re-registered meanwhile
            task = self.view.get(schema.task_key(idc, sn))
            if task is None or not _active(task.value):
                del health.pending[sn]
                continue  # finished (its lease went with it) or gone: nothing to reap
            if not health.recovering(now):
                if self.fail(idc, sn, why):
                    del health.pending[sn]
                continue
            del health.pending[sn]
            health.unreachable[sn] = format_ts(utcnow())
            log.warning(
                "agent unreachable: task kept",
                extra={"idc": idc, "sn": sn, "why": health.reason or "IDC recovering"},
            )
            self.mark(idc, sn, True)
        if health.recovering(now):
            return
        for sn in list(health.unreachable):
            if self.view.get(schema.lease_key(idc, sn)) is not None:
                continue  # the watch will clear it
            if health.deadlines.get(sn, -math.inf) > now:
                continue
            if not self.fail(idc, sn, "silent a lease TTL after its IDC recovered"):
                continue
            health.deadlines.pop(sn, None)
            del health.unreachable[sn]
            self.mark(idc, sn, False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Decide pending leases and unreachable tasks until cancelled."""
        task_status.started()
        while True:
            self._wake = trio.Event()
            for idc, health in list(self.idcs.items()):
                if (health.pending or health.unreachable) and self.leading():
                    try:
                        await self._decide(idc)
                    except EtcdError as exc:
                        log.warning("IDC assessment failed", extra={"idc": idc, "error": str(exc)})
            with trio.move_on_after(RECHECK_INTERVAL):
                await self._wake.wait()
            # Let a burst of deletions (and a regional key going with them) arrive first.
            await trio.sleep(min(self.config.decision_delay, RECHECK_INTERVAL) / 4)


def _announced_ttl(value: bytes) -> float:
    """The agent lease TTL a regional announces in its session key's value."""
    try:
        doc = json.loads(value)
        ttl = float(doc["agent_lease_ttl"])
    except (ValueError, TypeError, KeyError):
        return DEFAULT_LEASE_TTL
    return ttl if math.isfinite(ttl) and ttl > 0 else DEFAULT_LEASE_TTL


def _active(value: bytes) -> bool:
    try:
        return Task.from_json(value).status in ACTIVE_AGENT
    except Exception:
        return False
