"""Real firmware: QEMU's SeaBIOS + iPXE (Debian's ``ipxe-qemu``, e1000 ROM) network-boots
from a running regional.

The VM sees no network but the regional: user-mode networking with ``restrict=on``, its
DHCP handing out ``http://10.0.2.100/boot.ipxe``, and a ``guestfwd`` that runs ``socat``
to the regional on 127.0.0.1 for each connection (DESIGN.md §6). TCG, not KVM.

- A live task: iPXE fetches the entry script, the per-MAC script, the installer kernel and
  initrd and the credential initrd, and boots the kernel. The "installer" here is Debian's
  ``ipxe.lkrn`` (iPXE as a Linux bzImage): a real kernel image that prints a second iPXE
  banner when it starts, in seconds under TCG.
- A finished task: the script exits and SeaBIOS boots the disk, a one-sector image that
  prints a marker.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from lpmosd import schema
from lpmosd.credentials import Enrolment
from lpmosd.store import Store

from .conftest import IPXE_LKRN, BootWorld

MAC = "52:54:00:12:34:56"
DISK_MARKER = b"LPMOSD-DISK-BOOTED"

pytestmark = pytest.mark.skipif(
    not (shutil.which("qemu-system-x86_64") and shutil.which("socat") and IPXE_LKRN.exists()),
    reason="needs qemu-system-x86, ipxe-qemu, ipxe and socat (scripts/bootstrap installs them)",
)


def boot_sector() -> bytes:
    """A disk whose boot sector prints :data:`DISK_MARKER` through the BIOS, then halts."""
    code = bytearray(b"\x31\xdb\xbe\x00\x00\xb4\x0e")  # xor bx,bx; mov si,msg; mov ah,0eh
    loop = len(code)
    code += b"\xac\x08\xc0\x74\x04\xcd\x10"  # lodsb; or al,al; jz hang; int 10h
    code += bytes([0xEB, (loop - (len(code) + 2)) & 0xFF])  # jmp loop
    code += b"\xfa\xf4\xeb\xfd"  # hang: cli; hlt; jmp hang
    msg = 0x7C00 + len(code)
    code[3], code[4] = msg & 0xFF, msg >> 8
    # The console flushes lazily: padding after the marker gets the marker itself out.
    code += DISK_MARKER + b" " * 16 + b"\r\n\0"
    return bytes(code) + bytes(510 - len(code)) + b"\x55\xaa" + bytes(1024 * 1024 - 512)


def qemu_argv(port: int, disk: Path) -> list[str]:
    fwd = f"guestfwd=tcp:10.0.2.100:80-cmd:socat - TCP:127.0.0.1:{port}"
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-m", "256",
        "-nographic",
        "-no-reboot",
        "-boot", "order=nc",
        "-drive", f"file={disk},format=raw,if=ide",
        "-device", f"e1000,netdev=n0,mac={MAC}",
        "-netdev", f"user,id=n0,restrict=on,bootfile=http://10.0.2.100/boot.ipxe,{fwd}",
    ]  # fmt: skip


def installer_started(text: bytes) -> bool:
    """The installer kernel runs: iPXE's banner again, after the per-MAC script loaded it."""
    _, loaded, after = text.partition(b"lpmosd: loading the installer for sn-1")
    booted = after.partition(b"boot/52-54-00-12-34-56/credentials.cpio... ok")[2]
    return bool(loaded) and b"iPXE initialising devices" in booted


async def boot_until(
    world: BootWorld, disk: Path, done: Callable[[bytes], bool], *, timeout: float = 180
) -> bytes:
    """Run the VM until its console output satisfies ``done``; returns the output."""
    port = int(world.regional.base_url.port or 0)
    output = bytearray()
    proc = await trio.lowlevel.open_process(
        qemu_argv(port, disk),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        with trio.move_on_after(timeout):
            while not done(bytes(output)):
                chunk = await proc.stdout.receive_some(65536)
                if not chunk:
                    break
                output += chunk
    finally:
        proc.kill()
        await proc.wait()
    text = bytes(output)
    assert done(text), text.decode(errors="replace")[-3000:]
    return text


async def test_live_task_boots_the_installer_with_its_credential(
    world: BootWorld, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(boot_sector())
    await world.create("sn-1", MAC)
    client = world.daemon.client
    before = await client.get(schema.enrolment_key("dc1", "sn-1"))
    assert before is not None
    text = await boot_until(world, disk, installer_started)
    after = await client.get(schema.enrolment_key("dc1", "sn-1"))
    assert after is not None
    # The credential initrd was fetched: a fresh secret replaced the one of the create.
    old, new = (Enrolment.from_json(kv.value).secret_hash for kv in (before, after))
    assert new != old
    assert DISK_MARKER not in text
    assert (await Store(client).get_task("dc1", "sn-1")).task.netboot


async def test_finished_task_boots_its_disk(world: BootWorld, store: Store, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(boot_sector())
    await world.create("sn-1", MAC)
    await store.cancel("dc1", "sn-1", actor="op")
    text = await boot_until(world, disk, lambda out: DISK_MARKER in out)
    assert b"lpmosd: task is finished; booting from the next boot device" in text
    assert b"loading the installer" not in text
