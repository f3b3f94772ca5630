"""Hardware facts of the machine being installed, read from /proc and /sys.

Everything is read under a ``sysroot`` (``/`` in production, a fake tree in tests) and every
read is best-effort: a file that is missing, unreadable (DMI serials are often root-only) or
malformed yields ``None``/a default instead of an error, because a half-known machine must
still be able to register and install.

The result, :class:`HardwareFacts`, serialises to the ``hardware`` object of the agent's
register call (see ``lpmosd/web/openapi/agent.yaml``); its parts are the
:class:`~lpmosd.documents.Disk`, :class:`~lpmosd.documents.Nic` and :class:`~lpmosd.documents.Dmi`
documents the regional stores in the meta key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

# The limits the regional enforces on what we report.
from lpmosd.documents import MAX_META_ITEMS, MAX_META_STR, MAX_SPEED_MBPS, Disk, Dmi, Nic
from lpmosd.errors import ValidationError
from lpmosd.fields import CONTROL_RE
from lpmosd.schema import normalize_mac

__all__ = ["HardwareFacts", "collect_facts"]

log = logging.getLogger("lpmosd.agent")

#: Block devices that are not installation targets: loop files, RAM disks, compressed swap,
#: device-mapper volumes (built on top of real disks), network block devices, floppies.
_SKIP_DISK_PREFIXES: Final = ("loop", "ram", "zram", "dm-", "nbd", "fd")
_SECTOR: Final = 512  # /sys/block/*/size is always in 512-byte units, whatever the LBA size
#: cpuinfo keys naming the CPU, by architecture (x86, arm64 with a model string, POWER, MIPS).
_CPU_MODEL_KEYS: Final = ("model name", "Processor", "cpu model", "cpu", "Hardware")
_ARPHRD_ETHER: Final = 1  # /sys/class/net/*/type of Ethernet-like interfaces


@dataclass(frozen=True, slots=True, kw_only=True)
class HardwareFacts:
    """What the agent reports about its machine.

    ``cpu_cores`` counts logical CPUs (what the installed OS will schedule on).
    ``default_mac`` is the MAC of the first physical NIC (one with a bus device), or of the
    first NIC at all when there is no physical one; ``None`` when there is no NIC.
    """

    cpu_model: str
    cpu_cores: int
    memory_bytes: int
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    dmi: Dmi = field(default_factory=Dmi)
    default_mac: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``hardware`` object of the register request."""
        return {
            "cpu_model": self.cpu_model,
            "cpu_cores": self.cpu_cores,
            "memory_bytes": self.memory_bytes,
            "disks": [d.to_dict() for d in self.disks],
            "nics": [n.to_dict() for n in self.nics],
            "dmi": self.dmi.to_dict(),
        }


def _clean(text: str) -> str:
    """Strip whitespace and control characters and cap the length, as the regional requires."""
    return CONTROL_RE.sub("", text).strip()[:MAX_META_STR]


def _read(path: Path) -> str | None:
    """The stripped text of ``path``, or None if it cannot be read.

    OSError covers missing files, EACCES on root-only DMI files and EINVAL, which sysfs
    returns for ``speed`` on a NIC without link.
    """
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _cpu(root: Path) -> tuple[str, int]:
    text = _read(root / "proc/cpuinfo") or ""
    processors = 0
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "processor":
            processors += 1
        elif key in _CPU_MODEL_KEYS and key not in found and value.strip():
            found[key] = value.strip()
    model = next((found[k] for k in _CPU_MODEL_KEYS if k in found), "")
    if processors == 0:
        processors = _count_online_cpus(_read(root / "sys/devices/system/cpu/online"))
    return _clean(model), processors


def _count_online_cpus(spec: str | None) -> int:
    """Count CPUs in a sysfs cpu list such as ``0-3,8,10-11``; 0 when unknown."""
    if not spec:
        return 0
    total = 0
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            total += (int(hi) - int(lo) + 1) if hi else 1
    except ValueError:
        return 0
    return max(total, 0)


def _memory(root: Path) -> int:
    text = _read(root / "proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            try:
                kib = int(parts[1])
            except (IndexError, ValueError):
                return 0
            # The kernel says "kB" but means KiB.
            return kib * 1024
    return 0


def _disks(root: Path) -> tuple[Disk, ...]:
    block = root / "sys/block"
    try:
        names = sorted(p.name for p in block.iterdir())
    except OSError:
        return ()
    disks: list[Disk] = []
    for name in names:
        if name.startswith(_SKIP_DISK_PREFIXES):
            continue
        dev = block / name
        sectors = _read_int(dev / "size")
        if not sectors or sectors < 0:
            # Size 0: an empty card reader or CD drive; nothing to install onto.
            continue
        model = _read(dev / "device/model") or ""
        rotational = _read(dev / "queue/rotational") == "1"
        disks.append(
            Disk(
                name=_clean(name),
                size_bytes=sectors * _SECTOR,
                model=_clean(model),
                rotational=rotational,
            )
        )
    return tuple(disks[:MAX_META_ITEMS])


def _nics(root: Path) -> tuple[tuple[Nic, ...], str | None]:
    net = root / "sys/class/net"
    try:
        names = sorted(p.name for p in net.iterdir())
    except OSError:
        return (), None
    nics: list[Nic] = []
    physical_mac: str | None = None
    for name in names:
        if name == "lo":
            continue
        dev = net / name
        kind = _read_int(dev / "type")
        if kind is not None and kind != _ARPHRD_ETHER:
            continue  # InfiniBand, tunnels, ...: no 48-bit MAC to match a task against
        raw_mac = _read(dev / "address")
        try:
            mac = normalize_mac(raw_mac)
        except ValidationError:
            log.debug("skipping NIC without a MAC", extra={"nic": name, "address": raw_mac})
            continue
        if mac == "00:00:00:00:00:00":
            continue
        speed = _read_int(dev / "speed")
        # -1 (and 2**32-1 from some drivers) mean "unknown"; no link reads as EINVAL.
        if speed is not None and not 0 < speed <= MAX_SPEED_MBPS:
            speed = None
        nics.append(Nic(name=_clean(name), mac=mac, speed_mbps=speed))
        if physical_mac is None and (dev / "device").exists():
            physical_mac = mac
    nics = nics[:MAX_META_ITEMS]
    default = physical_mac if physical_mac is not None else (nics[0].mac if nics else None)
    return tuple(nics), default


def _dmi(root: Path) -> Dmi:
    base = root / "sys/class/dmi/id"

    def part(name: str) -> str | None:
        text = _read(base / name)
        if text is None:
            return None
        return _clean(text) or None

    return Dmi(
        vendor=part("sys_vendor"), product=part("product_name"), serial=part("product_serial")
    )


def collect_facts(sysroot: Path | str = "/") -> HardwareFacts:
    """Read the machine's hardware facts under ``sysroot`` (blocking file I/O).

    Never raises for missing or unreadable files; see the module docstring.
    """
    root = Path(sysroot)
    cpu_model, cpu_cores = _cpu(root)
    nics, default_mac = _nics(root)
    facts = HardwareFacts(
        cpu_model=cpu_model,
        cpu_cores=cpu_cores,
        memory_bytes=_memory(root),
        disks=_disks(root),
        nics=nics,
        dmi=_dmi(root),
        default_mac=default_mac,
    )
    log.info(
        "hardware facts collected",
        extra={
            "cpu_model": facts.cpu_model,
            "cpu_cores": facts.cpu_cores,
            "memory_bytes": facts.memory_bytes,
            "disks": len(facts.disks),
            "nics": len(facts.nics),
            "default_mac": facts.default_mac,
        },
    )
    return facts
