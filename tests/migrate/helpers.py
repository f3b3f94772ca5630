"""Helpers of the migration tests: a v2 fleet, key counts, the all-or-nothing invariant."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from lpmosd import schema, tasklogs
from lpmosd.etcd import EtcdClient
from lpmosd.migrate import v2
from lpmosd.migrate.merge import merge_task_and_state
from lpmosd.migrate.record import RECORDS_ROOT, records_prefix
from lpmosd.migrate.v2 import V2Server, V2Writer, example_server
from lpmosd.store import Store

BASE: Final = datetime(2026, 1, 30, 12, 0, tzinfo=UTC)
#: 500 servers across 3 IDCs.
FLEET: Final[Mapping[str, int]] = {"dc1": 200, "dc2": 150, "dc3": 150}


async def load_fleet(
    client: EtcdClient, sizes: Mapping[str, int] = FLEET
) -> dict[str, list[V2Server]]:
    """Write ``sizes[idc]`` example v2 machines into each IDC (all listed)."""
    fleet: dict[str, list[V2Server]] = {}
    for idc, n in sizes.items():
        servers = [example_server(i, base=BASE) for i in range(n)]
        await V2Writer(client, idc).load(servers)
        fleet[idc] = servers
    return fleet


@dataclass(frozen=True, slots=True)
class Counts:
    """Keys of one IDC, by kind."""

    v2_list: int
    v2_tasks: int
    v2_state: int
    servers: int
    tasks: int
    records: int
    other: int


async def counts(client: EtcdClient, idc: str) -> Counts:
    """Count every key under ``/os/{idc}/`` and the IDC's records, by kind."""
    result = await client.get_prefix(schema.idc_prefix(idc))
    prefix = v2.machines_prefix(idc).encode()
    c = {"list": 0, "tasks": 0, "state": 0, "server": 0, "task": 0, "other": 0}
    for kv in result.kvs:
        if kv.key == v2.list_key(idc).encode():
            c["list"] += 1
            continue
        found = v2.machine_doc_kind(kv.key, prefix)
        if found is not None:
            c[found[0]] += 1
            continue
        parsed = schema.parse_key(kv.key)
        if parsed is not None and parsed.kind == "logs":
            continue  # a task's log lines, written with it (assert_content reads them)
        c[parsed.kind if parsed is not None and parsed.kind in c else "other"] += 1
    records = await client.range(records_prefix(idc), prefix=True, count_only=True)
    return Counts(
        c["list"], c["tasks"], c["state"], c["server"], c["task"], records.count, c["other"]
    )


def migrated(n: int) -> Counts:
    """The exact key counts of an IDC whose ``n`` servers all migrated."""
    return Counts(0, 0, 0, n, n, n, 0)


async def assert_all_or_nothing(client: EtcdClient, idc: str, sns: list[str]) -> tuple[int, int]:
    """Every server is wholly v2 or wholly v3 (never half); returns (v2 count, v3 count)."""
    keys = {kv.key for kv in (await client.get_prefix(schema.idc_prefix(idc))).kvs}
    keys |= {kv.key for kv in (await client.get_prefix(RECORDS_ROOT)).kvs}
    in_v2 = in_v3 = 0
    for sn in sns:
        v2_keys = {v2.tasks_key(idc, sn).encode(), v2.state_key(idc, sn).encode()}
        v3_keys = {
            schema.server_key(idc, sn).encode(),
            schema.task_key(idc, sn).encode(),
            f"{records_prefix(idc)}{sn}".encode(),
        }
        has_v2, has_v3 = v2_keys & keys, v3_keys & keys
        if has_v3:
            assert has_v3 == v3_keys and not has_v2, f"{idc}/{sn} half migrated: {has_v3}"
            in_v3 += 1
        else:
            assert has_v2 == v2_keys, f"{idc}/{sn} lost v2 documents: {has_v2}"
            in_v2 += 1
    return in_v2, in_v3


async def assert_content(client: EtcdClient, idc: str, servers: list[V2Server]) -> None:
    """Each v3 task equals mergeTaskAndState of the v2 documents the test wrote."""
    for s in servers:
        kv = await client.get(schema.task_key(idc, s.sn))
        assert kv is not None, s.sn
        raw_task = json.dumps(s.task, separators=(",", ":")).encode()
        raw_state = json.dumps(s.state, separators=(",", ":")).encode()
        want = merge_task_and_state(idc, s.sn, raw_task, raw_state)
        doc, _ = tasklogs.stored_form(idc, s.sn, want.task)
        assert kv.value == doc.to_json(), s.sn
        # The lines went to a chunk in the same Txn: the task reads back whole.
        shown = (await Store(client).get_task(idc, s.sn)).task
        assert shown.to_dict() == want.task.to_dict(), s.sn
