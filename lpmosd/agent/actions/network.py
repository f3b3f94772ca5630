"""The installed system's network: the task's ``network_config`` as systemd-networkd config.

``dhcp`` (the default), or a static spec::

    static address=10.0.0.5/24 gateway=10.0.0.1 dns=10.0.0.53,10.0.0.54

Either is bound to the task's MAC (``[Match] MACAddress=``), so the name the NIC gets on
the installed kernel does not matter.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from lpmosd.agent.actions.context import ActionError

__all__ = ["NetworkSpec", "hosts_file", "networkd_file", "parse_network_config"]


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """DHCP (``address`` None) or a static address with optional gateway and DNS."""

    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    dns: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()


def parse_network_config(value: str) -> NetworkSpec:
    """Parse ``network_config``; ActionError names what is wrong."""
    words = value.split()
    if not words or words == ["dhcp"]:
        return NetworkSpec()
    if words[0] != "static":
        raise ActionError(
            f"network_config {value!r}: use 'dhcp' or "
            "'static address=A/PREFIX [gateway=G] [dns=D1,D2]'"
        )
    fields: dict[str, str] = {}
    for word in words[1:]:
        key, sep, val = word.partition("=")
        if not sep or key not in ("address", "gateway", "dns") or key in fields:
            raise ActionError(f"network_config: unexpected {word!r}")
        fields[key] = val
    if "address" not in fields:
        raise ActionError("network_config: static needs address=A/PREFIX")
    try:
        address = ipaddress.ip_interface(fields["address"])
        if "/" not in fields["address"]:
            raise ValueError("the prefix length is missing (address=A/PREFIX)")
        gateway = ipaddress.ip_address(fields["gateway"]) if "gateway" in fields else None
        dns = tuple(ipaddress.ip_address(d) for d in fields.get("dns", "").split(",") if d)
    except ValueError as exc:
        raise ActionError(f"network_config: {exc}") from None
    return NetworkSpec(address=address, gateway=gateway, dns=dns)


def networkd_file(spec: NetworkSpec, mac: str) -> str:
    """``/etc/systemd/network/10-lpmosd.network`` for ``spec`` on the NIC with ``mac``."""
    lines = [
        "# Written by lpmosd at install time.",
        "[Match]",
        f"MACAddress={mac}",
        "",
        "[Network]",
    ]
    if spec.address is None:
        lines.append("DHCP=yes")
    else:
        lines.append(f"Address={spec.address}")
        if spec.gateway is not None:
            lines.append(f"Gateway={spec.gateway}")
        lines += [f"DNS={d}" for d in spec.dns]
    return "\n".join(lines) + "\n"


def hosts_file(hostname: str) -> str:
    """``/etc/hosts`` naming the machine ``hostname``."""
    return (
        "127.0.0.1\tlocalhost\n"
        f"127.0.1.1\t{hostname}\n"
        "::1\t\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n"
    )
