"""The tasks table with a fleet's worth of tasks: one page of rows, next/previous, filters,
counts from the watched view, and live updates of this page only.

The tasks are written straight into etcd (batched Txns) before the daemon starts, so its
view loads them in one relist. The default run uses 2,000 tasks; ``-m slow`` runs the same
with 20,000. Page render times are printed (no timed assertions).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import trio
from bulk_tasks import create_tasks, sn_of
from playwright.sync_api import Browser, expect

from lpmosd.documents import TaskStatus
from lpmosd.etcd import ensure_loop, open_client
from lpmosd.etcd_process import EtcdProcess
from lpmosd.tokens import Role
from lpmosd.web.table_pages import PAGE_SIZE

from .kit import TIMEOUT, DaemonThread, login, quick_config, read_events, since_of
from .test_browser import MARKER, sign_in

expect.set_options(timeout=15_000)

#: Two IDCs: dc1 with most machines, dc2 with a few (the IDC filter's run of the order).
DC2 = 150
#: Machine i has STATUSES[i % 4]: none waits for an agent, so no reaper or disruption guard
#: changes them while the test looks.
STATUSES = (TaskStatus.PENDING, TaskStatus.CANCELLED, TaskStatus.COMPLETED, TaskStatus.FAILED)


def populate(endpoints: list[str], count: int) -> float:
    """Write ``count`` tasks (dc1 and dc2) on a thread of its own; returns the seconds taken."""
    box: list[BaseException | float] = []

    async def main() -> None:
        async with ensure_loop(), open_client(endpoints) as client:
            start = time.perf_counter()
            await create_tasks(client, "dc1", count - DC2, statuses=STATUSES, full=False)
            await create_tasks(client, "dc2", DC2, statuses=STATUSES, full=False)
            box.append(time.perf_counter() - start)

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(300)
    (result,) = box
    if isinstance(result, BaseException):
        raise result
    return result


@pytest.fixture(
    params=[pytest.param(2_000, id="2k"), pytest.param(20_000, id="20k", marks=pytest.mark.slow)]
)
def fleet(etcd: EtcdProcess, request: pytest.FixtureRequest) -> Iterator[tuple[DaemonThread, int]]:
    """A daemon whose etcd holds ``count`` tasks before it starts."""
    count: int = request.param
    seconds = populate(etcd.endpoints, count)
    start = time.perf_counter()
    # A longer session TTL: loading a fleet keeps a loaded CI machine busy for seconds.
    config = quick_config(etcd.endpoints, session_ttl=60)
    with DaemonThread(config, start_timeout=120) as d:
        print(
            f"\n{count} tasks written in {seconds:.1f} s; "
            f"daemon started and loaded them in {time.perf_counter() - start:.1f} s"
        )
        yield d, count


def timed_get(http: httpx.Client, path: str, runs: int = 5) -> tuple[float, httpx.Response]:
    """The median seconds of ``runs`` GETs of ``path``, and the last answer."""
    times: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        r = http.get(path)
        times.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
    return statistics.median(times), r


def row_keys(html: str) -> list[str]:
    marker = '<tr data-key="'
    out: list[str] = []
    at = html.find(marker)
    while at >= 0:
        start = at + len(marker)
        out.append(html[start : html.index('"', start)])
        at = html.find(marker, start)
    return out


def test_pages_of_a_fleet_over_http(fleet: tuple[DaemonThread, int]) -> None:
    daemon, count = fleet
    with httpx.Client(base_url=daemon.control_url, timeout=TIMEOUT) as http:
        login(http, daemon.token("vera", Role.VIEWER))
        first_s, first = timed_get(http, "/")
        keys = row_keys(first.text)
        assert keys == [f"dc1/{sn_of(i)}" for i in range(PAGE_SIZE)]
        assert f"1–{PAGE_SIZE} of {count:,}" in first.text
        assert f'data-count="total">{count}<' in first.text
        assert 'rel="next"' in first.text and 'rel="prev"' not in first.text
        # Middle page, by its cursor; then back.
        mid_s, mid = timed_get(http, f"/?after=dc1/{sn_of(999)}")
        assert row_keys(mid.text) == [f"dc1/{sn_of(i)}" for i in range(1000, 1000 + PAGE_SIZE)]
        assert f"1,001–{1000 + PAGE_SIZE:,} of {count:,}" in mid.text
        back = http.get(f"/?before=dc1/{sn_of(1000)}")
        assert row_keys(back.text) == [f"dc1/{sn_of(i)}" for i in range(900, 1000)]
        # The last pages: dc1's end runs into dc2.
        last_s, last = timed_get(http, "/?idc=dc2&after=dc2/" + sn_of(DC2 - 51))
        assert row_keys(last.text) == [f"dc2/{sn_of(i)}" for i in range(DC2 - 50, DC2)]
        assert 'rel="next"' not in last.text and 'rel="prev"' in last.text
        # A status filter pages through matches only, counted from the view.
        failed_s, failed = timed_get(http, "/?status=failed")
        rows = row_keys(failed.text)
        assert rows == [f"dc1/{sn_of(i)}" for i in range(3, 4 * PAGE_SIZE, 4)]
        expected_failed = (count - DC2) // 4 + DC2 // 4  # i % 4 == 3 (bulk_tasks)
        assert f"of {expected_failed:,}" in failed.text
        nxt = http.get(f"/?status=failed&after={rows[-1]}")
        assert row_keys(nxt.text)[0] == f"dc1/{sn_of(4 * PAGE_SIZE + 3)}"
        api_s, api = timed_get(http, "/api/v1/tasks?limit=100")
        assert api.json()["count"] == 100
        size = len(first.content)
    print(
        f"tasks table with {count:,} tasks ({size / 1024:.0f} KiB a page of {PAGE_SIZE}), "
        f"median render: first {first_s * 1000:.0f} ms, middle {mid_s * 1000:.0f} ms, "
        f"last {last_s * 1000:.0f} ms, status filter {failed_s * 1000:.0f} ms; "
        f"API page of 100 from etcd {api_s * 1000:.0f} ms"
    )


def test_a_page_streams_its_own_rows_and_the_counts(fleet: tuple[DaemonThread, int]) -> None:
    daemon, count = fleet
    with httpx.Client(base_url=daemon.control_url, timeout=TIMEOUT) as http:
        login(http, daemon.token("alice", Role.OPERATOR))
        page = http.get(f"/?after=dc1/{sn_of(99)}").text
        assert 'data-from="dc1/sn-000100"' in page and 'data-to="dc1/sn-000199"' in page
        since = since_of(page)
        api = daemon.token("root", Role.ADMIN)
        with httpx.Client(
            base_url=daemon.control_url,
            headers={"Authorization": f"Bearer {api}"},
            timeout=TIMEOUT,
        ) as admin:
            # Off the page: only counts reach it. On the page: the row's change.
            for sn in (sn_of(4), sn_of(152), sn_of(1500)):
                r = admin.post(f"/api/v1/tasks/dc1/{sn}/cancel", json={})
                assert r.status_code == 200, r.text
        path = f"/events?since={since}&from=dc1/sn-000100&to=dc1/sn-000199"
        events = read_events(http, path, count=2, skip=("hello",))
        kinds = [(e.event, e.data.get("key")) for e in events]
        assert ("task", f"dc1/{sn_of(152)}") in kinds
        assert all(key in (None, f"dc1/{sn_of(152)}") for _, key in kinds)
        (counts,) = [e.data["counts"] for e in events if e.event == "counts"]
        assert sum(counts["dc1"].values()) + sum(counts["dc2"].values()) == count


def test_the_paged_table_in_the_browser(fleet: tuple[DaemonThread, int], browser: Browser) -> None:
    daemon, count = fleet
    page, problems = sign_in(browser, daemon.control_url, daemon.token("alice", Role.OPERATOR))
    rows = page.locator("#tasks tbody tr")
    start = time.perf_counter()
    page.goto(daemon.control_url + "/")
    expect(rows).to_have_count(PAGE_SIZE)
    loaded = time.perf_counter() - start
    expect(page.locator("[data-count=total]")).to_have_text(str(count))
    expect(page.locator("#pager-top [data-field=range]")).to_have_text(f"1–100 of {count:,}")
    # Next, next, previous.
    for first in (100, 200):
        page.click("#pager-top a.next")
        expect(rows.first).to_have_attribute("data-key", f"dc1/{sn_of(first)}")
        expect(rows).to_have_count(PAGE_SIZE)
    page.click("#pager-bottom a.prev")
    expect(rows.first).to_have_attribute("data-key", f"dc1/{sn_of(100)}")
    expect(page.locator("#pager-top [data-field=range]")).to_have_text(f"101–200 of {count:,}")
    # The filters keep working, and page too.
    page.select_option("select[name=status]", "completed")
    expect(page.locator("#tasks tbody tr[data-status=completed]")).to_have_count(PAGE_SIZE)
    expect(rows.first).to_have_attribute("data-key", f"dc1/{sn_of(2)}")
    page.click("#pager-top a.next")
    expect(rows.first).to_have_attribute("data-key", f"dc1/{sn_of(402)}")
    page.select_option("select[name=idc]", "dc2")
    expect(rows.first).to_have_attribute("data-key", f"dc2/{sn_of(2)}")
    page.select_option("select[name=status]", "")
    expect(rows.first).to_have_attribute("data-key", f"dc2/{sn_of(0)}")
    page.select_option("select[name=idc]", "")
    expect(rows.first).to_have_attribute("data-key", f"dc1/{sn_of(0)}")
    expect(rows).to_have_count(PAGE_SIZE)
    # Live: a change on this page shows in place; one elsewhere only moves the counts.
    page.evaluate(f"{MARKER} = 1")
    api = daemon.token("root", Role.ADMIN)
    with httpx.Client(
        base_url=daemon.control_url, headers={"Authorization": f"Bearer {api}"}, timeout=TIMEOUT
    ) as http:
        pending = page.locator("[data-count=pending]")
        before = int(pending.inner_text())
        assert http.post(f"/api/v1/tasks/dc1/{sn_of(0)}/cancel", json={}).status_code == 200
        expect(page.locator(f"tr[data-key='dc1/{sn_of(0)}'] [data-field=status]")).to_have_text(
            "cancelled"
        )
        assert http.post(f"/api/v1/tasks/dc2/{sn_of(4)}/cancel", json={}).status_code == 200
        expect(pending).to_have_text(str(before - 2))
        # Deleting a task elsewhere moves the total in the pager's "of N" too.
        assert http.delete(f"/api/v1/tasks/dc2/{sn_of(4)}").status_code == 200
        expect(page.locator("#pager-bottom [data-field=range]")).to_have_text(
            f"1–100 of {count - 1:,}"
        )
    expect(rows).to_have_count(PAGE_SIZE)
    assert page.locator(f"tr[data-key='dc2/{sn_of(4)}']").count() == 0
    assert page.evaluate(MARKER) == 1
    assert problems == []
    print(f"browser: first page of {count:,} tasks loaded in {loaded * 1000:.0f} ms")
