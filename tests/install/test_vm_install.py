"""The proof: a VM boots from the network, installs Debian 12, reboots into it.

etcd and lpmosd (control plane + regional, in process) with the real artifacts built by
``lpmosd image build`` (cached outside the repository, keyed by package lists and builder
version); the task is created through the control-plane API for the VM's MAC. QEMU: TCG,
an ``e1000`` NIC on user-mode networking restricted to the regional (``guestfwd`` runs
``socat`` to it per connection), a 4 GiB disk, the serial console in a file.

- Phase 1: SeaBIOS/iPXE → the regional's per-MAC script → installer kernel + initrd +
  credential initrd → the agent registers → the test approves through the API → the
  debian-12 plan runs → completed (netboot off), and the installer reboots the VM.
- Phase 2: iPXE asks again, the regional answers ``exit``, SeaBIOS boots the disk, Debian
  starts, its first-boot unit calls the regional (``first_boot_at``), and the serial
  console shows a login prompt with hostname = sn.

The time of each phase is printed. The UEFI variant (OVMF) runs under ``-m slow``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from provisioning_kit import make_config, open_control_api, open_daemon

from lpmosd.config import BootConfig
from lpmosd.daemon import Daemon
from lpmosd.etcd_process import EtcdProcess
from lpmosd.image.common import BuildOptions
from lpmosd.image.debian import build_debian
from lpmosd.image.installer import build_installer
from lpmosd.plan import DEBIAN_12_PLAN
from lpmosd.store import Store

MAC = "52:54:00:4c:50:01"
SN = "vm-0001"
OVMF = Path("/usr/share/ovmf/OVMF.fd")
#: Where built images are kept between runs (outside the repository); CI caches it.
CACHE = Path(os.environ.get("LPMOSD_IMAGE_CACHE", "/var/cache/lpmosd/test-images"))
#: Generous: TCG on a loaded 2-core CI machine. The phases normally take minutes.
PHASE_TIMEOUT = float(os.environ.get("LPMOSD_VM_PHASE_TIMEOUT", "1500"))
SSH_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJf0p7kKk3Wc4ZP8QbQ3Y9mX1ZtUuR2hN5vX6yL8aB0c test@lpmosd"
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not all(shutil.which(t) for t in ("qemu-system-x86_64", "socat", "mmdebstrap")),
    reason="needs root, qemu-system-x86, socat and mmdebstrap (scripts/bootstrap installs them)",
)


def build_artifacts(out: Path) -> dict[str, int]:
    """The installer and the debian-12 image (from the cache when the inputs match)."""
    opts = BuildOptions(output=out, cache_dir=CACHE)
    sizes = build_installer(opts)
    sizes.update(build_debian(opts))
    return sizes


@dataclass
class World:
    daemon: Daemon
    cp: httpx.AsyncClient
    artifacts: Path
    sizes: dict[str, int]


@pytest.fixture
async def world(etcd: EtcdProcess, aio_loop: None, tmp_path: Path) -> AsyncIterator[World]:
    artifacts = tmp_path / "artifacts"
    started = time.monotonic()
    sizes = await trio.to_thread.run_sync(build_artifacts, artifacts)
    print(
        f"\nimages ready in {time.monotonic() - started:.0f} s: "
        + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(sizes.items()))
    )
    config = make_config(etcd.endpoints, agent_lease_ttl=30, heartbeat_interval=10)
    assert config.regional is not None
    regional = dataclasses.replace(
        config.regional,
        plans={DEBIAN_12_PLAN.os_type: DEBIAN_12_PLAN},
        boot=BootConfig(artifacts_dir=artifacts),
    )
    async with (
        open_daemon(dataclasses.replace(config, regional=regional)) as daemon,
        open_control_api(daemon) as cp,
    ):
        yield World(daemon, cp, artifacts, sizes)


def qemu_argv(port: int, disk: Path, serial: Path, *, uefi: bool) -> list[str]:
    fwd = f"guestfwd=tcp:10.0.2.100:80-cmd:socat - TCP:127.0.0.1:{port}"
    argv = [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-m", "1536",
        "-display", "none",
        "-serial", f"file:{serial}",
        "-monitor", "none",
        "-boot", "order=nc",
        "-drive", f"file={disk},format=raw,if=ide",
        "-device", f"e1000,netdev=n0,mac={MAC}",
        "-netdev", f"user,id=n0,restrict=on,bootfile=http://10.0.2.100/boot.ipxe,{fwd}",
    ]  # fmt: skip
    if uefi:
        argv += ["-bios", str(OVMF)]
    return argv


class Clock:
    """Phase times since power-on."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.marks: list[tuple[str, float]] = []

    def mark(self, what: str) -> None:
        self.marks.append((what, time.monotonic() - self.start))
        print(f"  {self.marks[-1][1]:7.1f} s  {what}", flush=True)


def console(serial: Path) -> bytes:
    """What the VM wrote to its serial console so far."""
    return serial.read_bytes() if serial.exists() else b""


def console_tail(serial: Path) -> str:
    return console(serial)[-4000:].decode(errors="replace")


async def wait_task(
    cp: httpx.AsyncClient, what: str, ok: Any, proc: trio.Process, serial: Path
) -> dict[str, Any]:
    """Poll the task through the API until ``ok(task)``; fail early if QEMU died."""
    with trio.move_on_after(PHASE_TIMEOUT):
        while True:
            r = await cp.get(f"/api/v1/tasks/dc1/{SN}")
            assert r.status_code == 200, r.text
            task: dict[str, Any] = r.json()
            if ok(task):
                return task
            assert task["status"] not in ("failed", "cancelled"), (
                f"{what}: task {task['status']}: {task.get('error')}\n"
                + "\n".join(task["logs"][-40:])
            )
            assert proc.returncode is None, f"QEMU exited ({proc.returncode}) waiting for {what}"
            await trio.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; console:\n{console_tail(serial)}")


async def wait_console(serial: Path, needle: bytes, proc: trio.Process) -> None:
    with trio.move_on_after(PHASE_TIMEOUT):
        while needle not in console(serial):
            assert proc.returncode is None, f"QEMU exited ({proc.returncode})"
            await trio.sleep(1)
        return
    raise AssertionError(f"no {needle!r} on the console; it ends with:\n{console_tail(serial)}")


async def install_and_boot(world: World, tmp_path: Path, *, uefi: bool) -> None:
    r = await world.cp.post(
        "/api/v1/tasks",
        json={
            "idc": "dc1",
            "sn": SN,
            "mac": MAC,
            "os_type": "debian-12",
            "ssh_authorized_keys": [SSH_KEY],
        },
    )
    assert r.status_code == 201, r.text
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(4 * 1024**3)
    serial = tmp_path / "serial.log"
    port = int(world.daemon.urls["regional"].rsplit(":", 1)[1])
    clock = Clock()
    print(f"\nVM ({'UEFI' if uefi else 'BIOS'}) powered on; console in {serial}", flush=True)
    proc = await trio.lowlevel.open_process(
        qemu_argv(port, disk, serial, uefi=uefi),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Phase 1: network boot, the installer's agent registers; approve; the plan runs.
        store = Store(world.daemon.client)
        with trio.fail_after(PHASE_TIMEOUT):
            while await store.get_meta("dc1", SN) is None:
                assert proc.returncode is None, f"QEMU exited ({proc.returncode})"
                await trio.sleep(1)
        clock.mark("agent registered (PXE -> installer -> agent)")
        r = await world.cp.post(f"/api/v1/tasks/dc1/{SN}/approve", json={"notes": "VM test"})
        assert r.status_code == 200, r.text
        task = await wait_task(
            world.cp, "completion", lambda t: t["status"] == "completed", proc, serial
        )
        clock.mark("install completed")
        assert task["netboot"] is False
        steps = {p["step"]: p["percent"] for p in task["progress"]}
        for step in ("partitioning", "base_system", "bootloader", "network", "post_install"):
            assert steps[step] == 100, steps
        assert any("sha256" in line and "verified" in line for line in task["logs"])
        # Phase 2: the installer reboots; the regional answers exit; Debian boots its disk.
        task = await wait_task(
            world.cp, "first boot", lambda t: t.get("first_boot_at"), proc, serial
        )
        clock.mark("first boot reported by the installed system")
        await wait_console(serial, f"{SN} login:".encode(), proc)
        clock.mark(f"login prompt '{SN} login:' on the serial console")
    finally:
        proc.kill()
        await proc.wait()
    text = console(serial)
    assert b"lpmosd-installer: install completed; rebooting" in text
    served = _bytes_served(task)
    print(f"phases: {', '.join(f'{w}: {t:.0f} s' for w, t in clock.marks)}")
    print(
        f"image bytes streamed: {served}; installer {world.sizes['installer/initrd'] / 1e6:.1f} MB"
    )


def _bytes_served(task: dict[str, Any]) -> str:
    for line in task["logs"]:
        if "bytes, sha256" in line:
            return str(line).split("base_system: ", 1)[-1]
    return "?"


@pytest.mark.slow
async def test_pxe_install_and_boot_bios(world: World, tmp_path: Path) -> None:
    await install_and_boot(world, tmp_path, uefi=False)


@pytest.mark.slow
@pytest.mark.skipif(not OVMF.exists(), reason="needs Debian's ovmf")
async def test_pxe_install_and_boot_uefi(world: World, tmp_path: Path) -> None:
    await install_and_boot(world, tmp_path, uefi=True)
