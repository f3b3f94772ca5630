"""The target disk: which one (``disk_layout``), its partitions, mounting the new system."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from lpmosd.agent.actions.context import ActionContext, ActionError

__all__ = [
    "MIN_DISK_BYTES",
    "PARTITION_TABLE",
    "Disk",
    "find_disk",
    "mount_target",
    "partition_path",
    "unmount_target",
]

#: 1 MiB BIOS boot + 512 MiB ESP + a root the Debian image fits in with room to spare.
MIN_DISK_BYTES: Final = 3 * 1024**3
BIOS_BOOT, ESP, ROOT = 1, 2, 3
#: sfdisk input: GPT, BIOS boot (GRUB's core.img on BIOS), ESP, ext4 root on the rest.
PARTITION_TABLE: Final = (
    "label: gpt\n"
    "size=1MiB, type=21686148-6449-6E6F-744E-656564454649, name=bios-boot\n"
    "size=512MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\n"
    "type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n"
)
#: Devices that are never install targets.
_SKIPPED_PREFIXES: Final = ("loop", "ram", "sr", "fd", "dm-", "md", "zram", "nbd")


@dataclass(frozen=True, slots=True)
class Disk:
    """A block device as /sys/block describes it."""

    name: str
    size: int
    removable: bool

    def describe(self) -> str:
        """``sda (4.0 GiB)``."""
        return f"{self.name} ({self.size / 1024**3:.1f} GiB)"


def list_disks(sysroot: Path) -> list[Disk]:
    """Block devices in /sys/block, in name order."""
    out: list[Disk] = []
    base = sysroot / "sys/block"
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return out
    for name in names:
        try:
            sectors = int((base / name / "size").read_text())
            removable = (base / name / "removable").read_text().strip() == "1"
        except (OSError, ValueError):
            continue
        out.append(Disk(name=name, size=sectors * 512, removable=removable))
    return out


def find_disk(ctx: ActionContext) -> Path:
    """The install target: ``ctx.disk``, or by ``disk_layout`` (only ``auto`` is built in).

    ``auto``: the first non-removable disk of at least :data:`MIN_DISK_BYTES`; else an
    ActionError listing the disks and their sizes.
    """
    if ctx.disk is not None:
        return ctx.disk
    layout = ctx.values.get("disk_layout") or "auto"
    if layout != "auto":
        raise ActionError(f"disk_layout {layout!r} is not supported by this plan (use auto)")
    disks = list_disks(ctx.sysroot)
    candidates = [d for d in disks if not d.name.startswith(_SKIPPED_PREFIXES)]
    for d in candidates:
        if not d.removable and d.size >= MIN_DISK_BYTES:
            return ctx.dev / d.name
    seen = (
        ", ".join(d.describe() + (" removable" if d.removable else "") for d in candidates)
        or "none"
    )
    raise ActionError(
        f"no non-removable disk of at least {MIN_DISK_BYTES / 1024**3:.0f} GiB (disks: {seen})"
    )


def _partition_name(disk: Path, number: int) -> str:
    # sda -> sda1; nvme0n1 / loop0 / mmcblk0 -> nvme0n1p1 (the kernel's rule).
    sep = "p" if disk.name[-1].isdigit() else ""
    return f"{disk.name}{sep}{number}"


async def partition_path(ctx: ActionContext, disk: Path, number: int) -> Path:
    """The device node of partition ``number``, waiting for the kernel to create it.

    Without devtmpfs (a container) the node never appears by itself: it is made from the
    major:minor sysfs reports.
    """
    name = _partition_name(disk, number)
    node = disk.parent / name
    sys_dev = ctx.sysroot / "sys/class/block" / name / "dev"
    if disk.name.startswith("loop") and not sys_dev.exists():
        return await _loop_partition(ctx, disk, number)
    with trio.move_on_after(10):
        while True:
            if node.exists() and stat.S_ISBLK(node.stat().st_mode):
                return node
            if sys_dev.exists() and not node.exists():
                major, minor = map(int, sys_dev.read_text().split(":"))
                os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(major, minor))
                continue
            await trio.sleep(0.2)
    raise ActionError(f"partition {number} of {disk} did not appear as {node}")


def _mount_points() -> list[str]:
    try:
        with open("/proc/self/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    # Fields are octal-escaped (a space is \040); our paths have none.
    return [line.split()[1] for line in lines if len(line.split()) > 1]


async def _loop_partition(ctx: ActionContext, disk: Path, number: int) -> Path:
    """A loop device without partition scanning (tests on a host without udev): partition
    ``number`` as a loop device of its own over the same file, found again if it exists."""
    table = json.loads(await ctx.run(["sfdisk", "--json", disk], quiet=True))["partitiontable"]
    parts = table.get("partitions", [])
    if len(parts) < number:
        raise ActionError(f"{disk} has no partition {number}")
    sector = int(table.get("sectorsize", 512))
    offset, size = parts[number - 1]["start"] * sector, parts[number - 1]["size"] * sector
    backing = (await ctx.run(["losetup", "-n", "-O", "BACK-FILE", disk], quiet=True)).strip()
    listed = await ctx.run(
        ["losetup", "-n", "-O", "NAME,OFFSET,SIZELIMIT", "-j", backing], quiet=True
    )
    for line in listed.splitlines():
        fields = line.split()
        if len(fields) == 3 and int(fields[1]) == offset and int(fields[2]) == size:
            return Path(fields[0])
    out = await ctx.run(
        ["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size),
         backing],
        quiet=True,
    )  # fmt: skip
    return Path(out.strip())


async def _is_mounted(path: Path) -> bool:
    return str(path) in _mount_points()


async def mount_target(ctx: ActionContext, disk: Path, *, esp: bool = False) -> None:
    """Mount the new root at ``ctx.target`` (if not yet), and with ``esp`` its ESP at
    ``boot/efi`` (only GRUB writes there)."""
    ctx.target.mkdir(parents=True, exist_ok=True)
    if not await _is_mounted(ctx.target):
        await ctx.run(["mount", await partition_path(ctx, disk, ROOT), ctx.target], quiet=True)
    if not esp:
        return
    efi = ctx.target / "boot/efi"
    efi.mkdir(parents=True, exist_ok=True)
    if not await _is_mounted(efi):
        await ctx.run(["mount", await partition_path(ctx, disk, ESP), efi], quiet=True)


async def unmount_target(ctx: ActionContext) -> None:
    """Unmount everything under ``ctx.target`` (deepest first) and flush."""
    points = _mount_points()
    root = str(ctx.target)
    mine = [p for p in points if p == root or p.startswith(root + "/")]
    for p in sorted(set(mine), key=len, reverse=True):
        await ctx.run(["umount", p], quiet=True)
    await ctx.run(["sync"], quiet=True)
