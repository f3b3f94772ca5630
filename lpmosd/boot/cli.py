"""``lpmosd boot …``: helpers for the PXE host (the regional's boot server)."""

from __future__ import annotations

import argparse
import sys

from lpmosd.boot.dnsmasq import DEBIAN_IPXE_DIR, DnsmasqOptions, interface_subnet, render
from lpmosd.errors import ValidationError


def _cmd_dnsmasq_config(args: argparse.Namespace) -> int:
    try:
        subnet = args.subnet or interface_subnet(args.interface)
        text = render(
            DnsmasqOptions(
                interface=args.interface,
                subnet=subnet,
                regional_url=args.regional_url,
                tftp_root=args.tftp_root,
                snponly=args.snponly,
            )
        )
    except ValidationError as exc:
        print(f"lpmosd boot dnsmasq-config: {exc.field}: {exc.message}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``boot`` and its sub-commands to the main parser."""
    parser = subparsers.add_parser("boot", help="PXE host helpers (dnsmasq drop-in)")
    sub = parser.add_subparsers(dest="boot_command", required=True, metavar="WHAT")
    p = sub.add_parser(
        "dnsmasq-config",
        help="print a proxy-DHCP + TFTP dnsmasq drop-in that chain-loads the regional",
        description="Print a dnsmasq drop-in (for /etc/dnsmasq.d/lpmosd.conf): proxy DHCP "
        "on INTERFACE (the network's DHCP server keeps assigning addresses), Debian's iPXE "
        "over TFTP, and iPXE pointed at the regional's /boot.ipxe.",
    )
    p.add_argument("--interface", required=True, help="the provisioning network interface")
    p.add_argument(
        "--regional-url",
        required=True,
        help="the regional's agent API URL as machines reach it (http://10.0.0.5:8081)",
    )
    p.add_argument(
        "--subnet", help="the interface's IPv4 network address (default: read from the interface)"
    )
    p.add_argument(
        "--tftp-root", default=DEBIAN_IPXE_DIR, help=f"iPXE binaries (default {DEBIAN_IPXE_DIR})"
    )
    p.add_argument(
        "--snponly",
        action="store_true",
        help="UEFI machines load snponly.efi (the firmware's NIC driver) instead of ipxe.efi",
    )
    p.set_defaults(handler=_cmd_dnsmasq_config)
