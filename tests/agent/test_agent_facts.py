"""Hardware facts from a fake /proc + /sys tree, and a smoke run on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lpmosd.agent.facts import HardwareFacts, collect_facts
from lpmosd.documents import Disk, Dmi, MachineMeta, Nic
from lpmosd.timestamps import utcnow

CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6330 CPU @ 2.00GHz
core id\t\t: 0

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6330 CPU @ 2.00GHz
core id\t\t: 1
"""

MEMINFO = """\
MemTotal:       263842716 kB
MemFree:        250000000 kB
"""


def _write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _disk(
    root: Path, name: str, sectors: int, model: str | None = None, rotational: str = "0"
) -> None:
    _write(root, f"sys/block/{name}/size", f"{sectors}\n")
    _write(root, f"sys/block/{name}/queue/rotational", f"{rotational}\n")
    if model is not None:
        _write(root, f"sys/block/{name}/device/model", model)


def _nic(
    root: Path,
    name: str,
    mac: str,
    speed: str | None = None,
    physical: bool = True,
    kind: str = "1",
) -> None:
    _write(root, f"sys/class/net/{name}/address", mac + "\n")
    _write(root, f"sys/class/net/{name}/type", kind + "\n")
    if speed is not None:
        _write(root, f"sys/class/net/{name}/speed", speed + "\n")
    if physical:
        (root / f"sys/class/net/{name}/device").mkdir(parents=True)


@pytest.fixture
def sysroot(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    _write(root, "proc/cpuinfo", CPUINFO)
    _write(root, "proc/meminfo", MEMINFO)
    _disk(root, "sda", 3907029168, "ST2000NM0055-1V4 \n", rotational="1")
    _disk(root, "nvme0n1", 1875385008, "SAMSUNG MZQL2960HCJR-00A07          ")
    _disk(root, "vda", 1048576)  # virtio: no model file
    _disk(root, "sr0", 0, "DVD-ROM")  # empty drive: skipped
    for skipped in ("loop0", "ram0", "zram0", "dm-0", "nbd0"):
        _disk(root, skipped, 2048)
    _write(root, "sys/block/loop0/size", "2048\n")
    _nic(root, "lo", "00:00:00:00:00:00", physical=False, kind="772")
    _nic(root, "eno1", "00:1A:2B:3C:4D:5E", speed="25000")
    _nic(root, "eno2", "00:1a:2b:3c:4d:5f", speed="-1")  # no link
    _nic(root, "bond0", "00:1a:2b:3c:4d:60", physical=False)  # virtual, speed unreadable
    _nic(root, "ib0", "80:00:02:08:fe:80:00:00:00:00:00:00", kind="32")  # InfiniBand
    _write(root, "sys/class/dmi/id/sys_vendor", "Dell Inc.\n")
    _write(root, "sys/class/dmi/id/product_name", "PowerEdge R750\n")
    return root


def test_fake_tree(sysroot: Path) -> None:
    facts = collect_facts(sysroot)
    assert facts.cpu_model == "Intel(R) Xeon(R) Gold 6330 CPU @ 2.00GHz"
    assert facts.cpu_cores == 2
    assert facts.memory_bytes == 263842716 * 1024
    assert facts.disks == (
        Disk(name="nvme0n1", size_bytes=1875385008 * 512,
             model="SAMSUNG MZQL2960HCJR-00A07", rotational=False),
        Disk(name="sda", size_bytes=3907029168 * 512, model="ST2000NM0055-1V4", rotational=True),
        Disk(name="vda", size_bytes=1048576 * 512, model="", rotational=False),
    )  # fmt: skip
    assert facts.nics == (
        Nic(name="bond0", mac="00:1a:2b:3c:4d:60", speed_mbps=None),
        Nic(name="eno1", mac="00:1a:2b:3c:4d:5e", speed_mbps=25000),
        Nic(name="eno2", mac="00:1a:2b:3c:4d:5f", speed_mbps=None),
    )
    # bond0 sorts first but is virtual: the default MAC is the first physical NIC's.
    assert facts.default_mac == "00:1a:2b:3c:4d:5e"
    assert facts.dmi == Dmi(vendor="Dell Inc.", product="PowerEdge R750", serial=None)


def test_facts_pass_the_regional_validation(sysroot: Path) -> None:
    """What the agent sends is what the regional's MachineMeta parser accepts."""
    facts = collect_facts(sysroot)
    meta = MachineMeta.from_report(facts.to_dict(), now=utcnow())
    assert meta.disks == facts.disks
    assert meta.nics == facts.nics
    assert meta.dmi == facts.dmi


def test_unreadable_dmi_serial_is_none(sysroot: Path) -> None:
    # product_serial is root-only on real machines. chmod 0 does not stop root (tests may
    # run as root), so make the read fail with another OSError: a directory in its place.
    (sysroot / "sys/class/dmi/id/product_serial").mkdir()
    assert collect_facts(sysroot).dmi.serial is None
    if os.geteuid() != 0:
        (sysroot / "sys/class/dmi/id/product_serial").rmdir()
        _write(sysroot, "sys/class/dmi/id/product_serial", "ABC123\n").chmod(0)
        assert collect_facts(sysroot).dmi.serial is None


def test_dmi_serial_when_readable(sysroot: Path) -> None:
    _write(sysroot, "sys/class/dmi/id/product_serial", "  ABC123 \n")
    assert collect_facts(sysroot).dmi.serial == "ABC123"


def test_empty_tree(tmp_path: Path) -> None:
    facts = collect_facts(tmp_path)
    assert facts == HardwareFacts(cpu_model="", cpu_cores=0, memory_bytes=0)
    assert facts.default_mac is None
    MachineMeta.from_report(facts.to_dict(), now=utcnow())


def test_arm_cpuinfo_and_online_fallback(tmp_path: Path) -> None:
    _write(tmp_path, "proc/cpuinfo", "Processor\t: AArch64 Processor rev 4 (aarch64)\n")
    _write(tmp_path, "sys/devices/system/cpu/online", "0-3,8,10-11\n")
    facts = collect_facts(tmp_path)
    assert facts.cpu_model == "AArch64 Processor rev 4 (aarch64)"
    assert facts.cpu_cores == 7


def test_only_virtual_nics_default_to_the_first(tmp_path: Path) -> None:
    _nic(tmp_path, "veth1", "02:00:00:00:00:02", physical=False)
    _nic(tmp_path, "br0", "02:00:00:00:00:01", physical=False)
    assert collect_facts(tmp_path).default_mac == "02:00:00:00:00:01"


def test_control_characters_and_long_strings_are_cleaned(tmp_path: Path) -> None:
    _write(tmp_path, "proc/cpuinfo", "model name\t: Evil\x1b[31mCPU" + "x" * 400 + "\n")
    _disk(tmp_path, "sda", 8, model="Bad\x00Model\n")
    facts = collect_facts(tmp_path)
    assert "\x1b" not in facts.cpu_model and len(facts.cpu_model) == 256
    assert facts.disks[0].model == "BadModel"
    MachineMeta.from_report(facts.to_dict(), now=utcnow())


def test_this_machine() -> None:
    """Smoke test on the real /proc and /sys: plausible values that the regional accepts."""
    facts = collect_facts("/")
    assert facts.cpu_cores >= 1
    assert facts.memory_bytes > 64 * 1024 * 1024
    assert all(d.size_bytes > 0 for d in facts.disks)
    assert not any(d.name.startswith(("loop", "ram", "zram", "dm-")) for d in facts.disks)
    assert all(n.name != "lo" for n in facts.nics)
    MachineMeta.from_report(facts.to_dict(), now=utcnow())
