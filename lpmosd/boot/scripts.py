"""iPXE scripts: the static entry script and the per-MAC decision scripts.

Every value that goes into a script is validated first (:func:`check_base_url`, serial
numbers and MACs by :mod:`lpmosd.schema`), so no request can smuggle iPXE syntax (``${…}``,
``||``, spaces, newlines) into a script. Scripts never carry a secret: the enrolment
secret travels in the credential initrd.

The scripts use only commands of Debian's 2019 iPXE build (``dhcp``, ``chain``, ``kernel``,
``initrd``, ``boot``, ``imgfree``, ``sleep``, ``echo``, ``exit``, ``goto``, ``isset``) and
were run in that firmware under QEMU (tests/boot/test_qemu_boot.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from lpmosd.errors import ValidationError
from lpmosd.schema import NAME_RE, normalize_mac

#: Seconds between attempts when a download or DHCP fails.
RETRY_SECONDS: Final = 5
#: The kernel's serial console (plus the screen), as the contract fixes it.
CONSOLE_ARGS: Final = "console=tty0 console=ttyS0,115200n8"

# scheme://host[:port][/path]: host names, IPv4 and bracketed IPv6; no user info, no query.
_BASE_URL_RE: Final = re.compile(
    r"https?://(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])"
    r"(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~/-]*)?",
    re.ASCII,
)


def check_base_url(url: str) -> str:
    """``url`` without a trailing slash if it is a plain http(s) base URL, else ValidationError."""
    if _BASE_URL_RE.fullmatch(url) is None:
        raise ValidationError(
            f"boot base URL must be http(s)://host[:port][/path] (got {url[:80]!r})",
            field="url",
        )
    return url.rstrip("/")


def mac_hyphens(mac: str) -> str:
    """``52:54:00:12:34:56`` -> ``52-54-00-12-34-56`` (the form iPXE's ``:hexhyp`` gives)."""
    return normalize_mac(mac).replace(":", "-")


def entry_script(base_url: str) -> str:
    """``/boot.ipxe``: get an address (every NIC, until one answers), then ask for this
    machine's script by MAC, passing what the firmware knows about the machine."""
    base = check_base_url(base_url)
    query = "&".join(
        f"{name}=${{{name}:uristring}}" for name in ("uuid", "serial", "platform", "buildarch")
    )
    return f"""#!ipxe
# lpmosd entry script: ask the regional how this machine boots.
:start
isset ${{netX/ip}} || dhcp || goto no_address
chain --autofree {base}/boot/${{netX/mac:hexhyp}}.ipxe?{query} || goto unreachable
exit 0

:no_address
echo lpmosd: no DHCP answer on any network interface; trying again in {RETRY_SECONDS} s
sleep {RETRY_SECONDS}
goto start

:unreachable
echo lpmosd: the boot server did not answer; trying again in {RETRY_SECONDS} s
sleep {RETRY_SECONDS}
goto start
"""


@dataclass(frozen=True, slots=True)
class InstallBoot:
    """What an install boot loads: the installer kernel and initrd, the credential initrd."""

    base_url: str
    sn: str
    mac: str
    task_id: str
    kernel_path: str = "installer/vmlinuz"
    initrd_path: str = "installer/initrd"


def install_script(boot: InstallBoot) -> str:
    """The per-MAC script of a live task with netboot on: load the installer with its
    credential initrd and boot it; on any download error free what was loaded, wait and
    ask again (the decision is re-made, so a task cancelled meanwhile boots the disk)."""
    base = check_base_url(boot.base_url)
    if NAME_RE.fullmatch(boot.sn) is None:
        raise ValidationError("invalid serial number", field="sn")
    if NAME_RE.fullmatch(boot.task_id) is None:
        raise ValidationError("invalid task id", field="task_id")
    mac = normalize_mac(boot.mac)
    hyph = mac.replace(":", "-")
    args = " ".join(
        (
            "initrd=initrd",
            "initrd=credentials.cpio",
            f"lpmosd.regional={base}",
            f"lpmosd.sn={boot.sn}",
            f"lpmosd.mac={mac}",
            CONSOLE_ARGS,
        )
    )
    return f"""#!ipxe
# lpmosd: install task {boot.task_id} of {boot.sn} ({mac})
:load
echo lpmosd: loading the installer for {boot.sn}
kernel --name vmlinuz {base}/boot/files/{boot.kernel_path} {args} || goto failed
initrd --name initrd {base}/boot/files/{boot.initrd_path} || goto failed
initrd --name credentials.cpio {base}/boot/{hyph}/credentials.cpio || goto failed
boot || goto failed

:failed
echo lpmosd: loading the installer failed; asking the boot server again in {RETRY_SECONDS} s
imgfree vmlinuz ||
imgfree initrd ||
imgfree credentials.cpio ||
sleep {RETRY_SECONDS}
chain --autofree {base}/boot/{hyph}.ipxe || goto failed
"""


def local_script(reason: str) -> str:
    """The per-MAC script for every other case: leave iPXE so the firmware boots the next
    device (the local disk). ``reason`` is one of :mod:`.decision`'s fixed reasons."""
    if re.fullmatch(r"[a-z0-9 ,()-]{1,80}", reason) is None:
        raise ValidationError("invalid boot reason", field="reason")
    return f"""#!ipxe
# lpmosd: {reason}; boot from the next boot device
echo lpmosd: {reason}; booting from the next boot device
exit 0
"""
