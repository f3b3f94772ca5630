"""Deployed means booted: the first-boot credential and the installed system's call."""

from __future__ import annotations

import httpx
from provisioning_kit import bearer

from lpmosd import schema
from lpmosd.etcd import EtcdClient
from lpmosd.store import Store
from web.test_agent_app import SN, Apis, apis, create, register

__all__ = ["apis"]

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx0b5bcU2pdP0o6kgL8o8c5c2A9Wc0yZp9X0Jb1s0fG op@host"


async def install(apis: Apis) -> str:
    """Create, register, approve, get the credential, complete; returns the credential."""
    await create(apis, os_type="demo")
    await register(apis)
    r = await apis.cp.post(f"/api/v1/tasks/dc1/{SN}/approve", json={})
    assert r.status_code == 200, r.text
    r = await apis.agent.post(f"/api/v1/agent/{SN}/first-boot-credential")
    assert r.status_code == 200, r.text
    credential = r.json()["credential"]
    assert isinstance(credential, str) and credential.startswith("lpf_")
    r = await apis.agent.post(
        f"/api/v1/agent/{SN}/progress", json={"step": "post_install", "percent": 100}
    )
    assert r.status_code == 200, r.text
    r = await apis.agent.post(f"/api/v1/agent/{SN}/complete")
    assert r.status_code == 200, r.text
    return credential


async def test_first_boot_is_recorded_once(apis: Apis, store: Store, client: EtcdClient) -> None:
    credential = await install(apis)
    stored = await client.get(schema.first_boot_key("dc1", SN))
    assert stored is not None and credential.encode() not in stored.value, "only its hash"
    task = (await store.get_task("dc1", SN)).task
    assert task.first_boot_at is None
    r = await apis.cp.get(f"/api/v1/tasks/dc1/{SN}")
    assert r.json()["first_boot_at"] is None

    async with httpx.AsyncClient(base_url=apis.daemon.urls["regional"]) as machine:
        r = await machine.post(
            f"/api/v1/agent/{SN}/first-boot", json={"hostname": SN}, headers=bearer(credential)
        )
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "completed" and r.json()["first_boot_at"]
        # One time only: the credential is gone.
        again = await machine.post(
            f"/api/v1/agent/{SN}/first-boot", json={}, headers=bearer(credential)
        )
        assert again.status_code == 401 and again.json()["field"] == "authorization"
    assert await client.get(schema.first_boot_key("dc1", SN)) is None
    task = (await store.get_task("dc1", SN)).task
    assert task.first_boot_at is not None
    assert any(f"First boot of the installed system (hostname {SN})" in ln for ln in task.logs)
    r = await apis.cp.get(f"/api/v1/tasks/dc1/{SN}")
    assert r.json()["first_boot_at"].startswith(task.first_boot_at.strftime("%Y-%m-%dT%H:%M:%S"))


async def test_first_boot_refusals(apis: Apis, store: Store) -> None:
    await create(apis, os_type="demo")
    await register(apis)
    r = await apis.cp.post(f"/api/v1/tasks/dc1/{SN}/approve", json={})
    r = await apis.agent.post(f"/api/v1/agent/{SN}/first-boot-credential")
    credential = r.json()["credential"]
    async with httpx.AsyncClient(base_url=apis.daemon.urls["regional"]) as machine:
        url = f"/api/v1/agent/{SN}/first-boot"
        # No credential, a wrong one, an unknown field: refused, nothing written.
        assert (await machine.post(url, json={})).status_code == 401
        r = await machine.post(url, json={}, headers=bearer("lpf_" + "x" * 43))
        assert r.status_code == 401
        r = await machine.post(url, json={"bogus": 1}, headers=bearer(credential))
        assert r.status_code == 400 and r.json()["field"] == "bogus"
        # Not completed yet: a first boot before the install finished is a conflict.
        r = await machine.post(url, json={}, headers=bearer(credential))
        assert r.status_code == 409, r.text
    assert (await store.get_task("dc1", SN)).task.first_boot_at is None


async def test_ssh_keys_reach_the_agent_and_bad_keys_are_refused(apis: Apis) -> None:
    r = await apis.cp.post(
        "/api/v1/tasks",
        json={
            "idc": "dc1",
            "sn": "bad-keys",
            "mac": "52:54:00:00:00:09",
            "os_type": "demo",
            "ssh_authorized_keys": ["not a key"],
        },
    )
    assert r.status_code == 400 and r.json()["field"] == "ssh_authorized_keys[0]", r.text
    body = await create(apis, os_type="demo", ssh_authorized_keys=[KEY])  # type: ignore[arg-type]
    assert body["ssh_authorized_keys"] == [KEY]
    reg = await register(apis)
    task = reg["task"]
    assert isinstance(task, dict) and task["ssh_authorized_keys"] == [KEY]
