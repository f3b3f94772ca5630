"""Many tasks at once, written straight through etcd in batched Txns (not one HTTP call each).

Each machine gets what ``Store.create_task`` writes (its server entry and task document) plus
a hardware meta key and an enrolment record, so listings scan the key layout a real fleet has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta

import trio
from provisioning_kit import HARDWARE

from lpmosd import lifecycle, schema
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.documents import MachineMeta, ServerEntry, Task, TaskStatus
from lpmosd.etcd import EtcdClient, Op, put
from lpmosd.etcd.txn import MAX_TXN_OPS
from lpmosd.timestamps import utcnow

STATUS_CYCLE: tuple[TaskStatus, ...] = (
    TaskStatus.PENDING,
    TaskStatus.INSTALLING,
    TaskStatus.COMPLETED,
    TaskStatus.FAILED,
)


def sn_of(i: int) -> str:
    """The serial number of machine ``i`` (zero-padded, so key order is numeric order)."""
    return f"sn-{i:06d}"


def mac_of(i: int) -> str:
    """A distinct MAC for machine ``i``."""
    b = i.to_bytes(4, "big")
    return "02:00:" + ":".join(f"{x:02x}" for x in b)


def make_task(idc: str, i: int, status: TaskStatus) -> Task:
    """The task document of machine ``i`` in ``status`` (history not replayed: a fixture)."""
    req = CreateTaskRequest.from_obj(
        {"idc": idc, "sn": sn_of(i), "mac": mac_of(i), "os_type": "demo", "os_version": "1"}
    )
    now = utcnow() - timedelta(seconds=i)
    task = lifecycle.new_task(req, task_id=f"task-{i:012x}", now=now, actor="bulk")
    return replace(task, status=status)


def machine_ops(task: Task, *, full: bool = True) -> list[Op]:
    """The puts of one machine: server entry and task, and (``full``) a meta and an
    enrolment-like record, as a registered machine has."""
    ops: list[Op] = [
        put(schema.server_key(task.idc, task.sn), ServerEntry.for_task(task).to_json()),
        put(schema.task_key(task.idc, task.sn), task.to_json()),
    ]
    if full:
        meta = MachineMeta.from_report(HARDWARE, now=task.created_at)
        ops.append(put(schema.meta_key(task.idc, task.sn), meta.to_json()))
        ops.append(put(schema.enrolment_key(task.idc, task.sn), '{"fixture": true}'))
    return ops


async def create_tasks(
    client: EtcdClient,
    idc: str,
    count: int,
    *,
    first: int = 0,
    statuses: Sequence[TaskStatus] = STATUS_CYCLE,
    full: bool = True,
    concurrency: int = 4,
) -> list[Task]:
    """Write ``count`` machines ``first..first+count-1`` of ``idc``; statuses cycle.

    ``full=False`` writes only server entries and tasks (what a table needs; quicker).
    """
    tasks = [make_task(idc, i, statuses[i % len(statuses)]) for i in range(first, first + count)]
    per_txn = MAX_TXN_OPS // len(machine_ops(tasks[0], full=full)) if tasks else 1
    batches = [tasks[i : i + per_txn] for i in range(0, len(tasks), per_txn)]
    limiter = trio.CapacityLimiter(concurrency)

    async def write(batch: list[Task]) -> None:
        async with limiter:
            r = await client.txn([], [op for t in batch for op in machine_ops(t, full=full)])
            assert r.succeeded

    async with trio.open_nursery() as nursery:
        for batch in batches:
            nursery.start_soon(write, batch)
    return tasks
