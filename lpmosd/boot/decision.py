"""How a MAC boots: install (the installer with a fresh credential) or the local disk.

A pure function of what the regional's view holds for the MAC, so the whole table
(status × netboot × known/unknown MAC) is tested without etcd or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from lpmosd.documents import Task, TaskStatus

#: Statuses in which a machine boots the installer (its netboot flag permitting).
BOOT_STATUSES: Final = frozenset({TaskStatus.PENDING, TaskStatus.APPROVED, TaskStatus.INSTALLING})


class Reason(StrEnum):
    """Why a machine boots what it boots (shown in the script and the logs)."""

    INSTALL = "install task is live"
    UNKNOWN_MAC = "no task for this mac"
    FINISHED = "task is finished"
    NETBOOT_OFF = "netboot is off for this task"
    AMBIGUOUS = "several live tasks have this mac"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one boot request: ``task`` set only when the installer boots."""

    reason: Reason
    task: Task | None = None

    @property
    def install(self) -> bool:
        """Whether the machine boots the installer."""
        return self.reason is Reason.INSTALL


def decide(tasks: list[Task]) -> Decision:
    """Decide for a MAC given every task of the IDC that carries it (normally 0 or 1)."""
    if not tasks:
        return Decision(Reason.UNKNOWN_MAC)
    live = [t for t in tasks if t.status in BOOT_STATUSES]
    if len(live) > 1:
        return Decision(Reason.AMBIGUOUS)
    if not live:
        return Decision(Reason.FINISHED)
    task = live[0]
    if not task.netboot:
        return Decision(Reason.NETBOOT_OFF)
    return Decision(Reason.INSTALL, task)
