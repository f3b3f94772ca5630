"""Shared pytest fixtures: private etcd servers, TLS material, an output directory.

etcd fixtures (see :mod:`lpmosd.etcd_process`):

- ``etcd_server`` (session): one etcd shared by the whole run.
- ``etcd`` (function): that shared server with every key deleted and every lease revoked
  before the test. Do not enable auth on it, restart, pause, kill or compact it.
- ``private_etcd`` (function): a fresh server for tests that do those things; closed after.
- ``etcd_factory`` (function): ``etcd_factory(**EtcdProcess options, start=True)`` makes
  more servers (TLS, several members of a test, ...); all are closed after the test.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio_asyncio
import trustme
from fault_table import RESULTS, fault_table

from lpmosd.etcd import EtcdClient, open_client
from lpmosd.etcd_process import CertificateSet, EtcdProcess, EtcdProcessError
from lpmosd.store import Store

REPO_ROOT = Path(__file__).resolve().parent.parent

EtcdFactory = Callable[..., EtcdProcess]


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdProcess]:
    """One etcd for the whole test run (started on first use, closed at the end)."""
    with EtcdProcess(name="lpmosd-shared") as server:
        yield server


@pytest.fixture
def etcd(etcd_server: EtcdProcess) -> EtcdProcess:
    """The shared etcd, empty: all keys deleted and all leases revoked before the test."""
    if etcd_server.paused:
        etcd_server.resume()
    if not etcd_server.running:
        etcd_server.start()
    try:
        etcd_server.wipe()
    except OSError as exc:
        etcd_server.wait_healthy(5)
        try:
            etcd_server.wipe()
        except OSError:
            raise EtcdProcessError(
                f"cannot wipe the shared etcd ({exc}); did a test enable auth on it? "
                "Use private_etcd for that."
            ) from exc
    return etcd_server


@pytest.fixture
def private_etcd() -> Iterator[EtcdProcess]:
    """A fresh etcd of the test's own, free to restart, pause, kill or compact."""
    with EtcdProcess(name="lpmosd-private") as server:
        yield server


@pytest.fixture
def etcd_factory() -> Iterator[EtcdFactory]:
    """Make extra etcd servers: ``etcd_factory(start=True, **EtcdProcess kwargs)``."""
    made: list[EtcdProcess] = []

    def make(*, start: bool = True, **kwargs: Any) -> EtcdProcess:
        kwargs.setdefault("name", f"lpmosd-extra{len(made)}")
        server = EtcdProcess(**kwargs)
        made.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in made:
            server.close()


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    """A trustme CA, a server cert for 127.0.0.1/localhost and a client cert (CN lpmosd-client)."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("lpmosd-client", common_name="lpmosd-client")
    d = tmp_path_factory.mktemp("tls")
    files = CertificateSet(
        ca_cert=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server-key.pem",
        client_cert=d / "client.pem",
        client_key=d / "client-key.pem",
    )
    ca.cert_pem.write_to_path(str(files.ca_cert))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    for pem in server.cert_chain_pems[1:]:
        pem.write_to_path(str(files.server_cert), append=True)
    server.private_key_pem.write_to_path(str(files.server_key))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    return files


@pytest.fixture
def test_output_dir(request: pytest.FixtureRequest) -> Path:
    """An empty ``test-output/<test name>/`` under the repo root (gitignored) for artefacts."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_") or "test"
    out = REPO_ROOT / "test-output" / safe
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


# --- etcd clients -------------------------------------------------------------------------
# pytest-trio runs every fixture of a test in one shared contextvars context, so the first
# etcd client to open a trio-asyncio loop would lend it to every other client and in-process
# daemon of the test, and close it at its own teardown under their feet. ``aio_loop`` opens
# the one loop first and closes it last; test packages that start daemons make it autouse
# (``use_aio_loop`` below).


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    """The test's trio-asyncio loop, outliving every client and daemon of the test."""
    async with trio_asyncio.open_loop():
        yield


@pytest.fixture
async def client(etcd: EtcdProcess, aio_loop: None) -> AsyncIterator[EtcdClient]:
    """A client of the shared (wiped) etcd, independent of any daemon's own."""
    async with open_client(etcd.endpoints) as c:
        yield c


@pytest.fixture
def store(client: EtcdClient) -> Store:
    """Store operations over :func:`client`, to set up and inspect tasks."""
    return Store(client)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault x outcome table of the fault tests that ran (tests/fault_table.py)."""
    if RESULTS:
        terminalreporter.section("fault x outcome")
        terminalreporter.write_line(fault_table())
