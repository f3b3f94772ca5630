"""Least-privilege etcd roles (``scripts/etcd-roles``, docs/etcd-auth.md) against an etcd with
TLS (client certificates required) and password auth on.

A regional's credentials reach only ``/os/{its idc}/``: etcd itself refuses everything else
(EtcdAuthError), and nothing is written. The roles are enough to run both roles end to end.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from provisioning_kit import GUIDE_TASK, bearer, create_token, make_config, open_daemon

from lpmosd.agent.client import RetryPolicy
from lpmosd.agent.main import EXIT_OK, AgentOptions, run_agent
from lpmosd.config import (
    ROLE_CONTROL_PLANE,
    ROLE_REGIONAL,
    Config,
    EtcdAuth,
    EtcdConfig,
    EtcdTLS,
)
from lpmosd.errors import EtcdAuthError
from lpmosd.etcd import Auth, Compare, TLSFiles, open_client, put
from lpmosd.etcd_process import CertificateSet, EtcdProcess, find_etcdctl_binary
from lpmosd.plan import Plan, PlanStep
from lpmosd.tokens import Role

ROOT = Path(__file__).resolve().parents[2]
USERS = {"root": "root", "control-plane": "lpmosd-cp", "dc1": "lpmosd-dc1", "dc2": "lpmosd-dc2"}


@dataclass
class Secured:
    server: EtcdProcess
    certs: CertificateSet
    passwords: dict[str, Path]  # user -> password file

    def tls(self) -> TLSFiles:
        return self.certs.client_tls()

    def auth(self, user: str) -> Auth:
        return Auth(user, self.passwords[user].read_text().strip())

    def etcd_config(self, user: str) -> EtcdConfig:
        """What a daemon's [etcd] section would say: TLS files and a password file."""
        return EtcdConfig(
            endpoints=tuple(self.server.endpoints),
            tls=EtcdTLS(
                ca_file=self.certs.ca_cert,
                cert_file=self.certs.client_cert,
                key_file=self.certs.client_key,
            ),
            auth=EtcdAuth(username=user, password_file=self.passwords[user]),
        )


def etcd_roles(
    server: EtcdProcess, certs: CertificateSet, *args: str, as_user: str | None = None
) -> None:
    """Run scripts/etcd-roles; ``as_user`` ("root:pw") once auth is on."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "ETCDCTL": find_etcdctl_binary(server.binary),
        "ETCDCTL_ENDPOINTS": server.endpoint,
        "ETCDCTL_CACERT": str(certs.ca_cert),
        "ETCDCTL_CERT": str(certs.client_cert),
        "ETCDCTL_KEY": str(certs.client_key),
    }
    if as_user is not None:
        env["ETCDCTL_USER"] = as_user
    res = subprocess.run(
        [str(ROOT / "scripts" / "etcd-roles"), *args],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, (args, res.stdout.decode(), res.stderr.decode())


@pytest.fixture(scope="module")
def secured(
    tls_certs: CertificateSet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secured]:
    """One etcd with TLS + auth and the roles, for the module (the tests only add keys)."""
    tmp_path = tmp_path_factory.mktemp("secured-etcd")
    with EtcdProcess(
        name="lpmosd-secured",
        cert_file=tls_certs.server_cert,
        key_file=tls_certs.server_key,
        trusted_ca_file=tls_certs.ca_cert,
        client_cert_auth=True,
        client_cert_file=tls_certs.client_cert,
        client_key_file=tls_certs.client_key,
    ) as server:
        yield _set_up(server, tls_certs, tmp_path)


def _set_up(server: EtcdProcess, tls_certs: CertificateSet, tmp_path: Path) -> Secured:
    passwords = {}
    for user in USERS.values():
        path = tmp_path / f"{user}.password"
        path.write_text(f"pw-of-{user}-{os.urandom(6).hex()}\n")
        path.chmod(0o600)
        passwords[user] = path
    etcd_roles(server, tls_certs, "root", str(passwords["root"]))
    etcd_roles(server, tls_certs, "control-plane", "lpmosd-cp", str(passwords["lpmosd-cp"]))
    for idc in ("dc1", "dc2"):
        user = USERS[idc]
        etcd_roles(server, tls_certs, "regional", idc, user, str(passwords[user]))
    etcd_roles(server, tls_certs, "enable")
    # Idempotent: running it again changes nothing and does not fail.
    root = "root:" + passwords["root"].read_text().strip()
    etcd_roles(
        server,
        tls_certs,
        "regional",
        "dc1",
        "lpmosd-dc1",
        str(passwords["lpmosd-dc1"]),
        as_user=root,
    )
    return Secured(server, tls_certs, passwords)


async def everything(secured: Secured) -> dict[bytes, tuple[bytes, int]]:
    async with open_client(
        secured.server.endpoints, tls=secured.tls(), auth=secured.auth("root")
    ) as c:
        result = await c.range(b"\0", range_end=b"\0")
        return {kv.key: (kv.value, kv.mod_revision) for kv in result.kvs}


async def test_regional_credentials_reach_only_their_idc(secured: Secured) -> None:
    async with open_client(
        secured.server.endpoints, tls=secured.tls(), auth=secured.auth("lpmosd-cp")
    ) as cp:
        await cp.put("/os/dc2/servers/sn-9", "{}")
        await cp.put("/lpmosd/tokens/x", "{}")
    async with open_client(
        secured.server.endpoints, tls=secured.tls(), auth=secured.auth("lpmosd-dc1")
    ) as rg:
        await rg.put("/os/dc1/servers/sn-1", "{}")  # its own IDC: fine
        assert (await rg.get_prefix("/os/dc1/")).count == 1
        before = await everything(secured)
        refused: list[Callable[[], Awaitable[Any]]] = [
            lambda: rg.put("/os/dc2/servers/sn-1", "{}"),
            lambda: rg.put("/os/dc10/servers/sn-1", "{}"),  # a prefix of "dc1" is not dc1
            lambda: rg.put("/os/dc1", "x"),
            lambda: rg.put("/lpmosd/tokens/evil", "{}"),
            lambda: rg.get("/os/dc2/servers/sn-9"),
            lambda: rg.get_prefix("/os/"),
            lambda: rg.get_prefix("/lpmosd/tokens/"),
            lambda: rg.delete("/os/dc2/", prefix=True),
            lambda: rg.delete("/os/", prefix=True),
            lambda: rg.txn(
                [Compare.absent("/os/dc1/x")],
                [put("/os/dc1/x", "1"), put("/os/dc2/x", "1")],
                [],
            ),
        ]
        for i, attempt in enumerate(refused):
            with pytest.raises(EtcdAuthError):
                await attempt()
                pytest.fail(f"attempt {i} was allowed")
        assert await everything(secured) == before, "a refused request wrote something"


def quick_plan(config: Config) -> Config:
    rg = config.regional
    assert rg is not None
    plan = Plan(os_type="demo", steps=(PlanStep(name="only", timeout=10, simulate=0.05),))
    return dataclasses.replace(
        config, regional=dataclasses.replace(rg, plans=types.MappingProxyType({"demo": plan}))
    )


@pytest.fixture
async def daemons(secured: Secured) -> AsyncIterator[tuple[str, str]]:
    """A control plane with the control-plane user, a dc1 regional with the dc1 user."""
    base = quick_plan(make_config(secured.server.endpoints))
    cp_config = dataclasses.replace(
        base,
        roles=frozenset({ROLE_CONTROL_PLANE}),
        regional=None,
        etcd=secured.etcd_config("lpmosd-cp"),
    )
    rg_config = dataclasses.replace(
        base,
        roles=frozenset({ROLE_REGIONAL}),
        control_plane=None,
        etcd=secured.etcd_config("lpmosd-dc1"),
    )
    async with open_daemon(cp_config) as cp, open_daemon(rg_config) as rg:
        yield cp.urls["control-plane"], rg.urls["regional"]


async def test_the_roles_are_enough_to_provision(
    secured: Secured, daemons: tuple[str, str]
) -> None:
    cp_url, rg_url = daemons
    async with open_client(
        secured.server.endpoints, tls=secured.tls(), auth=secured.auth("lpmosd-cp")
    ) as c:
        token = await create_token(c, Role.OPERATOR)
    async with httpx.AsyncClient(base_url=cp_url, headers=bearer(token)) as api:
        r = await api.post("/api/v1/tasks", json={**GUIDE_TASK, "os_type": "demo"})
        assert r.status_code == 201, r.text
        secret = r.json()["enrollment_secret"]
        opts = AgentOptions(
            regional_url=rg_url,
            sn=GUIDE_TASK["sn"],
            mac=GUIDE_TASK["mac"],
            enrollment_secret=secret,
            poll_interval=0.05,
            retry=RetryPolicy(initial=0.05, maximum=0.2, total=20),
        )
        async with trio.open_nursery() as nursery:
            codes: list[int] = []

            async def agent() -> None:
                codes.append(await run_agent(opts))

            nursery.start_soon(agent)
            with trio.fail_after(10):
                while True:
                    task = (await api.get("/api/v1/tasks/dc1/sn-001")).json()
                    if task["progress"]:
                        break
                    await trio.sleep(0.05)
            assert (await api.post("/api/v1/tasks/dc1/sn-001/approve", json={})).is_success
        assert codes == [EXIT_OK]
        assert (await api.get("/api/v1/tasks/dc1/sn-001")).json()["status"] == "completed"


async def test_without_credentials_etcd_refuses(secured: Secured) -> None:
    async with open_client(secured.server.endpoints, tls=secured.tls()) as anonymous:
        with pytest.raises(EtcdAuthError):
            await anonymous.get("/os/dc1/servers/sn-1")
    with pytest.raises(EtcdAuthError):
        async with open_client(
            secured.server.endpoints, tls=secured.tls(), auth=Auth("lpmosd-dc1", "wrong")
        ) as c:
            await c.get("/os/dc1/x")
