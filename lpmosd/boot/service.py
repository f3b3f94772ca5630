"""The boot service: the regional's answers to booting machines, without HTTP.

It keeps a MAC → serial-number index of the IDC's tasks (fed by the regional's view of
``/os/{idc}/machines/``), decides per MAC (:mod:`.decision`), mints the per-boot
credential (:meth:`BootService.credentials`), remembers machines that asked to boot
without a task, and publishes the OS types the regional can install.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

import trio
from prometheus_client import Counter

from lpmosd import schema
from lpmosd.boot.artifacts import ChecksumCache
from lpmosd.boot.cpio import credential_archive
from lpmosd.boot.decision import Decision, Reason, decide
from lpmosd.boot.ostypes import OsTypes, installable
from lpmosd.boot.scripts import InstallBoot, install_script, local_script
from lpmosd.config import RegionalConfig
from lpmosd.documents import Task
from lpmosd.errors import ConflictError, EtcdError, NotFoundError, ValidationError
from lpmosd.etcd import KeyValue
from lpmosd.metrics import REGISTRY
from lpmosd.store import Store, parse_lease_value
from lpmosd.timestamps import utcnow
from lpmosd.view import Change, PrefixView

log = logging.getLogger("lpmosd.boot")

BOOT_REQUESTS: Final = Counter(
    "lpmosd_boot_requests_total",
    "Per-MAC boot scripts served, by decision.",
    ["decision"],
    registry=REGISTRY,
)
BOOT_UNKNOWN_MACS: Final = Counter(
    "lpmosd_boot_unknown_mac_total",
    "Boot requests from MACs with no task in this IDC.",
    registry=REGISTRY,
)
BOOT_CREDENTIALS: Final = Counter(
    "lpmosd_boot_credentials_total",
    "Credential initrd requests, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)

#: Machines remembered on the status page as "asked to boot, no task" (oldest dropped).
MAX_UNKNOWN: Final = 256
_FACT_RE: Final = re.compile(r"[A-Za-z0-9 ._:+/-]{0,80}", re.ASCII)
# The MAC sits near the start of a stored task ({"task_id":…,"sn":…,"mac":…}): finding it
# with a regex spares parsing the whole document (logs and all) on every progress write.
_MAC_IN_TASK: Final = re.compile(rb'"mac"\s*:\s*"([0-9A-Fa-f:.-]{12,17})"')


@dataclass(slots=True)
class UnknownBoot:
    """A machine that asked to boot but has no task: what its firmware told us."""

    mac: str
    first_seen: datetime
    last_seen: datetime
    count: int
    facts: dict[str, str]


def firmware_fact(value: str | None) -> str:
    """A firmware-reported value (uuid, serial, …) fit to show: printable, short, or ""."""
    if value is None or _FACT_RE.fullmatch(value) is None:
        return ""
    return value


def _task_mac(kv: KeyValue | None) -> str | None:
    if kv is None:
        return None
    m = _MAC_IN_TASK.search(kv.value[:1024])
    if m is None:
        return None
    try:
        return schema.normalize_mac(m.group(1).decode())
    except ValidationError:
        return None


class BootService:
    """Everything the boot routes need, over the regional's state."""

    def __init__(
        self,
        config: RegionalConfig,
        store: Store,
        machines: Callable[[], PrefixView | None],
    ) -> None:
        self.config = config
        self.store = store
        self._machines = machines
        #: mac -> serial numbers whose task carries it.
        self.by_mac: dict[str, set[str]] = {}
        self.unknown: OrderedDict[str, UnknownBoot] = OrderedDict()
        self.checksums = ChecksumCache()
        #: Set once this regional has published its OS types (it is the active one).
        self.published = trio.Event()
        # A used-but-silent agent may be replaced after this long (the register rule).
        self.takeover_after = config.heartbeat_interval * 1.5

    @property
    def idc(self) -> str:
        """The IDC served."""
        return self.config.idc

    @property
    def artifacts_dir(self) -> Path | None:
        """Where kernels, initrds and images are served from (None: not configured)."""
        return self.config.boot.artifacts_dir

    # --- the MAC index -------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the index (a new session relists the view from scratch)."""
        self.by_mac.clear()

    def on_machine_key(self, change: Change) -> None:
        """View listener: keep :attr:`by_mac` in step with the task keys."""
        parsed = schema.parse_key(change.key)
        if parsed is None or parsed.kind != "task":
            return
        old, new = _task_mac(change.prev), _task_mac(change.kv)
        if old == new and change.kv is not None:
            return
        if old is not None:
            sns = self.by_mac.get(old)
            if sns is not None:
                sns.discard(parsed.sn)
                if not sns:
                    del self.by_mac[old]
        if new is not None and change.kv is not None:
            self.by_mac.setdefault(new, set()).add(parsed.sn)
            self.unknown.pop(new, None)

    def tasks_for(self, mac: str) -> list[tuple[Task, KeyValue]]:
        """The tasks (with their KeyValues) of the view that carry ``mac``."""
        view = self._machines()
        if view is None:
            return []
        found: list[tuple[Task, KeyValue]] = []
        for sn in sorted(self.by_mac.get(mac, ())):
            kv = view.get(schema.task_key(self.idc, sn))
            if kv is None:
                continue
            try:
                task = Task.from_json(kv.value)
            except ValidationError:
                continue
            if task.mac == mac:
                found.append((task, kv))
        return found

    # --- decisions and scripts -------------------------------------------------------------

    def decide(self, mac: str) -> Decision:
        """How ``mac`` boots now, from the regional's view."""
        return decide([task for task, _ in self.tasks_for(schema.normalize_mac(mac))])

    def script_for(self, mac: str, base_url: str, facts: dict[str, str]) -> tuple[str, Decision]:
        """The per-MAC iPXE script and the decision behind it; unknown MACs are noted."""
        mac = schema.normalize_mac(mac)
        decision = self.decide(mac)
        BOOT_REQUESTS.labels(decision.reason.name.lower()).inc()
        extra = {"idc": self.idc, "mac": mac, "decision": decision.reason.name.lower()}
        if decision.reason is Reason.UNKNOWN_MAC:
            self._note_unknown(mac, facts)
            log.info("boot request from a MAC with no task", extra={**extra, **facts})
        elif decision.task is not None:
            log.info("boot: installer", extra={**extra, "sn": decision.task.sn})
        else:
            log.info("boot: local disk", extra=extra)
        if decision.task is None:
            return local_script(decision.reason.value), decision
        task = decision.task
        boot = InstallBoot(base_url=base_url, sn=task.sn, mac=task.mac, task_id=task.task_id)
        return install_script(boot), decision

    def _note_unknown(self, mac: str, facts: dict[str, str]) -> None:
        BOOT_UNKNOWN_MACS.inc()
        now = utcnow()
        seen = self.unknown.pop(mac, None)
        if seen is None:
            seen = UnknownBoot(mac=mac, first_seen=now, last_seen=now, count=0, facts={})
        seen.last_seen = now
        seen.count += 1
        seen.facts = {k: v for k, v in facts.items() if v} or seen.facts
        self.unknown[mac] = seen
        while len(self.unknown) > MAX_UNKNOWN:
            self.unknown.popitem(last=False)

    # --- the per-boot credential -------------------------------------------------------------

    async def credentials(self, mac: str) -> bytes:
        """A fresh enrolment secret for the live task of ``mac``, as a newc cpio.

        Each call while no live agent holds the task mints a new secret (the previous one
        stops working), so a machine that reboots mid-boot is never stuck. Refused (404
        unknown MAC, 409 otherwise) for a MAC with no live netboot task or while its agent
        is alive.
        """
        mac = schema.normalize_mac(mac)
        for attempt in range(2):
            task, task_kv, lease_kv = await self._credential_target(mac, fresh=attempt > 0)
            await self._refuse_if_agent_alive(task.sn, lease_kv)
            try:
                secret = await self.store.mint_boot_enrolment(
                    self.idc, task.sn, task_kv=task_kv, lease_kv=lease_kv, actor="boot"
                )
            except ConflictError:
                if attempt:
                    BOOT_CREDENTIALS.labels("conflict").inc()
                    raise
                continue  # the view lagged: decide again on etcd's own data
            BOOT_CREDENTIALS.labels("issued").inc()
            log.info("boot credential issued", extra={"idc": self.idc, "sn": task.sn, "mac": mac})
            return credential_archive(secret)
        raise AssertionError("unreachable")

    async def _credential_target(
        self, mac: str, *, fresh: bool
    ) -> tuple[Task, KeyValue, KeyValue | None]:
        if fresh:
            found = []
            for task, _ in self.tasks_for(mac):
                stored = await self.store.get_task(self.idc, task.sn)
                if stored.kv is not None:
                    found.append((stored.task, stored.kv))
        else:
            found = self.tasks_for(mac)
        decision = decide([t for t, _ in found])
        if decision.task is None:
            BOOT_CREDENTIALS.labels(decision.reason.name.lower()).inc()
            if decision.reason is Reason.UNKNOWN_MAC:
                raise NotFoundError(f"no task for MAC {mac} in {self.idc}", field="mac")
            raise ConflictError(
                f"no credential for MAC {mac}: {decision.reason.value}", field="mac"
            )
        task = decision.task
        task_kv = next(kv for t, kv in found if t.sn == task.sn)
        lease_key = schema.lease_key(self.idc, task.sn)
        view = self._machines()
        lease_kv = (
            await self.store.client.get(lease_key) if fresh or view is None else view.get(lease_key)
        )
        return task, task_kv, lease_kv

    async def _refuse_if_agent_alive(self, sn: str, lease_kv: KeyValue | None) -> None:
        if lease_kv is None:
            return
        lease_id = lease_kv.lease or parse_lease_value(lease_kv.value)
        if not lease_id:
            return
        info = await self.store.client.lease_time_to_live(lease_id)
        if info is None:
            return
        silent = info.granted_ttl - info.ttl
        if silent < self.takeover_after:
            BOOT_CREDENTIALS.labels("agent_live").inc()
            raise ConflictError(
                f"an agent is live for the task of {sn} (heard from {silent}s ago): no new "
                "credential while it runs",
                field="mac",
            )

    # --- OS types ------------------------------------------------------------------------

    def installable(self) -> tuple[str, ...]:
        """The OS types this regional can install now."""
        return installable(self.config.plans, self.artifacts_dir)

    async def publish_os_types(self, url: str) -> OsTypes:
        """Publish :meth:`installable` for the control plane."""
        published = OsTypes(os_types=self.installable(), published_at=utcnow(), regional_url=url)
        await self.store.publish_os_types(self.idc, published)
        log.info("published OS types", extra={"idc": self.idc, "os_types": published.os_types})
        return published

    async def keep_os_types_published(
        self,
        url: str,
        *,
        interval: float = 30.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Publish now, then again whenever the set changes (an image added or removed).

        Runs on the active regional only (its writes are fenced on its leadership)."""
        current = await self.publish_os_types(url)
        self.published.set()
        task_status.started()
        while True:
            await trio.sleep(interval)
            if self.installable() == current.os_types:
                continue
            try:
                current = await self.publish_os_types(url)
            except EtcdError as exc:
                # Tried again next interval; a lost leadership restarts the session anyway.
                log.warning("publishing OS types failed", extra={"error": str(exc)})
