"""``GET /api/v1/tasks`` in pages (limit + continue) over a real etcd and a real control plane.

A list is consistent at its first page's revision, even while tasks are created, changed and
deleted between pages; a compacted revision answers 410; bad arguments and forged tokens 400.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from bulk_tasks import create_tasks, make_task, sn_of
from provisioning_kit import keyspace, make_config, open_control_api, open_daemon

from lpmosd import schema
from lpmosd.config import ROLE_CONTROL_PLANE
from lpmosd.documents import TaskStatus
from lpmosd.etcd import EtcdClient, delete, open_client, put
from lpmosd.etcd_process import EtcdProcess
from lpmosd.task_pages import MAX_LIMIT, ContinueToken

Page = dict[str, Any]


@pytest.fixture
async def api(etcd: EtcdProcess, aio_loop: None) -> AsyncIterator[httpx.AsyncClient]:
    """A control-plane-only daemon's API (admin token) on the shared etcd."""
    config = make_config(etcd.endpoints, roles=frozenset({ROLE_CONTROL_PLANE}))
    async with open_daemon(config) as daemon, open_control_api(daemon) as http:
        yield http


async def get_page(api: httpx.AsyncClient, **params: str | int) -> Page:
    r = await api.get("/api/v1/tasks", params=params)
    assert r.status_code == 200, r.text
    page: Page = r.json()
    assert page["count"] == len(page["tasks"])
    return page


async def walk(
    api: httpx.AsyncClient, between: Any = None, **params: str | int
) -> tuple[list[Page], list[dict[str, Any]]]:
    """Every page of one list, calling ``between(page_number)`` after each page."""
    pages: list[Page] = []
    token: str | None = None
    while True:
        extra = {"continue": token} if token else {}
        page = await get_page(api, **params, **extra)
        pages.append(page)
        token = page["metadata"].get("continue")
        if token is None:
            return pages, [t for p in pages for t in p["tasks"]]
        if between is not None:
            await between(len(pages))


def keys(tasks: list[dict[str, Any]]) -> list[str]:
    return [schema.task_key(t["idc"], t["sn"]) for t in tasks]


async def test_a_walk_sees_each_task_once_as_of_its_first_page(
    api: httpx.AsyncClient, client: EtcdClient
) -> None:
    dc1 = await create_tasks(client, "dc1", 1000)
    dc2 = await create_tasks(client, "dc2", 300)
    before = {schema.task_key(t.idc, t.sn): t.status.value for t in [*dc1, *dc2]}
    created = 0

    async def write_between(n: int) -> None:
        # New tasks before and after the cursor, deletions, status changes.
        nonlocal created
        await create_tasks(client, "dc1", 5, first=5000 + created)
        await create_tasks(client, "dc0", 2, first=created)
        created += 5
        await client.delete(schema.task_key("dc1", sn_of(999 - n)))
        changed = make_task("dc2", 299 - n, TaskStatus.CANCELLED)
        await client.txn([], [put(schema.task_key("dc2", changed.sn), changed.to_json())])

    start = time.perf_counter()
    pages, tasks = await walk(api, write_between, limit=97)
    elapsed = time.perf_counter() - start
    assert len(pages) == -(-1300 // 97)
    assert all(p["count"] == 97 for p in pages[:-1])
    assert len({p["metadata"]["resourceVersion"] for p in pages}) == 1
    assert keys(tasks) == sorted(before)  # each exactly once, in key order, none added
    assert {k: t["status"] for k, t in zip(keys(tasks), tasks, strict=True)} == before
    print(f"\nwalked 1300 tasks in {len(pages)} pages of 97 with writes between: {elapsed:.2f} s")
    # The next list starts at the new revision and sees the writes.
    _, fresh = await walk(api, limit=MAX_LIMIT)
    assert len(fresh) == 1300 + (5 + 2 - 1) * (len(pages) - 1)


async def test_filtered_pages(api: httpx.AsyncClient, client: EtcdClient) -> None:
    await create_tasks(client, "dc1", 400)
    await create_tasks(client, "dc2", 40)
    # Few failed tasks among many: filtered pages may come back short, even empty, with a
    # token; the walk still finds exactly the matches.
    statuses = [TaskStatus.FAILED] + [TaskStatus.COMPLETED] * 19
    await create_tasks(client, "dc3", 400, statuses=statuses)
    pages, tasks = await walk(api, limit=2, idc="dc3", status="failed")
    assert keys(tasks) == [schema.task_key("dc3", sn_of(i)) for i in range(0, 400, 20)]
    assert any(p["count"] < 2 for p in pages[:-1])  # the bounded scan answered short pages
    _, tasks = await walk(api, limit=33, idc="dc1", status="installing")
    assert keys(tasks) == [schema.task_key("dc1", sn_of(i)) for i in range(1, 400, 4)]
    _, tasks = await walk(api, limit=50, status="pending")
    assert len(tasks) == 100 + 10
    # Without limit: the whole list in one answer, as before paging.
    whole = await get_page(api)
    assert whole["count"] == 840 and whole["metadata"] == {}
    # A full last page carries no token (no empty page to fetch).
    last = await get_page(api, limit=40, idc="dc2")
    assert last["count"] == 40 and "continue" not in last["metadata"]


async def test_bad_arguments_are_400_naming_the_field(
    api: httpx.AsyncClient, client: EtcdClient
) -> None:
    await create_tasks(client, "dc1", 10)
    await create_tasks(client, "dc2", 10)
    page = await get_page(api, limit=3, idc="dc1")
    good = page["metadata"]["continue"]
    token = ContinueToken.decode(good)
    before = await keyspace(client)
    bad_limits = ["0", "-1", str(MAX_LIMIT + 1), "abc", "1.5", " 5", "٣", "1e3"]
    for value in bad_limits:
        r = await api.get("/api/v1/tasks", params={"limit": value})
        assert r.status_code == 400 and r.json()["field"] == "limit", (value, r.text)

    def forge(**changes: Any) -> str:
        fields = {
            "revision": token.revision,
            "idc": token.idc,
            "sn": token.sn,
            "filter_idc": token.filter_idc,
            "filter_status": token.filter_status,
            **changes,
        }
        return ContinueToken(**fields).encode()

    bad_tokens = [
        "garbage",
        "!!!",
        good[:-3],
        good + "x" * 2000,
        "eyJ2IjoxfQ",  # {"v":1}
        forge(idc="../lpmosd"),
        forge(sn="x/../../tokens"),
        forge(idc="dc1\x00"),
        forge(revision=0),
        forge(revision=10**12),  # a revision etcd has not reached
        forge(filter_idc="dc2"),  # another list's token
        forge(filter_status="pending"),
    ]
    for value in bad_tokens:
        r = await api.get("/api/v1/tasks", params={"limit": "3", "idc": "dc1", "continue": value})
        assert r.status_code == 400 and r.json()["field"] == "continue", (value, r.text)
    # The filters must be the first page's.
    r = await api.get("/api/v1/tasks", params={"limit": "3", "continue": good})
    assert r.status_code == 400 and r.json()["field"] == "continue"
    r = await api.get("/api/v1/tasks", params={"idc": "dc1", "status": "failed", "continue": good})
    assert r.status_code == 400 and r.json()["field"] == "continue"
    # A token of an unfiltered list pointing into dc2 reads only what that list may read.
    page = await get_page(api, limit=1, **{"continue": forge(filter_idc=None, idc="dc2")})
    assert [t["idc"] for t in page["tasks"]] == ["dc2"]
    assert await keyspace(client) == before  # nothing written
    # The good token still works, with the page size defaulting when limit is left out.
    rest = await get_page(api, idc="dc1", **{"continue": good})
    assert [t["sn"] for t in rest["tasks"]] == [sn_of(i) for i in range(3, 10)]


async def test_a_compacted_revision_is_410(private_etcd: EtcdProcess, aio_loop: None) -> None:
    config = make_config(private_etcd.endpoints, roles=frozenset({ROLE_CONTROL_PLANE}))
    async with (
        open_client(private_etcd.endpoints) as client,
        open_daemon(config) as daemon,
        open_control_api(daemon) as api,
    ):
        await create_tasks(client, "dc1", 30)
        page = await get_page(api, limit=10)
        token = page["metadata"]["continue"]
        assert (await get_page(api, **{"continue": token}))["count"] == 20  # still fine
        r = await client.txn([], [delete(schema.task_key("dc1", sn_of(0)))])
        await client.compact(r.revision)
        r2 = await api.get("/api/v1/tasks", params={"limit": "10", "continue": token})
        assert r2.status_code == 410, r2.text
        assert r2.json()["field"] == "continue"
        assert "start the list again" in r2.json()["error"]
        # Starting again works, at the new revision.
        _, tasks = await walk(api, limit=10)
        assert len(tasks) == 29
