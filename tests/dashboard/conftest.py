"""Fixtures of the dashboard tests: a daemon on its own thread, HTTP clients, a browser."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

from lpmosd.etcd_process import EtcdProcess
from lpmosd.tokens import Role

from .kit import TIMEOUT, DaemonThread, login, quick_config

#: Debian's chromium; Playwright drives it as is (no browser download, see DESIGN.md §5).
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def daemon(etcd: EtcdProcess) -> Iterator[DaemonThread]:
    """Both roles against the shared (wiped) etcd, with a quick demo plan."""
    with DaemonThread(quick_config(etcd.endpoints)) as d:
        yield d


@pytest.fixture
def operator_token(daemon: DaemonThread) -> str:
    """A token of role operator, named alice."""
    return daemon.token("alice", Role.OPERATOR)


@pytest.fixture
def admin_token(daemon: DaemonThread) -> str:
    """A token of role admin, named root."""
    return daemon.token("root", Role.ADMIN)


@pytest.fixture
def viewer_token(daemon: DaemonThread) -> str:
    """A token of role viewer, named vera."""
    return daemon.token("vera", Role.VIEWER)


@pytest.fixture
def api(daemon: DaemonThread, admin_token: str) -> Iterator[httpx.Client]:
    """The control plane's API as admin (bearer token)."""
    with httpx.Client(
        base_url=daemon.control_url,
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=TIMEOUT,
    ) as http:
        yield http


@pytest.fixture
def operator(daemon: DaemonThread, operator_token: str) -> Iterator[tuple[httpx.Client, str]]:
    """A browser-like client logged in as alice (session cookie) and its CSRF token."""
    with httpx.Client(base_url=daemon.control_url, timeout=TIMEOUT) as http:
        yield http, login(http, operator_token)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium (module-scoped: Playwright's sync API owns an event loop while
    it runs, which must be gone before the next module's Trio tests).

    trio-asyncio (imported by lpmosd.etcd) makes ``asyncio.new_event_loop()`` return its
    own loop type, which Playwright's loop-in-a-greenlet cannot drive; a plain asyncio
    policy for this thread gives Playwright a plain loop. The daemon's thread is unaffected.
    """
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM)
            try:
                yield b
            finally:
                b.close()
    finally:
        asyncio.set_event_loop_policy(None)
