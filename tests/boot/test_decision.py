"""The decision table: every status × netboot × known/unknown MAC (no etcd, no HTTP)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from lpmosd.api_requests import CreateTaskRequest
from lpmosd.boot.decision import BOOT_STATUSES, Reason, decide
from lpmosd.documents import Task, TaskStatus
from lpmosd.lifecycle import new_task
from lpmosd.timestamps import utcnow

MAC = "52:54:00:12:34:56"


def task(status: TaskStatus, netboot: bool, sn: str = "sn-1") -> Task:
    req = CreateTaskRequest(idc="dc1", sn=sn, mac=MAC, os_type="demo")
    t = new_task(req, task_id=f"t-{sn}", now=utcnow(), actor="test")
    return dataclasses.replace(t, status=status, netboot=netboot)


@pytest.mark.parametrize(
    ("status", "netboot"), list(itertools.product(list(TaskStatus), [True, False]))
)
def test_known_mac(status: TaskStatus, netboot: bool) -> None:
    decision = decide([task(status, netboot)])
    if status in BOOT_STATUSES and netboot:
        assert decision.reason is Reason.INSTALL and decision.install
        assert decision.task is not None and decision.task.status is status
    elif status in BOOT_STATUSES:
        assert decision.reason is Reason.NETBOOT_OFF and decision.task is None
    else:
        assert decision.reason is Reason.FINISHED and decision.task is None


def test_boot_statuses_are_the_live_ones() -> None:
    assert {s.value for s in BOOT_STATUSES} == {"pending", "approved", "installing"}


def test_unknown_mac_boots_the_disk() -> None:
    decision = decide([])
    assert decision.reason is Reason.UNKNOWN_MAC and not decision.install


def test_a_finished_task_beside_a_live_one_installs_the_live_one() -> None:
    live = task(TaskStatus.APPROVED, True, sn="sn-2")
    decision = decide([task(TaskStatus.COMPLETED, False), live])
    assert decision.task == live


def test_two_live_tasks_with_one_mac_boot_nothing() -> None:
    decision = decide([task(TaskStatus.APPROVED, True), task(TaskStatus.PENDING, True, "sn-2")])
    assert decision.reason is Reason.AMBIGUOUS and not decision.install


def test_netboot_lifecycle() -> None:
    """True on create and retry, off once completed (the Txn-level test is in test_boot_http)."""
    from lpmosd import lifecycle

    now = utcnow()
    t = task(TaskStatus.PENDING, True)
    assert t.netboot
    t = lifecycle.approve(t, approved_by="op", now=now)
    t = lifecycle.record_progress(t, "partitioning", 10, now=now)
    failed = lifecycle.fail(t, "disk", now=now, actor="agent")
    assert failed.netboot
    assert lifecycle.retry(dataclasses.replace(failed, netboot=False), now=now, actor="op").netboot
    assert not lifecycle.complete(t, now=now).netboot


def test_stored_tasks_without_the_flag() -> None:
    """Documents written before the flag: a completed task boots its disk, others netboot."""
    for status in TaskStatus:
        doc = task(status, True).to_dict()
        del doc["netboot"]
        assert Task.from_dict(doc).netboot is (status is not TaskStatus.COMPLETED)
