#!/usr/bin/env python3
"""Regenerate the README's dashboard screenshots: ``docs/dashboard.png`` and ``docs/task.png``.

Usage (from the repository root, after ``scripts/bootstrap``)::

    .venv/bin/python scripts/screenshots.py            # writes docs/*.png
    .venv/bin/python scripts/screenshots.py --out DIR  # somewhere else

It starts a private etcd and an in-process daemon (both roles, IDC dc1), writes a small
provisioning day through the store (a completed install, one half-way, one failed, some
waiting for approval, a second IDC), signs a headless Chromium (Debian's
``/usr/bin/chromium``; nothing is downloaded) in with an operator token, and takes the
pictures. The data is fixed, so the images only change when the pages do.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the dashboard tests' daemon-on-a-thread kit

from dashboard.kit import FACTS, DaemonThread, quick_config  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from lpmosd.api_requests import CreateTaskRequest  # noqa: E402
from lpmosd.documents import MachineMeta, TaskStatus  # noqa: E402
from lpmosd.etcd_process import EtcdProcess  # noqa: E402
from lpmosd.store import Store  # noqa: E402
from lpmosd.timestamps import utcnow  # noqa: E402
from lpmosd.tokens import Role  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
STEPS = ("partitioning", "base_system", "packages", "bootloader", "network")


async def populate(store: Store) -> None:
    """A provisioning day in a few machines."""
    client = store.client
    meta = MachineMeta.from_report(FACTS.to_dict(), now=utcnow())

    async def create(idc: str, sn: str, mac: str, os_type: str = "demo", ver: str = "1") -> None:
        req = CreateTaskRequest(idc=idc, sn=sn, mac=mac, os_type=os_type, os_version=ver)
        await store.create_task(req, actor="alice")

    async def register(idc: str, sn: str, mac: str) -> None:
        lease = await client.lease_grant(3600)
        await store.register_agent(idc, sn, mac=mac, meta=meta, lease_id=lease.id)

    async def install(idc: str, sn: str, done: int, partial: int | None = None) -> None:
        await store.approve(idc, sn, approved_by="alice", notes="Hardware verified")
        for step in STEPS[:done]:
            await store.record_progress(idc, sn, step=step, percent=0, message="started")
            await store.append_logs(idc, sn, [f"running {step}"])
            await store.record_progress(idc, sn, step=step, percent=100, message="done in 42s")
        if partial is not None:
            step = STEPS[done]
            await store.record_progress(idc, sn, step=step, percent=partial, message="unpacking")
            await store.append_logs(idc, sn, [f"running {step}", "Get:1 base-files 12.4 [70 kB]"])

    machines = [
        ("dc1", "web-01", "52:54:00:00:01:01"),
        ("dc1", "web-02", "52:54:00:00:01:02"),
        ("dc1", "web-03", "52:54:00:00:01:03"),
        ("dc1", "db-01", "52:54:00:00:02:01"),
        ("dc1", "db-02", "52:54:00:00:02:02"),
        ("dc2", "gpu-01", "52:54:00:00:03:01"),
        ("dc2", "gpu-02", "52:54:00:00:03:02"),
    ]
    for idc, sn, mac in machines:
        await create(idc, sn, mac, *(("Ubuntu 22.04", "22.04") if idc == "dc2" else ()))
    for idc, sn, mac in machines[:5]:
        await register(idc, sn, mac)
    await install("dc1", "web-01", len(STEPS))
    await store.finish("dc1", "web-01", outcome=TaskStatus.COMPLETED)
    await install("dc1", "web-02", 2, partial=60)
    await install("dc1", "db-01", 3, partial=10)
    await store.finish(
        "dc1", "db-01", outcome=TaskStatus.FAILED, reason="step bootloader failed: exit status 1"
    )
    await store.approve("dc1", "web-03", approved_by="bob", notes="rack B4")
    await store.cancel("dc2", "gpu-02", actor="bob", reason="wrong rack")


def main() -> int:
    """Take the pictures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with (
        EtcdProcess(name="lpmosd-screenshots") as etcd,
        DaemonThread(quick_config(etcd.endpoints)) as daemon,
    ):
        daemon.call(populate, daemon.store)
        token = daemon.token("alice", Role.OPERATOR)
        # See tests/dashboard/conftest.py: Playwright needs a plain asyncio loop.
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1280, "height": 640})
            page.goto(daemon.control_url + "/login")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_selector("tr[data-key='dc2/gpu-02']")
            page.wait_for_selector("#live.live-on")
            page.screenshot(path=str(out / "dashboard.png"))
            page.set_viewport_size({"width": 1280, "height": 900})
            page.goto(daemon.control_url + "/tasks/dc1/web-02")
            page.wait_for_selector("#live.live-on")
            page.screenshot(path=str(out / "task.png"), full_page=True)
            browser.close()
    print(f"wrote {out / 'dashboard.png'} and {out / 'task.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
