"""``lpmosd etcd status | compact | defrag | disarm``: etcd maintenance for operators.

The control plane compacts etcd's history by itself (``compaction_interval``); a compaction
frees pages inside etcd's database file but does not shrink it. ``defrag`` returns them to
the filesystem, one member at a time (a member being defragmented blocks its clients, so
the others keep serving). After a NOSPACE alarm the recovery is: ``compact``, ``defrag``,
``disarm`` (see the README); lpmosd resumes writing by itself once the alarm is gone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable

from lpmosd.config import EtcdConfig, with_etcd_endpoints
from lpmosd.etcd import EtcdClient, MemberStatus
from lpmosd.opsutil import add_etcd_arguments, etcd_config_from_args, open_etcd_client, run_trio

__all__ = ["defragment_members", "register"]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _line(st: MemberStatus) -> str:
    errors = f"  errors: {'; '.join(st.errors)}" if st.errors else ""
    return (
        f"{st.endpoint}: db {_mib(st.db_size)}, in use {_mib(st.db_size_in_use)}, "
        f"revision {st.revision}{errors}"
    )


async def _member_urls(client: EtcdClient) -> list[str]:
    urls = []
    for _id, _name, client_urls in await client.member_list():
        if client_urls:
            urls.append(client_urls[0])
    return urls


async def _on_each_member(
    cfg: EtcdConfig, timeout: float, fn: Callable[[EtcdClient], Awaitable[None]]
) -> None:
    async with open_etcd_client(cfg, timeout=timeout) as client:
        urls = await _member_urls(client)
    for url in urls:
        async with open_etcd_client(with_etcd_endpoints(cfg, (url,)), timeout=timeout) as member:
            await fn(member)


async def defragment_members(cfg: EtcdConfig, *, timeout: float, defrag_timeout: float) -> int:
    """Defragment every member, one after another; prints each one's size before and after."""

    async def one(member: EtcdClient) -> None:
        before = await member.status()
        print(f"defragmenting {_line(before)}", file=sys.stderr, flush=True)
        await member.defragment(timeout=defrag_timeout)
        print(f"  done: {_line(await member.status())}", file=sys.stderr, flush=True)

    await _on_each_member(cfg, timeout, one)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)

    async def main() -> int:
        async def one(member: EtcdClient) -> None:
            print(_line(await member.status()))

        await _on_each_member(cfg, args.timeout, one)
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            for member_id, alarm in await client.alarms():
                print(f"alarm {alarm} on member {member_id:x}")
        return 0

    return run_trio(main)


def _cmd_compact(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)

    async def main() -> int:
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            revision = (await client.status()).revision
            await client.compact(revision, physical=True)
        print(f"compacted history up to revision {revision}", file=sys.stderr)
        return 0

    return run_trio(main)


def _cmd_defrag(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)
    return run_trio(
        lambda: defragment_members(cfg, timeout=args.timeout, defrag_timeout=args.defrag_timeout)
    )


def _cmd_disarm(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)

    async def main() -> int:
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            alarms = await client.alarms()
            for member_id, alarm in alarms:
                await client.disarm(member_id, alarm)
                print(f"disarmed {alarm} on member {member_id:x}", file=sys.stderr)
            if not alarms:
                print("no alarms", file=sys.stderr)
        return 0

    return run_trio(main)


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``etcd`` and its sub-commands to the main parser; returns its parser."""
    parser = subparsers.add_parser(
        "etcd",
        help="etcd maintenance: status, compact, defrag, disarm",
        description="etcd maintenance. Recovery from a NOSPACE alarm: compact, defrag, disarm.",
    )
    sub = parser.add_subparsers(dest="etcd_command", required=True, metavar="ACTION")

    p = sub.add_parser("status", help="each member's database size and revision; alarms")
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_status)

    p = sub.add_parser("compact", help="compact the history up to the current revision")
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_compact)

    p = sub.add_parser("defrag", help="defragment every member, one at a time")
    p.add_argument(
        "--defrag-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long one member's defragmentation may take (default 300)",
    )
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_defrag)

    p = sub.add_parser("disarm", help="disarm the cluster's alarms (after fixing their cause)")
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_disarm)
    return parser
