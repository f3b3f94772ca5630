"""The dashboard in a real headless Chromium (Debian's, driven by Playwright), on real etcd.

An operator's day in one test: sign in, create a task through the form, see it in the
table, start an agent with the enrolment secret the page showed, watch its hardware appear,
approve it, and watch the progress bars advance to completed — all without a reload.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, Page, expect

from lpmosd.agent.client import AgentClient
from lpmosd.agent.main import AgentOptions, run_agent

from .kit import FACTS, MAC, DaemonThread

# Assertions retry up to this long: generous, for CI machines under load (they return as
# soon as the page is right, so a healthy run stays fast).
expect.set_options(timeout=15_000)

#: Each page's script may add this; a reload would lose it.
MARKER = "window.__lpmosdNoReload"


def sign_in(browser: Browser, base: str, token: str) -> tuple[Page, list[str]]:
    """A page signed in through the login form; the list collects dialogs and JS errors."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)  # actions; assertions: see the module's expect options
    problems: list[str] = []

    def on_dialog(dialog: Any) -> None:
        problems.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.goto(base + "/")
    expect(page).to_have_url(f"{base}/login?next=/")
    page.fill("#token", token)
    page.click("button[type=submit]")
    expect(page).to_have_url(base + "/")
    return page, problems


def start_agent(daemon: DaemonThread, secret: str, exits: list[int]) -> None:
    async def agent() -> None:
        opts = AgentOptions(
            regional_url=daemon.regional_url,
            sn="sn-001",
            mac=MAC,
            enrollment_secret=secret,
            facts=FACTS,
            poll_interval=0.1,
            log_flush_interval=0.1,
        )
        exits.append(await run_agent(opts))

    daemon.spawn(agent)


def steps_of(page: Page) -> list[tuple[str, int]]:
    """(step, percent) of every progress bar on the task page, as the DOM has them now."""
    rows: list[list[Any]] = page.eval_on_selector_all(
        "#steps li", "lis => lis.map(li => [li.dataset.step, li.querySelector('progress').value])"
    )
    return [(str(step), int(value)) for step, value in rows]


def test_a_provisioning_day_in_the_browser(
    daemon: DaemonThread, operator_token: str, browser: Browser, test_output_dir: Path
) -> None:
    base = daemon.control_url
    page, problems = sign_in(browser, base, operator_token)

    # Create through the form (the guide's fields); a bad MAC is explained next to it.
    page.click("header >> text=New task")
    page.fill("#f-idc", "dc1")
    page.fill("#f-sn", "sn-001")
    page.fill("#f-mac", "00:1a:2b:3c:4d")
    page.fill("#f-os_type", "demo")
    page.fill("#f-os_version", "1")
    page.click("form.form button[type=submit]")
    expect(page.locator("[data-error-for=mac]")).to_contain_text("MAC")
    page.fill("#f-mac", MAC.upper())
    page.click("form.form button[type=submit]")
    expect(page).to_have_url(base + "/tasks/dc1/sn-001")
    expect(page.locator("#status")).to_have_text("pending")
    secret = page.inner_text("#enrolment-secret").strip()
    assert secret.startswith("lpe_")

    # The table has it, with its status, and counts it.
    page.click("header >> text=Tasks")
    row = page.locator("tr[data-key='dc1/sn-001']")
    expect(row.locator("[data-field=status]")).to_have_text("pending")
    expect(row).to_contain_text(MAC)
    expect(page.locator("[data-count=pending]")).to_have_text("1")

    # The agent boots with the secret; its hardware shows up on the task page live.
    page.click("text=sn-001")
    expect(page).to_have_url(base + "/tasks/dc1/sn-001")
    exits: list[int] = []
    start_agent(daemon, secret, exits)
    expect(page.locator("#hardware")).to_contain_text("56 cores", timeout=10_000)
    expect(page.locator("#agent")).to_have_text("agent online")
    expect(page.locator("#steps li[data-step=hardware_collect] progress")).to_have_attribute(
        "value", "100"
    )

    # Approve with a note; from here on the page must never reload.
    page.fill("#approve-notes", "Hardware verified")
    page.click("#approve-button")
    expect(page.locator("#approval [data-field=approved_by]")).to_have_text("alice")
    expect(page.locator("#approval [data-field=notes]")).to_have_text("Hardware verified")
    page.evaluate(f"{MARKER} = 42")

    seen: set[tuple[str, int]] = set()
    statuses: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen.update(steps_of(page))
        status = page.inner_text("#status")
        if not statuses or statuses[-1] != status:
            statuses.append(status)
        if status in ("completed", "failed"):
            break
        page.wait_for_timeout(50)
    seen.update(steps_of(page))  # the event that completed it may have come after a sample
    assert statuses[-1] == "completed", (statuses, problems)
    assert "installing" in statuses  # seen on its way, not just the end state
    # The bars advanced in place: some step was seen part-way, several steps finished.
    assert any(0 < pct < 100 for _, pct in seen) or any(pct == 0 for _, pct in seen), seen
    finished = {step for step, pct in seen if pct == 100}
    assert {"partitioning", "network"} <= finished, seen
    assert page.evaluate(MARKER) == 42, "the page reloaded"
    expect(page.locator("#logs")).to_contain_text("Installation completed")
    expect(page.locator("form[data-action=approve]")).to_be_hidden()
    page.screenshot(path=str(test_output_dir / "task.png"), full_page=True)

    page.click("header >> text=Tasks")
    expect(page.locator("tr[data-key='dc1/sn-001'] [data-field=status]")).to_have_text("completed")
    expect(page.locator("[data-count=completed]")).to_have_text("1")
    page.screenshot(path=str(test_output_dir / "dashboard.png"), full_page=True)

    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exits == [0]
    assert problems == []


def test_the_table_updates_in_place(
    daemon: DaemonThread, operator_token: str, api: httpx.Client, browser: Browser
) -> None:
    page, problems = sign_in(browser, daemon.control_url, operator_token)
    page.evaluate(f"{MARKER} = 7")
    expect(page.locator("#empty")).to_be_visible()
    for sn in ("sn-b", "sn-a"):
        body = {"idc": "dc1", "sn": sn, "mac": MAC, "os_type": "demo"}
        assert api.post("/api/v1/tasks", json=body).status_code == 201
    rows = page.locator("#tasks tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_have_attribute("data-key", "dc1/sn-a")  # sorted, as the server does
    assert api.post("/api/v1/tasks/dc1/sn-b/cancel", json={}).status_code == 200
    expect(page.locator("tr[data-key='dc1/sn-b'] [data-field=status]")).to_have_text("cancelled")
    expect(page.locator("[data-count=pending]")).to_have_text("1")
    expect(page.locator("[data-count=cancelled]")).to_have_text("1")
    assert api.delete("/api/v1/tasks/dc1/sn-b").status_code == 200
    expect(rows).to_have_count(1)
    assert page.evaluate(MARKER) == 7
    assert problems == []


def test_a_script_in_an_agent_log_line_is_text(
    daemon: DaemonThread, operator_token: str, api: httpx.Client, browser: Browser
) -> None:
    body = {"idc": "dc1", "sn": "sn-001", "mac": MAC, "os_type": "demo"}
    secret = api.post("/api/v1/tasks", json=body).json()["enrollment_secret"]
    page, problems = sign_in(browser, daemon.control_url, operator_token)
    page.goto(daemon.control_url + "/tasks/dc1/sn-001")
    hostile = "<script>alert(1)</script>"

    async def agent() -> None:
        async with AgentClient(daemon.regional_url, "sn-001") as client:
            await client.register(MAC, FACTS.to_dict(), secret)
            await client.logs([hostile, '<img src=x onerror="alert(2)">'])

    daemon.call(agent)
    logs = page.locator("#logs")
    expect(logs).to_contain_text(hostile)  # arrived live, inserted as text
    page.reload()  # and rendered by the server, escaped
    expect(logs).to_contain_text(hostile)
    expect(logs).to_contain_text('<img src=x onerror="alert(2)">')
    assert page.locator("#logs script, #logs img").count() == 0
    page.wait_for_timeout(200)  # a dialog would have opened by now
    assert problems == []


def test_a_tampered_form_without_its_csrf_token_is_refused(
    daemon: DaemonThread, operator_token: str, api: httpx.Client, browser: Browser
) -> None:
    body = {"idc": "dc1", "sn": "sn-001", "mac": MAC, "os_type": "demo"}
    assert api.post("/api/v1/tasks", json=body).status_code == 201
    page, _ = sign_in(browser, daemon.control_url, operator_token)
    page.goto(daemon.control_url + "/tasks/dc1/sn-001")
    page.eval_on_selector("form[data-action=approve] input[name=csrf_token]", "e => e.remove()")
    with page.expect_response(lambda r: r.url.endswith("/approve")) as resp:
        page.click("#approve-button")
    assert resp.value.status == 403
    expect(page.locator("body")).to_contain_text("CSRF")
    task = daemon.call(daemon.store.get_task, "dc1", "sn-001").task
    assert task.status == "pending"
