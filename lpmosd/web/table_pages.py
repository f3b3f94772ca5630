"""Pages of the dashboard's tasks table, cut from the hub's sorted machines (no etcd reads).

A page is addressed by a cursor like the API's, not by a number: ``after`` (the next page
starts after this machine) or ``before`` (the previous page ends before it), so a page stays
put while tasks are added and removed elsewhere. Unlike the API, the table shows the present
(it is live), so its cursors carry no revision.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from lpmosd.documents import Task
from lpmosd.web.live import LiveHub

#: Rows per page of the tasks table.
PAGE_SIZE: Final = 100


@dataclass(frozen=True, slots=True)
class TablePage:
    """The machines of one page, where it sits among the matching ones, and its neighbours."""

    machines: list[str]
    #: How many matching machines come before this page (for "rows 101-200 of 20,000").
    offset: int
    has_prev: bool
    has_next: bool


def table_page(
    hub: LiveHub,
    *,
    idc: str = "",
    status: str = "",
    after: str = "",
    before: str = "",
    size: int = PAGE_SIZE,
) -> TablePage:
    """The page of the (filtered) table after ``after``, or before ``before``, or the first."""
    order = hub.order
    # An IDC's machines ("idc/sn") are one contiguous run of the sorted order.
    lo, hi = (
        (bisect.bisect_left(order, idc + "/"), bisect.bisect_left(order, idc + "0"))
        if idc
        else (0, len(order))
    )
    matches = _matcher(hub, status)
    if before:
        end = max(lo, min(hi, bisect.bisect_left(order, before)))
        found = _collect(order, range(end - 1, lo - 1, -1), matches, size + 1)
        if len(found) > size:
            found.pop()
            page = found[::-1]
            has_next = bool(_collect(order, range(end, hi), matches, 1))
            return TablePage(page, _offset(order, lo, page[0], matches), True, has_next)
        # Fewer than a page before the cursor: show the first page instead.
        after = ""
    start = bisect.bisect_right(order, after) if after else lo
    start = max(lo, min(hi, start))
    found = _collect(order, range(start, hi), matches, size + 1)
    has_next = len(found) > size
    page = found[:size]
    offset = _offset(order, lo, page[0], matches) if page else 0
    has_prev = offset > 0 if page else start > lo and _any(order, lo, start, matches)
    return TablePage(page, offset, has_prev, has_next)


def _matcher(hub: LiveHub, status: str) -> Callable[[str], bool] | None:
    if not status:
        return None

    def matches(machine: str) -> bool:
        task: Task | None = hub.machines[machine].task
        return task is not None and task.status.value == status

    return matches


def _collect(
    order: list[str], indexes: range, matches: Callable[[str], bool] | None, want: int
) -> list[str]:
    found: list[str] = []
    for i in indexes:
        m = order[i]
        if matches is None or matches(m):
            found.append(m)
            if len(found) == want:
                break
    return found


def _offset(order: list[str], lo: int, first: str, matches: Callable[[str], bool] | None) -> int:
    i = bisect.bisect_left(order, first)
    if matches is None:
        return i - lo
    return sum(1 for j in range(lo, i) if matches(order[j]))


def _any(order: list[str], lo: int, hi: int, matches: Callable[[str], bool] | None) -> bool:
    return any(matches is None or matches(order[j]) for j in range(lo, hi))
