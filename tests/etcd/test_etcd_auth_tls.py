"""Auth (users, roles, expiring tokens) and TLS (client certificates) against a real etcd."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from lpmosd.errors import EtcdAuthError, EtcdError, EtcdUnavailableError
from lpmosd.etcd import Auth, TLSFiles, open_client, open_lease, watch
from lpmosd.etcd_process import CertificateSet, EtcdProcess

from .helpers import ProxyFactory, assert_our_error

ROOT_PW = "root-secret"
APP_PW = "app-secret"


@pytest.fixture
def auth_etcd(etcd_factory) -> Iterator[EtcdProcess]:  # type: ignore[no-untyped-def]
    """etcd with auth on: root, and user ``app`` whose role may only touch ``app/``.

    Simple tokens expire after one idle second (``--auth-token-ttl=1``).
    """
    server: EtcdProcess = etcd_factory(extra_args=["--auth-token=simple", "--auth-token-ttl=1"])
    ctl = server.etcdctl
    ctl("user", "add", f"root:{ROOT_PW}")
    ctl("role", "add", "app")
    ctl("role", "grant-permission", "app", "--prefix=true", "readwrite", "app/")
    ctl("user", "add", f"app:{APP_PW}")
    ctl("user", "grant-role", "app", "app")
    ctl("auth", "enable")
    yield server


def password_file(tmp_path: Path, password: str) -> str:
    p = tmp_path / "etcd-password"
    p.write_text(password + "\n")
    return str(p)


def read_auth(username: str, path: str) -> Auth:
    """What the daemon does with its config: the password comes from a file."""
    return Auth(username, Path(path).read_text().strip())


async def test_auth_operations_work(auth_etcd: EtcdProcess, tmp_path: Path) -> None:
    auth = read_auth("app", password_file(tmp_path, APP_PW))
    assert APP_PW not in repr(auth)
    async with open_client(auth_etcd.endpoints, auth=auth) as c:
        await c.put("app/k", "v")
        kv = await c.get("app/k")
        assert kv is not None and kv.value == b"v"
        assert (await c.range("app/", prefix=True)).count == 1
        r = await c.atomic_update("app/k", lambda kv: b"v2")
        assert r.changed
        async with watch(c, "app/") as stream:
            rev = (await c.put("app/w", "x")).revision
            batch = await stream.__anext__()
            if not batch.events:
                batch = await stream.__anext__()
        assert batch.events[0].kv.mod_revision == rev
        async with open_lease(c, 5) as lease:
            await c.put("app/leased", "x", lease=lease.id)
            assert await c.keepalive_once(lease.id) == 5
        await c.delete("app/", prefix=True)


async def test_token_refresh_after_expiry(auth_etcd: EtcdProcess) -> None:
    """Idle past the token TTL: a unary call and a new watch each re-authenticate once."""
    auth = Auth("app", APP_PW)
    async with (
        open_client(auth_etcd.endpoints, auth=auth) as unary,
        open_client(auth_etcd.endpoints, auth=auth) as streaming,
    ):
        await unary.put("app/k", "1")
        await streaming.get("app/k")
        generations = unary.token_generation, streaming.token_generation
        await trio.sleep(2.2)  # both tokens (TTL 1 s) have expired by now

        await unary.put("app/k", "2")  # refreshed once, transparently
        assert unary.token_generation == generations[0] + 1
        kv = await unary.get("app/k")
        assert kv is not None and kv.value == b"2"

        async with watch(streaming, "app/") as stream:
            rev = (await unary.put("app/k", "3")).revision
            batch = await stream.__anext__()
            if not batch.events:
                batch = await stream.__anext__()
        assert batch.events[0].kv.mod_revision == rev  # created before we wrote: not missed
        assert streaming.token_generation == generations[1] + 1


async def test_keepalive_stream_does_not_need_a_valid_token(
    auth_etcd: EtcdProcess, proxy_factory: ProxyFactory
) -> None:
    """etcd (3.4, 3.5) checks no token on LeaseKeepAlive: a stream re-opened with an expired,
    even a garbage, token keeps leases alive, so a held lease survives the token's expiry
    without a re-authentication. (The hub's auth branch is for servers that do check.)"""
    proxy = await proxy_factory(auth_etcd.client_port)
    async with open_client([proxy.endpoint], auth=Auth("app", APP_PW)) as c:
        lease = await c.lease_grant(30)
        assert await c.keepalive_once(lease.id) == 30
        await trio.sleep(2.2)  # the token (TTL 1 s) has expired by now
        c._token = "garbage"
        proxy.cut()  # the stream breaks; it is re-opened with the bad token
        proxy.heal()
        with trio.fail_after(8):
            assert await c.keepalive_once(lease.id, timeout=6) == 30


async def test_wrong_password(auth_etcd: EtcdProcess) -> None:
    with trio.fail_after(5), pytest.raises(EtcdAuthError) as info:
        async with open_client(auth_etcd.endpoints, auth=Auth("app", "wrong")):
            pass
    assert_our_error(info.value)
    with pytest.raises(EtcdAuthError):
        async with open_client(auth_etcd.endpoints, auth=Auth("nobody", "x")):
            pass


async def test_no_credentials_on_auth_etcd(auth_etcd: EtcdProcess) -> None:
    async with open_client(auth_etcd.endpoints) as c:
        with pytest.raises(EtcdAuthError) as info:
            await c.get("app/k")
        assert_our_error(info.value)


async def test_permission_denied_outside_role(auth_etcd: EtcdProcess) -> None:
    async with open_client(auth_etcd.endpoints, auth=Auth("app", APP_PW)) as c:
        generation = c.token_generation
        for call in (
            lambda: c.put("other/k", "v"),
            lambda: c.get("other/k"),
            lambda: c.delete("other/", prefix=True),
            lambda: c.range("", prefix=True),
        ):
            with pytest.raises(EtcdAuthError) as info:
                await call()
            assert_our_error(info.value)
            assert "permission denied" in str(info.value)
        # a refused permission is not an expired token: no pointless re-authentication
        assert c.token_generation == generation
        # a watch outside the role fails too, instead of retrying forever
        with trio.fail_after(5), pytest.raises(EtcdAuthError) as info:
            async with watch(c, "other/") as stream:
                await stream.__anext__()
        assert_our_error(info.value)
        # and the client is still good for what the role allows
        await c.put("app/ok", "v")


async def test_root_sees_everything(auth_etcd: EtcdProcess) -> None:
    async with open_client(auth_etcd.endpoints, auth=Auth("root", ROOT_PW)) as c:
        await c.put("other/k", "v")
        await c.put("app/k", "v")
        assert (await c.range("", prefix=True)).count == 2
        members = await c.member_list()
        assert len(members) == 1


# --- TLS ---------------------------------------------------------------------------------


@pytest.fixture
def tls_etcd(etcd_factory, tls_certs: CertificateSet) -> EtcdProcess:  # type: ignore[no-untyped-def]
    """etcd serving TLS that requires a client certificate signed by the test CA."""
    server: EtcdProcess = etcd_factory(
        cert_file=tls_certs.server_cert,
        key_file=tls_certs.server_key,
        trusted_ca_file=tls_certs.ca_cert,
        client_cert_auth=True,
        client_cert_file=tls_certs.client_cert,
        client_key_file=tls_certs.client_key,
    )
    return server


async def test_tls_with_client_cert(tls_etcd: EtcdProcess, tls_certs: CertificateSet) -> None:
    assert tls_etcd.endpoint.startswith("https://")
    tls = tls_certs.client_tls()
    async with open_client(tls_etcd.endpoints, tls=tls) as c:
        await c.put("tls/k", "v")
        kv = await c.get("tls/k")
        assert kv is not None and kv.value == b"v"
        async with watch(c, "tls/") as stream:
            rev = (await c.put("tls/k", "w")).revision
            batch = await stream.__anext__()
            if not batch.events:
                batch = await stream.__anext__()
        assert batch.events[0].kv.mod_revision == rev
        lease = await c.lease_grant(5)
        assert await c.keepalive_once(lease.id) == 5


async def test_tls_without_client_cert_fails(
    tls_etcd: EtcdProcess, tls_certs: CertificateSet
) -> None:
    with trio.fail_after(10), pytest.raises(EtcdError) as info:
        async with open_client(tls_etcd.endpoints, tls=TLSFiles(str(tls_certs.ca_cert))):
            pass
    assert_our_error(info.value)


async def test_tls_untrusted_server_fails(tls_etcd: EtcdProcess, tls_certs: CertificateSet) -> None:
    # no CA: the system trust store does not know the test CA
    tls = TLSFiles(None, str(tls_certs.client_cert), str(tls_certs.client_key))
    with trio.fail_after(10), pytest.raises(EtcdUnavailableError) as info:
        async with open_client(tls_etcd.endpoints, tls=tls):
            pass
    assert_our_error(info.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value) or "certificate" in str(info.value)
