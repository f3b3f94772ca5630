"""Hostile input beyond bodies: headers, log injection, rate limits, secrets in logs."""

from __future__ import annotations

import logging

import httpx
import pytest
import trio
from provisioning_kit import (
    GUIDE_TASK,
    bearer,
    create_token,
    make_config,
    open_daemon,
    register_agent,
)

from lpmosd.etcd import EtcdClient
from lpmosd.etcd_process import EtcdProcess
from lpmosd.tokens import Role
from lpmosd.web.server import MAX_HEADER_BYTES


async def test_oversized_headers_are_refused(etcd: EtcdProcess) -> None:
    """Header blocks over the limit never reach the apps; the servers stay up."""
    async with open_daemon(make_config(etcd.endpoints)) as daemon:
        for url in daemon.urls.values():
            host, port = url.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                big = "x" * (MAX_HEADER_BYTES + 1024)
                await stream.send_all(
                    f"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n".encode()
                )
                data = b""
                with trio.move_on_after(5):
                    while b"\r\n" not in data and (chunk := await stream.receive_some(65536)):
                        data += chunk
                status = data.split(b" ", 2)[1] if data else b"(closed)"
                assert status in (b"400", b"431", b"(closed)"), data[:200]
            async with httpx.AsyncClient() as http:
                r = await http.get(f"{url}/healthz", headers={"X-Small": "x" * 1000})
                assert r.status_code == 200
                # Many headers adding up past the limit: refused as well.
                many = {f"X-H{i}": "y" * 500 for i in range(40)}
                try:
                    r = await http.get(f"{url}/healthz", headers=many)
                except httpx.HTTPError:
                    pass  # closed by the server: fine
                else:
                    assert r.status_code in (400, 431), r.status_code
                assert (await http.get(f"{url}/healthz")).status_code == 200


async def test_no_secret_reaches_the_logs(
    etcd: EtcdProcess, client: EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Tokens, enrolment secrets, agent tokens and session ids never appear in a log record,
    even at debug level, through a whole flow with refusals."""
    caplog.set_level(logging.DEBUG)
    secrets: list[str] = []
    async with open_daemon(make_config(etcd.endpoints)) as daemon:
        admin = await create_token(client, Role.ADMIN)
        secrets.append(admin)
        cp, rg = daemon.urls["control-plane"], daemon.urls["regional"]
        async with httpx.AsyncClient(base_url=cp, headers=bearer(admin)) as api:
            r = await api.post("/api/v1/tokens", json={"name": "alice", "role": "operator"})
            secrets.append(r.json()["token"])
            r = await api.post("/api/v1/tasks", json=GUIDE_TASK)
            secret = r.json()["enrollment_secret"]
            secrets.append(secret)
            await api.get("/api/v1/tasks", headers=bearer("lpm_wrong" + admin[9:]))
            r = await api.post("/login", data={"token": admin}, headers={"Authorization": ""})
            secrets.append(r.cookies.get("lpmosd_session") or "")
        async with httpx.AsyncClient(base_url=rg) as agent:
            r, auth = await register_agent(agent, sn="sn-001", mac=GUIDE_TASK["mac"], secret=secret)
            assert r.status_code == 200
            secrets.append(auth["Authorization"].removeprefix("Bearer "))
            await register_agent(agent, sn="sn-001", mac=GUIDE_TASK["mac"], secret=secret)
            await agent.post("/api/v1/agent/sn-001/heartbeat", headers=auth)
            await agent.post("/api/v1/agent/sn-001/heartbeat", headers=bearer(secret))
    secrets = [s for s in secrets if s]
    assert len(secrets) == 5
    # The daemon's own records (the test's HTTP client logs its traffic at debug level).
    ours = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert any(r.name.startswith("lpmosd") for r in ours)
    for record in ours:
        text = record.getMessage() + " " + " ".join(str(v) for v in record.__dict__.values())
        for secret in secrets:
            assert secret not in text, f"{record.name}: {record.getMessage()}"
            assert secret[4:20] not in text, f"{record.name}: {record.getMessage()}"
