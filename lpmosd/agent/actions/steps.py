"""The five steps of the debian-12 plan (see :mod:`lpmosd.agent.actions`)."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final

from lpmosd.agent.actions.context import ActionContext, ActionError
from lpmosd.agent.actions.disks import (
    BIOS_BOOT,
    ESP,
    PARTITION_TABLE,
    ROOT,
    find_disk,
    mount_target,
    partition_path,
    unmount_target,
)
from lpmosd.agent.actions.image import stream_image
from lpmosd.agent.actions.network import hosts_file, networkd_file, parse_network_config

__all__ = ["ACTIONS", "FIRST_BOOT_FILE"]

#: Read by the installed system's lpmosd-first-boot unit.
FIRST_BOOT_FILE: Final = "etc/lpmosd/first-boot.json"


async def partitioning(ctx: ActionContext) -> None:
    """Wipe the disk's signatures, write the GPT, make the filesystems."""
    disk = find_disk(ctx)
    await ctx.say(f"partitioning: target disk {disk}")
    await unmount_target(ctx)
    await ctx.run(["wipefs", "--all", "--force", disk])
    await ctx.progress(10, "signatures wiped")
    await ctx.run(
        ["sfdisk", "--wipe", "always", "--wipe-partitions", "always", disk],
        input=PARTITION_TABLE.encode(),
    )
    await ctx.progress(30, "partition table written")
    await partition_path(ctx, disk, BIOS_BOOT)
    esp = await partition_path(ctx, disk, ESP)
    root = await partition_path(ctx, disk, ROOT)
    await ctx.run(["mkfs.vfat", "-F", "32", "-n", "EFI", esp])
    await ctx.progress(50, "ESP formatted")
    await ctx.run(["mkfs.ext4", "-F", "-q", "-L", "root", root])
    await ctx.progress(90, "root formatted")


async def base_system(ctx: ActionContext) -> None:
    """Stream the OS image onto the new root."""
    if not ctx.image:
        raise ActionError("the plan names no OS image")
    disk = find_disk(ctx)
    await mount_target(ctx, disk)
    await stream_image(ctx, ctx.image, ctx.target)


async def _uuid(ctx: ActionContext, device: Path) -> str:
    out = (await ctx.run(["blkid", "-s", "UUID", "-o", "value", device], quiet=True)).strip()
    if not out:
        raise ActionError(f"{device} has no filesystem UUID")
    return out


async def _bind_system(ctx: ActionContext) -> None:
    """Bind /dev, /proc, /sys (and efivars when booted by UEFI) into the target."""
    for name in ("dev", "proc", "sys"):
        point = ctx.target / name
        point.mkdir(exist_ok=True)
        await ctx.run(["mount", "--rbind", f"/{name}", point], quiet=True)
        await ctx.run(["mount", "--make-rslave", point], quiet=True)


async def bootloader(ctx: ActionContext) -> None:
    """fstab, GRUB for BIOS and for UEFI (plus the removable path), grub.cfg."""
    disk = find_disk(ctx)
    await mount_target(ctx, disk, esp=True)
    root_uuid = await _uuid(ctx, await partition_path(ctx, disk, ROOT))
    esp_uuid = await _uuid(ctx, await partition_path(ctx, disk, ESP))
    (ctx.target / "etc/fstab").write_text(
        "# Written by lpmosd at install time.\n"
        f"UUID={root_uuid}\t/\text4\terrors=remount-ro\t0\t1\n"
        f"UUID={esp_uuid}\t/boot/efi\tvfat\tumask=0077\t0\t1\n"
    )
    await _bind_system(ctx)
    try:
        chroot = ["chroot", str(ctx.target)]
        await ctx.run([*chroot, "grub-install", "--target=i386-pc", disk])
        await ctx.progress(35, "GRUB for BIOS installed")
        efi = ["--target=x86_64-efi", "--efi-directory=/boot/efi", "--no-nvram"]
        await ctx.run([*chroot, "grub-install", *efi, "--bootloader-id=debian"])
        await ctx.run([*chroot, "grub-install", *efi, "--removable"])
        await ctx.progress(70, "GRUB for UEFI installed")
        await ctx.run([*chroot, "update-grub"])
    finally:
        for name in ("sys", "proc", "dev"):
            await ctx.run(["umount", "-R", ctx.target / name], check=False, quiet=True)


async def network(ctx: ActionContext) -> None:
    """systemd-networkd config bound to the task's MAC; hostname = sn."""
    spec = parse_network_config(ctx.values.get("network_config", "dhcp"))
    mac = ctx.values.get("mac", "")
    sn = ctx.values["sn"]
    if not mac:
        raise ActionError("the task has no MAC to bind the network config to")
    disk = find_disk(ctx)
    await mount_target(ctx, disk)
    netdir = ctx.target / "etc/systemd/network"
    netdir.mkdir(parents=True, exist_ok=True)
    content = networkd_file(spec, mac)
    (netdir / "10-lpmosd.network").write_text(content)
    (ctx.target / "etc/hostname").write_text(sn + "\n")
    (ctx.target / "etc/hosts").write_text(hosts_file(sn))
    await ctx.say(f"network: hostname {sn}", *content.splitlines())


async def post_install(ctx: ActionContext) -> None:
    """Root's authorized_keys, the first-boot credential; unmount the new system."""
    disk = find_disk(ctx)
    await mount_target(ctx, disk)
    if ctx.ssh_authorized_keys:
        ssh = ctx.target / "root/.ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys = ssh / "authorized_keys"
        keys.write_text("".join(k.strip() + "\n" for k in ctx.ssh_authorized_keys))
        keys.chmod(0o600)
        await ctx.say(f"post_install: {len(ctx.ssh_authorized_keys)} key(s) for root")
    await ctx.progress(30, "keys written")
    if ctx.first_boot_credential is not None:
        credential = await ctx.first_boot_credential()
        doc = {"regional_url": ctx.regional_url, "sn": ctx.values["sn"], "credential": credential}
        path = ctx.target / FIRST_BOOT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        await ctx.say("post_install: first-boot credential written")
    await ctx.progress(70, "first-boot credential written")
    await unmount_target(ctx)


ACTIONS: Final[Mapping[str, Callable[[ActionContext], Awaitable[None]]]] = {
    "partitioning": partitioning,
    "base_system": base_system,
    "bootloader": bootloader,
    "network": network,
    "post_install": post_install,
}
