"""HTTPS on both APIs when certificate files are configured (test CA from trustme)."""

from __future__ import annotations

import dataclasses
import ssl
import types

import httpx
import pytest
from provisioning_kit import GUIDE_TASK, bearer, create_token, make_config, open_daemon

from lpmosd.agent.client import RetryPolicy
from lpmosd.agent.main import EXIT_OK, AgentOptions, run_agent
from lpmosd.config import Config
from lpmosd.etcd import EtcdClient
from lpmosd.etcd_process import CertificateSet, EtcdProcess
from lpmosd.plan import Plan, PlanStep
from lpmosd.tokens import Role


def tls_config(endpoints: list[str], certs: CertificateSet) -> Config:
    """Both roles with the test CA's server certificate, and a quick demo plan."""
    config = make_config(endpoints)
    assert config.control_plane is not None and config.regional is not None
    quick = Plan(os_type="demo", steps=(PlanStep(name="only", timeout=10, simulate=0.05),))
    return dataclasses.replace(
        config,
        control_plane=dataclasses.replace(
            config.control_plane, tls_cert_file=certs.server_cert, tls_key_file=certs.server_key
        ),
        regional=dataclasses.replace(
            config.regional,
            tls_cert_file=certs.server_cert,
            tls_key_file=certs.server_key,
            plans=types.MappingProxyType({"demo": quick}),
        ),
    )


async def test_both_apis_serve_https(
    etcd: EtcdProcess, client: EtcdClient, tls_certs: CertificateSet
) -> None:
    config = tls_config(etcd.endpoints, tls_certs)
    ca = ssl.create_default_context(cafile=str(tls_certs.ca_cert))
    token = await create_token(client, Role.ADMIN)
    async with open_daemon(config) as daemon:
        cp, rg = daemon.urls["control-plane"], daemon.urls["regional"]
        assert cp.startswith("https://") and rg.startswith("https://")
        async with httpx.AsyncClient(verify=ca, headers=bearer(token)) as https:
            r = await https.post(f"{cp}/api/v1/tasks", json={**GUIDE_TASK, "os_type": "demo"})
            assert r.status_code == 201, r.text
            secret = r.json()["enrollment_secret"]
            assert (await https.get(f"{rg}/healthz")).status_code == 200
            # Sessions over TLS: Secure, __Host- cookie; HSTS.
            r = await https.post(f"{cp}/login", data={"token": token, "next": "/api/v1/whoami"})
            cookie = r.headers["set-cookie"]
            assert cookie.startswith("__Host-lpmosd_session=")
            assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert "max-age" in r.headers["strict-transport-security"]
        # Plain HTTP to an HTTPS port gets nowhere; nor does a client that does not trust
        # the certificate.
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(cp.replace("https://", "http://") + "/healthz")
            with pytest.raises(httpx.ConnectError):
                await plain.get(f"{rg}/healthz")
        # The agent verifies the regional against the CA it is given.
        opts = AgentOptions(
            regional_url=rg,
            sn=GUIDE_TASK["sn"],
            mac=GUIDE_TASK["mac"],
            enrollment_secret=secret,
            ca_file=tls_certs.ca_cert,
            poll_interval=0.05,
            retry=RetryPolicy(initial=0.05, maximum=0.2, total=20),
        )
        async with httpx.AsyncClient(verify=ca, headers=bearer(token)) as https:
            r = await https.post(f"{cp}/api/v1/tasks/dc1/sn-001/approve", json={})
            assert r.status_code == 200
        assert await run_agent(opts) == EXIT_OK
