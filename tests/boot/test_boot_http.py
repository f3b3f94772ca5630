"""The boot routes of a running regional over a real etcd: decisions, the netboot flag,
the per-boot credential, artifacts (Range, ETag, .sha256), traversal, OS types."""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path

import pytest
import trio
from provisioning_kit import HARDWARE, bearer, wait_for

from lpmosd import schema
from lpmosd.boot.cpio import SECRET_PATH
from lpmosd.documents import TaskStatus
from lpmosd.store import Store

from .conftest import IMAGE, BootWorld

MAC = "52:54:00:12:34:56"
HYPH = MAC.replace(":", "-")


def unpack_secret(archive: bytes, where: Path) -> str:
    """The secret inside a credential initrd, unpacked by GNU cpio."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["cpio", "-i", "--make-directories", "--quiet", "--no-absolute-filenames"],
        input=archive,
        cwd=where,
        check=True,
    )
    return (where / SECRET_PATH).read_text()


async def script(world: BootWorld, mac: str = HYPH) -> str:
    r = await world.regional.get(f"/boot/{mac}.ipxe", params={"uuid": "u-1", "serial": "S1"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text.startswith("#!ipxe\n")
    return r.text


async def register(world: BootWorld, sn: str, secret: str, mac: str = MAC) -> int:
    r = await world.regional.post(
        "/api/v1/agent/register",
        json={"sn": sn, "mac": mac, "hardware": HARDWARE, "enrollment_secret": secret},
    )
    return r.status_code


async def credential(world: BootWorld, tmp: Path, mac: str = HYPH) -> str:
    r = await world.regional.get(f"/boot/{mac}/credentials.cpio")
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    return unpack_secret(r.content, tmp / f"cpio-{r.headers['date']}-{id(r)}")


# --- scripts and decisions ------------------------------------------------------------


async def test_entry_script_names_the_host_the_machine_used(world: BootWorld) -> None:
    r = await world.regional.get("/boot.ipxe", headers={"Host": "10.0.2.100"})
    assert r.status_code == 200
    assert "chain --autofree http://10.0.2.100/boot/${netX/mac:hexhyp}.ipxe?" in r.text
    r = await world.regional.get("/boot.ipxe", headers={"Host": "evil ${x}"})
    assert r.status_code == 400 and r.json()["field"] == "host"


async def test_unknown_mac_boots_the_disk_and_is_listed(world: BootWorld) -> None:
    text = await script(world, "52-54-00-99-99-99")
    assert "exit 0" in text and "no task for this mac" in text
    assert "kernel" not in text
    page = (await world.regional.get("/")).text
    assert "52:54:00:99:99:99" in page and "serial S1" in page
    metrics = (await world.regional.get("/metrics")).text
    assert "lpmosd_boot_unknown_mac_total 1.0" in metrics
    # A task for the MAC takes it off the list.
    await world.create("sn-9", "52:54:00:99:99:99")
    await wait_for(lambda: "52:54:00:99:99:99" not in world.daemon.regional.boot.unknown)  # type: ignore[union-attr]


async def test_bad_mac_is_a_400_naming_mac(world: BootWorld) -> None:
    for bad in ("zz-54-00-12-34-56", "52-54-00-12-34", "..", "52-54-00-12-34-56-78"):
        r = await world.regional.get(f"/boot/{bad}.ipxe")
        assert r.status_code == 400 and r.json()["field"] == "mac", bad


async def test_live_task_boots_the_installer_then_its_disk(world: BootWorld, store: Store) -> None:
    task = await world.create("sn-1", MAC)
    assert task["netboot"] is True
    await wait_for(lambda: world.daemon.regional.boot.decide(MAC).install)  # type: ignore[union-attr]
    for form in (HYPH, MAC, HYPH.upper()):
        text = await script(world, form)
        assert (
            f"kernel --name vmlinuz {world.regional.base_url}/boot/files/installer/vmlinuz" in text
        )
        assert f"lpmosd.sn=sn-1 lpmosd.mac={MAC}" in text
        assert f"/boot/{HYPH}/credentials.cpio" in text
    # The agent installs and completes: the completing Txn turns netboot off.
    secret = await credential(world, Path(world.artifacts).parent)
    r = await world.regional.post(
        "/api/v1/agent/register",
        json={"sn": "sn-1", "mac": MAC, "hardware": HARDWARE, "enrollment_secret": secret},
    )
    assert r.status_code == 200, r.text
    auth = bearer(r.json()["agent_token"])
    await world.cp.post("/api/v1/tasks/dc1/sn-1/approve", json={})
    r = await world.regional.post(
        "/api/v1/agent/sn-1/progress", json={"step": "partitioning", "percent": 100}, headers=auth
    )
    assert r.status_code == 200, r.text
    r = await world.regional.post("/api/v1/agent/sn-1/complete", json={}, headers=auth)
    assert r.status_code == 200, r.text
    stored = await store.get_task("dc1", "sn-1")
    assert stored.task.status is TaskStatus.COMPLETED and stored.task.netboot is False
    # One Txn: the revision that completed the task is the one that turned netboot off.
    history = await world.daemon.client.get(schema.task_key("dc1", "sn-1"))
    assert history is not None and history.mod_revision == stored.mod_revision
    await wait_for(lambda: not world.daemon.regional.boot.decide(MAC).install)  # type: ignore[union-attr]
    text = await script(world)
    assert "task is finished" in text and "kernel" not in text
    r = await world.cp.get("/api/v1/tasks/dc1/sn-1")
    assert r.json()["netboot"] is False


async def test_cancelled_and_failed_tasks_boot_the_disk(world: BootWorld, store: Store) -> None:
    await world.create("sn-1", MAC)
    await store.cancel("dc1", "sn-1", actor="op")
    await wait_for(lambda: not world.daemon.regional.boot.decide(MAC).install)  # type: ignore[union-attr]
    assert "task is finished" in await script(world)
    # A new task for the same machine boots the installer again.
    r = await world.cp.post(
        "/api/v1/tasks", json={"idc": "dc1", "sn": "sn-1", "mac": MAC, "os_type": "demo"}
    )
    assert r.status_code == 201
    await store.approve("dc1", "sn-1", approved_by="op")
    await store.record_progress("dc1", "sn-1", step="partitioning", percent=5, message="")
    await store.fail("dc1", "sn-1", "disk on fire", actor="agent")
    await wait_for(lambda: not world.daemon.regional.boot.decide(MAC).install)  # type: ignore[union-attr]
    # Retry: netboot is on again and the installer boots.
    r = await world.cp.post("/api/v1/tasks/dc1/sn-1/retry", json={})
    assert r.status_code == 200, r.text
    assert r.json()["netboot"] is True
    await wait_for(lambda: world.daemon.regional.boot.decide(MAC).install)  # type: ignore[union-attr]
    assert "kernel --name vmlinuz" in await script(world)


# --- the per-boot credential --------------------------------------------------------------


async def test_each_fetch_mints_a_new_secret_and_kills_the_old(
    world: BootWorld, tmp_path: Path
) -> None:
    await world.create("sn-1", MAC)
    await wait_for(lambda: world.daemon.regional.boot.decide(MAC).install)  # type: ignore[union-attr]
    first = await credential(world, tmp_path)
    second = await credential(world, tmp_path)
    assert first != second and first.startswith("lpe_")
    assert await register(world, "sn-1", first) == 401  # invalidated by the second fetch
    assert await register(world, "sn-1", second) == 200
    # The agent is live now: no credential, and the used secret cannot enrol a second agent.
    r = await world.regional.get(f"/boot/{HYPH}/credentials.cpio")
    assert r.status_code == 409 and r.json()["field"] == "mac"
    assert await register(world, "sn-1", second) == 409  # replay while the agent lives


async def test_a_credential_opens_only_its_own_task(world: BootWorld, tmp_path: Path) -> None:
    other = "52:54:00:00:00:02"
    await world.create("sn-1", MAC)
    await world.create("sn-2", other)
    await wait_for(lambda: world.daemon.regional.boot.decide(other).install)  # type: ignore[union-attr]
    secret = await credential(world, tmp_path)
    assert await register(world, "sn-2", secret, mac=other) == 401
    assert await register(world, "sn-1", secret, mac=other) == 409  # MAC of another task


async def test_no_credential_without_a_live_netboot_task(
    world: BootWorld, store: Store, tmp_path: Path
) -> None:
    r = await world.regional.get("/boot/52-54-00-77-77-77/credentials.cpio")
    assert r.status_code == 404 and r.json()["field"] == "mac"
    await world.create("sn-1", MAC)
    await store.cancel("dc1", "sn-1", actor="op")
    r = await world.regional.get(f"/boot/{HYPH}/credentials.cpio")
    assert r.status_code == 409 and "finished" in r.json()["error"]


async def test_a_silent_agent_does_not_block_a_reboot(world: BootWorld, tmp_path: Path) -> None:
    """The machine rebooted mid-install: its old agent stopped heartbeating. Once silent
    for 1.5 heartbeat intervals, the next boot gets a fresh credential."""
    await world.create("sn-1", MAC)
    await wait_for(lambda: world.daemon.regional.boot.decide(MAC).install)  # type: ignore[union-attr]
    assert await register(world, "sn-1", await credential(world, tmp_path)) == 200
    assert (await world.regional.get(f"/boot/{HYPH}/credentials.cpio")).status_code == 409

    async def fresh() -> bool:
        r = await world.regional.get(f"/boot/{HYPH}/credentials.cpio")
        return r.status_code == 200

    await wait_for(fresh, timeout=15, interval=0.5, what="a credential after the agent fell silent")


async def test_secrets_stay_out_of_logs_and_etcd(
    world: BootWorld, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await world.create("sn-1", MAC)
    await wait_for(lambda: world.daemon.regional.boot.decide(MAC).install)  # type: ignore[union-attr]
    text = await script(world)
    secret = await credential(world, tmp_path)
    assert secret not in text
    for record in caplog.records:
        assert secret not in record.getMessage() and secret not in str(record.__dict__)
    enrolment = await world.daemon.client.get(schema.enrolment_key("dc1", "sn-1"))
    assert enrolment is not None and secret.encode() not in enrolment.value
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in enrolment.value


# --- artifacts ----------------------------------------------------------------------------


async def test_range_etag_and_last_modified(world: BootWorld) -> None:
    data = (world.artifacts / IMAGE).read_bytes()
    url = f"/boot/files/{IMAGE}"
    r = await world.regional.get(url)
    assert r.status_code == 200 and r.content == data
    assert r.headers["accept-ranges"] == "bytes"
    assert int(r.headers["content-length"]) == len(data)
    etag, modified = r.headers["etag"], r.headers["last-modified"]
    r = await world.regional.get(url, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == data[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(data)}"
    r = await world.regional.get(url, headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == data[-10:]
    r = await world.regional.get(url, headers={"Range": f"bytes={len(data) - 5}-"})
    assert r.status_code == 206 and r.content == data[-5:]
    r = await world.regional.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    r = await world.regional.get(url, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b""
    # A resumed download of a file that changed meanwhile gets the whole new file.
    r = await world.regional.get(url, headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert r.status_code == 200 and len(r.content) == len(data)
    r = await world.regional.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert r.status_code == 206
    r = await world.regional.get(url, headers={"Range": "bytes=0-9", "If-Range": modified})
    assert r.status_code == 206
    r = await world.regional.head(url)
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["content-length"]) == len(data)
    # Replacing the file changes its validators.
    (world.artifacts / IMAGE).write_bytes(b"new image")
    r = await world.regional.get(url, headers={"If-None-Match": etag})
    assert r.status_code == 200 and r.content == b"new image" and r.headers["etag"] != etag


async def test_sha256_beside_each_file(world: BootWorld) -> None:
    for path in ("installer/vmlinuz", "installer/initrd", IMAGE):
        r = await world.regional.get(f"/boot/files/{path}.sha256")
        assert r.status_code == 200, path
        digest = hashlib.sha256((world.artifacts / path).read_bytes()).hexdigest()
        assert r.text == f"{digest}  {Path(path).name}\n"
    r = await world.regional.get("/boot/files/images/none.tar.zst.sha256")
    assert r.status_code == 404


async def raw_get(port: int, target: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request with ``target`` sent exactly as given (no client normalising)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(10):
        await stream.send_all(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        while len(body) < length:
            body += await stream.receive_some(65536)
    await stream.aclose()
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    "target",
    [
        b"/boot/files/../secret.txt",
        b"/boot/files/installer/../../secret.txt",
        b"/boot/files/%2e%2e/secret.txt",
        b"/boot/files/..%2fsecret.txt",
        b"/boot/files/installer%2f..%2f..%2fsecret.txt",
        b"/boot/files//etc/passwd",
        b"/boot/files/%2fetc%2fpasswd",
        b"/boot/files/installer/%00",
        b"/boot/files/escape/secret.txt",
        b"/boot/files/escape.sha256",
        b"/boot/files/../secret.txt.sha256",
        b"/boot/files/installer",
        b"/boot/files/.",
    ],
)
async def test_no_path_escapes_the_artifacts_dir(world: BootWorld, target: bytes) -> None:
    outside = world.artifacts.parent
    (outside / "secret.txt").write_text("TOP SECRET")
    (world.artifacts / "escape").symlink_to(outside, target_is_directory=True)
    port = int(world.regional.base_url.port or 0)
    status, body = await raw_get(port, target)
    assert status in (400, 404), (target, status)
    assert b"TOP SECRET" not in body and b"root:" not in body


# --- OS types -----------------------------------------------------------------------------


async def test_os_types_are_published_and_enforced(world: BootWorld) -> None:
    published = await Store(world.daemon.client).get_os_types("dc1")
    assert published is not None
    # rocky-9's image is missing from the artifacts dir: not offered.
    assert published.os_types == ("Debian 12", "Ubuntu 22.04", "debian-12", "demo")
    for os_type in ("rocky-9", "Plan9"):
        body = {"idc": "dc1", "sn": "sn-1", "mac": MAC, "os_type": os_type}
        r = await world.cp.post("/api/v1/tasks", json=body)
        assert r.status_code == 400 and r.json()["field"] == "os_type"
        assert "'debian-12'" in r.json()["error"] and "'demo'" in r.json()["error"]
    r = await world.cp.post(
        "/api/v1/tasks", json={"idc": "dc2", "sn": "sn-1", "mac": MAC, "os_type": "demo"}
    )
    assert r.status_code == 400 and "has not published" in r.json()["error"]
    assert (await world.cp.get("/api/v1/tasks")).json()["count"] == 0  # nothing written
    # The image arrives: the regional offers the plan.
    (world.artifacts / "images/rocky-9.tar.zst").write_bytes(b"image")
    assert world.daemon.regional is not None
    await world.daemon.regional.boot.publish_os_types(world.daemon.regional.url)
    await world.create("sn-1", MAC, os_type="rocky-9")
    # The dashboard's OS field offers the published choices.
    r = await world.cp.get("/tasks/create")
    assert r.status_code == 200
    for os_type in ("debian-12", "rocky-9", "demo"):
        assert f'<option value="{os_type}">' in r.text
    assert 'value="Rocky 9"' not in r.text
