"""The ``debian-12`` OS image: a bookworm root filesystem as ``images/debian-12.tar.zst``.

What the debian-12 plan extracts onto the machine's disk: Debian's kernel and initramfs,
GRUB for BIOS and UEFI (installed onto the disk by the plan's bootloader step),
systemd-networkd (the plan writes its config), openssh-server (host keys are made on the
machine's first boot, never shipped), and lpmosd's first-boot unit, which reports the first
boot of the installed system to the regional once. ``--suite``/``--mirror`` build the same
from another Debian-family archive (e.g. an Ubuntu mirror); only bookworm is tested.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

from lpmosd.image.common import (
    BuildError,
    BuildOptions,
    cache_key,
    copy_outputs,
    mmdebstrap,
    run,
    timed,
    write_sha256,
)

__all__ = ["DEBIAN_PACKAGES", "build_debian"]

log = logging.getLogger("lpmosd.image")

DEBIAN_PACKAGES: Final = (
    "linux-image-amd64",
    "initramfs-tools",
    "zstd",
    "systemd-sysv",
    "udev",
    "dbus",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub2-common",
    "e2fsprogs",
    "dosfstools",
    "iproute2",
    "openssh-server",
    "python3",
    "ca-certificates",
    "less",
)
_FILES: Final = Path(__file__).parent / "files"

#: Runs on the extracted base system (``$1`` is its root); our files are staged in ``$STAGE``.
_CUSTOMIZE: Final = r"""
set -e
root="$1"
install -D -m 0755 "$STAGE/lpmosd-first-boot" "$root/usr/local/sbin/lpmosd-first-boot"
install -D -m 0644 "$STAGE/lpmosd-first-boot.service" \
  "$root/etc/systemd/system/lpmosd-first-boot.service"
install -D -m 0644 "$STAGE/ssh-host-keys.conf" \
  "$root/etc/systemd/system/ssh.service.d/lpmosd-host-keys.conf"
install -D -m 0644 "$STAGE/grub-default" "$root/etc/default/grub"
chroot "$root" systemctl enable systemd-networkd.service lpmosd-first-boot.service
rm -f "$root"/etc/ssh/ssh_host_*
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
echo localhost >"$root/etc/hostname"
mkdir -p "$root/boot/efi" "$root/etc/lpmosd"
rm -rf "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* "$root"/var/log/*.log \
  "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
"""


def _base_tarball(opts: BuildOptions, name: str, tmp: Path) -> Path:
    """The bootstrapped system (mmdebstrap's tarball), cached by package list."""
    key = cache_key(f"{name}-base", opts, DEBIAN_PACKAGES)
    if opts.cache_dir is not None:
        cached = opts.cache_dir / f"{key}.tar"
        if cached.is_file():
            log.info("%s: cached base system %s", name, cached)
            return cached
    out = tmp / "base.tar"
    mmdebstrap(opts, DEBIAN_PACKAGES, out)
    if opts.cache_dir is not None:
        opts.cache_dir.mkdir(parents=True, exist_ok=True)
        part = opts.cache_dir / f"{key}.tar.part"
        shutil.copyfile(out, part)
        part.replace(opts.cache_dir / f"{key}.tar")
    return out


def _pack(root: Path, out: Path, epoch: int) -> None:
    """A reproducible ``tar | zstd`` of ``root``: sorted names, fixed times and owners."""
    tar = subprocess.Popen(
        [
            "tar", "-c", "-C", str(root), "--sort=name", f"--mtime=@{epoch}", "--clamp-mtime",
            "--numeric-owner", "--xattrs", "--xattrs-include=*", "--pax-option=exthdr.name="
            "%d/PaxHeaders/%f,delete=atime,delete=ctime", ".",
        ],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    with out.open("wb") as f:
        zstd = subprocess.Popen(["zstd", "-q", "-12", "-T0", "-c"], stdin=tar.stdout, stdout=f)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() or zstd.wait():
            raise BuildError("tar | zstd failed")


def build_debian(opts: BuildOptions, name: str = "debian-12") -> dict[str, int]:
    """Build ``images/<name>.tar.zst`` under ``opts.output``; returns its size."""
    image = f"images/{name}.tar.zst"
    files = sorted(p for p in _FILES.iterdir() if p.name != "installer-init")
    files_digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
    key = cache_key(name, opts, DEBIAN_PACKAGES, files_digest, _CUSTOMIZE)
    cached = opts.cache_dir / key if opts.cache_dir else None
    if cached is not None and (cached / image).is_file():
        log.info("%s: cached build %s", name, cached)
        copy_outputs(cached, opts.output, [image])
        return {image: (opts.output / image).stat().st_size}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"lpmosd-{name}-") as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        for p in files:
            shutil.copyfile(p, stage / p.name)
        root = Path(tmp) / "root"
        root.mkdir()
        base = _base_tarball(opts, name, Path(tmp))
        run(["tar", "-x", "-p", "--numeric-owner", "--xattrs", "-f", base, "-C", root])
        timed(f"{name}: base system", started)
        run(["sh", "-c", _CUSTOMIZE, "customize", root], env={"STAGE": str(stage)})
        out = Path(tmp) / "out" / image
        out.parent.mkdir(parents=True)
        t = time.monotonic()
        _pack(root, out, opts.source_date_epoch)
        timed(f"{name}: tar | zstd", t)
        write_sha256(out)
        if cached is not None:
            tmp_cache = cached.with_name(cached.name + ".part")
            shutil.rmtree(tmp_cache, ignore_errors=True)
            shutil.copytree(Path(tmp) / "out", tmp_cache)
            tmp_cache.replace(cached)
        copy_outputs(Path(tmp) / "out", opts.output, [image])
    timed(f"{name}: build", started)
    return {image: (opts.output / image).stat().st_size}
