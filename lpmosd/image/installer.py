"""The installer environment: a bookworm ``vmlinuz`` + ``initrd`` that runs the agent.

The initrd is the whole system (no root filesystem to mount): Debian's kernel, python3, the
disk tools the debian-12 plan runs, busybox for DHCP, the agent and its pure-Python
dependencies (copied from the environment lpmosd runs in, so the versions are the pinned
ones), and ``/init`` (``files/installer-init``). Kernel modules are pruned to what installs
a server (storage, Ethernet, filesystems), docs and locales are left out, and every file
time is ``SOURCE_DATE_EPOCH``, so the same packages give the same bytes.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

import lpmosd
from lpmosd.image.common import (
    BuildOptions,
    cache_key,
    copy_outputs,
    mmdebstrap,
    run,
    timed,
    write_sha256,
)

__all__ = ["INSTALLER_PACKAGES", "build_installer"]

log = logging.getLogger("lpmosd.image")

INSTALLER_PACKAGES: Final = (
    "linux-image-amd64",
    "python3",
    "busybox",
    "kmod",
    "iproute2",
    "fdisk",
    "e2fsprogs",
    "dosfstools",
    "zstd",
    "ca-certificates",
)
#: The agent's dependencies: pure Python, copied from this environment with their metadata.
AGENT_DISTRIBUTIONS: Final = (
    "trio",
    "outcome",
    "sniffio",
    "sortedcontainers",
    "attrs",
    "idna",
    "httpx",
    "httpcore",
    "h11",
    "anyio",
    "certifi",
)
#: Kernel module trees kept (relative to lib/modules/<version>/kernel); the rest goes.
KEPT_MODULES: Final = (
    "arch",
    "block",
    "crypto",
    "lib",
    "virt",
    "fs/ext4",
    "fs/jbd2",
    "fs/mbcache.ko",
    "fs/fat",
    "fs/nls",
    "fs/efivarfs",
    "drivers/ata",
    "drivers/block",
    "drivers/cdrom",
    "drivers/scsi",
    "drivers/nvme",
    "drivers/md",
    "drivers/message",
    "drivers/virtio",
    "drivers/net/ethernet",
    "drivers/net/phy",
    "drivers/net/mdio",
    "drivers/net/mii.ko",
    "drivers/net/virtio_net.ko",
    "drivers/net/net_failover.ko",
    "drivers/pci",
    "drivers/mmc",
    "drivers/usb/storage",
    "drivers/usb/host",
    "drivers/usb/common",
    "drivers/usb/core",
    "drivers/dca",
    "drivers/ptp",
    "drivers/pps",
    "drivers/firmware",
    "net/core",
    "net/packet",
    "net/ipv6",
)
#: Unused parts of the Debian system inside the initrd.
PRUNED_PATHS: Final = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/cache/debconf",
    "var/log",
    "usr/share/common-licenses",
    "usr/share/zoneinfo",
    "usr/share/i18n",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/unittest/test",
    "usr/lib/x86_64-linux-gnu/perl-base",
    "usr/share/perl5",
)
_FILES: Final = Path(__file__).parent / "files"


def _prune_modules(root: Path) -> None:
    for modules in sorted((root / "usr/lib/modules").iterdir()):
        kernel = modules / "kernel"
        keep = {kernel / rel for rel in KEPT_MODULES}
        for path in sorted(kernel.rglob("*"), reverse=True):
            if any(path == k or k in path.parents for k in keep):
                continue
            if any(path in k.parents for k in keep):
                continue  # a directory on the way to something kept
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        run(["chroot", root, "depmod", modules.name])


def _install_agent(root: Path) -> None:
    dest = root / "usr/local/lib/lpmosd/python"
    dest.mkdir(parents=True, exist_ok=True)
    src = Path(lpmosd.__file__).parent
    shutil.copytree(
        src,
        dest / "lpmosd",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_pb", "bench", "static"),
    )
    for name in AGENT_DISTRIBUTIONS:
        dist = importlib.metadata.distribution(name)
        for f in dist.files or ():
            if f.parts[0] == ".." or "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            target = dest / f
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f.locate(), target)
    bin_dir = root / "usr/local/bin"
    lib_dir = root / "usr/local/lib/lpmosd"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_FILES / "lpmosd-agent", bin_dir / "lpmosd-agent")
    shutil.copyfile(_FILES / "udhcpc.script", lib_dir / "udhcpc.script")
    shutil.copyfile(_FILES / "installer-init", root / "init")
    for p in (bin_dir / "lpmosd-agent", lib_dir / "udhcpc.script", root / "init"):
        p.chmod(0o755)


def _prune(root: Path) -> None:
    for rel in PRUNED_PATHS:
        path = root / rel
        if path.is_dir():
            shutil.rmtree(path)
    for sub in ("boot",):
        for p in (root / sub).iterdir():
            if not p.name.startswith("vmlinuz"):
                p.unlink()
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("lpmosd-installer\n")
    (root / "etc/lpmosd").mkdir(exist_ok=True)


def _pack(root: Path, out: Path, epoch: int) -> None:
    """``find | sort | cpio -H newc | zstd`` with every time set to ``epoch``."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))
    names = subprocess.run(
        ["find", ".", "-mindepth", "1"], cwd=root, check=True, capture_output=True
    ).stdout.split(b"\n")
    listing = b"\n".join(sorted(n for n in names if n)) + b"\n"
    with out.open("wb") as f:
        cpio = subprocess.Popen(
            ["cpio", "--quiet", "-o", "-H", "newc", "--reproducible", "-R", "0:0"],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        zstd = subprocess.Popen(["zstd", "-q", "-12", "-T0", "-c"], stdin=cpio.stdout, stdout=f)
        assert cpio.stdin is not None and cpio.stdout is not None
        cpio.stdout.close()
        cpio.stdin.write(listing)
        cpio.stdin.close()
        if cpio.wait() or zstd.wait():
            raise RuntimeError("cpio | zstd failed")
    # UEFI: the kernel's EFI stub loads the initrds back to back (iPXE's BIOS loader aligns
    # them), and the kernel takes the credential cpio that follows this one only at a 4-byte
    # boundary; the zero bytes between archives are skipped.
    with out.open("ab") as f:
        f.write(b"\0" * (-out.stat().st_size % 4))


def _base_tarball(opts: BuildOptions, tmp: Path) -> Path:
    """The bootstrapped Debian system (mmdebstrap's tarball), cached by package list: the
    agent's code changes far more often than the packages."""
    key = cache_key("installer-base", opts, INSTALLER_PACKAGES)
    if opts.cache_dir is not None:
        cached = opts.cache_dir / f"{key}.tar"
        if cached.is_file():
            log.info("installer: cached base system %s", cached)
            return cached
    out = tmp / "base.tar"
    mmdebstrap(opts, INSTALLER_PACKAGES, out)
    if opts.cache_dir is not None:
        opts.cache_dir.mkdir(parents=True, exist_ok=True)
        part = opts.cache_dir / f"{key}.tar.part"
        shutil.copyfile(out, part)
        part.replace(opts.cache_dir / f"{key}.tar")
    return out


def build_installer(opts: BuildOptions) -> dict[str, int]:
    """Build ``installer/vmlinuz`` and ``installer/initrd`` under ``opts.output``.

    Returns the size of each file. With ``opts.cache_dir`` a build with the same inputs is
    copied from the cache instead.
    """
    names = ["installer/vmlinuz", "installer/initrd"]
    versions = [f"{d}=={importlib.metadata.version(d)}" for d in AGENT_DISTRIBUTIONS]
    agent_src = sorted(
        (str(p.relative_to(Path(lpmosd.__file__).parent)), p.read_bytes())
        for p in Path(lpmosd.__file__).parent.rglob("*.py")
    )
    import hashlib

    agent_digest = hashlib.sha256(repr(agent_src).encode()).hexdigest()
    files_digest = hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted(_FILES.iterdir()))
    ).hexdigest()
    key = cache_key(
        "installer",
        opts,
        INSTALLER_PACKAGES,
        *versions,
        agent_digest,
        files_digest,
        *KEPT_MODULES,
        *PRUNED_PATHS,
    )
    cached = opts.cache_dir / key if opts.cache_dir else None
    if cached is not None and all((cached / n).is_file() for n in names):
        log.info("installer: cached build %s", cached)
        copy_outputs(cached, opts.output, names)
        return {n: (opts.output / n).stat().st_size for n in names}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lpmosd-installer-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        base = _base_tarball(opts, Path(tmp))
        run(["tar", "-x", "-p", "--numeric-owner", "-f", base, "-C", root])
        timed("installer: base system", started)
        _prune_modules(root)
        _prune(root)
        _install_agent(root)
        out = Path(tmp) / "out" / "installer"
        out.mkdir(parents=True)
        kernel = sorted((root / "boot").glob("vmlinuz-*"))[-1]
        shutil.copyfile(kernel, out / "vmlinuz")
        (root / "boot" / kernel.name).unlink()
        t = time.monotonic()
        _pack(root, out / "initrd", opts.source_date_epoch)
        timed("installer: cpio | zstd", t)
        for n in names:
            write_sha256(Path(tmp) / "out" / n)
        if cached is not None:
            tmp_cache = cached.with_name(cached.name + ".part")
            shutil.rmtree(tmp_cache, ignore_errors=True)
            shutil.copytree(Path(tmp) / "out", tmp_cache)
            tmp_cache.replace(cached)
        copy_outputs(Path(tmp) / "out", opts.output, names)
    timed("installer: build", started)
    return {n: (opts.output / n).stat().st_size for n in names}
