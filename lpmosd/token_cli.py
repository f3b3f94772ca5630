"""``lpmosd token create | list | revoke``: operator API tokens, straight in etcd.

The commands talk to etcd with the config file's ``[etcd]`` settings (or
``--etcd-endpoints``), like ``lpmosd inspect``: run them on a host that holds the control
plane's etcd credentials. ``create`` prints the token once, on stdout alone (so
``lpmosd token create … > file`` captures just the token); everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from lpmosd.errors import ValidationError
from lpmosd.opsutil import add_etcd_arguments, etcd_config_from_args, open_etcd_client, run_trio
from lpmosd.timestamps import utcnow
from lpmosd.tokens import Role, TokenStore, parse_duration, validate_token_name

__all__ = ["register"]


def _name_arg(value: str) -> str:
    try:
        return validate_token_name(value)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _role_arg(value: str) -> Role:
    try:
        return Role.parse(value)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _duration_arg(value: str) -> Any:
    if value == "never":
        return None
    try:
        return parse_duration(value)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}"


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``token`` and its sub-commands to the main parser; returns its parser."""
    parser = subparsers.add_parser(
        "token",
        help="create, list and revoke operator API tokens",
        description="Operator API tokens (roles viewer, operator, admin), stored hashed in "
        "etcd under /lpmosd/tokens/. The control plane picks changes up at once.",
    )
    sub = parser.add_subparsers(dest="token_command", required=True, metavar="ACTION")

    p = sub.add_parser("create", help="create a token and print it (once)")
    p.add_argument("--name", required=True, type=_name_arg, help="who uses it (e.g. alice)")
    p.add_argument("--role", required=True, type=_role_arg, help="viewer, operator or admin")
    p.add_argument(
        "--expires",
        type=_duration_arg,
        default=None,
        metavar="DURATION",
        help="lifetime such as 90m, 12h, 30d, 2w (default: never)",
    )
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_create)

    p = sub.add_parser("list", help="list tokens (never the tokens themselves)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_list)

    p = sub.add_parser("revoke", help="revoke a token (it stops working at once)")
    p.add_argument("name", type=_name_arg)
    add_etcd_arguments(p)
    p.set_defaults(handler=_cmd_revoke)
    return parser


def _cmd_create(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)

    async def main() -> int:
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            record, token = await TokenStore(client).create(
                args.name, args.role, actor=_actor(), expires_in=args.expires
            )
        expires = record.public_dict(utcnow())["expires_at"] or "never"
        print(
            f"token {record.name} ({record.role.label}, expires {expires}) created; it is "
            "shown only now:",
            file=sys.stderr,
        )
        print(token, flush=True)
        return 0

    return run_trio(main)


def _cmd_list(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)

    async def main() -> int:
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            records = await TokenStore(client).list()
        now = utcnow()
        rows = [r.public_dict(now) for r in records]
        if args.json:
            print(json.dumps({"tokens": rows, "count": len(rows)}, indent=2))
            return 0
        if not rows:
            print("no tokens (create one with: lpmosd token create --name NAME --role ROLE)")
            return 0
        header = ("NAME", "ROLE", "STATE", "CREATED", "EXPIRES", "CREATED BY")
        table = [header] + [
            (
                r["name"],
                r["role"],
                r["state"],
                r["created_at"],
                r["expires_at"] or "never",
                r["created_by"],
            )
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        return 0

    return run_trio(main)


def _cmd_revoke(args: argparse.Namespace) -> int:
    cfg = etcd_config_from_args(args)

    async def main() -> int:
        async with open_etcd_client(cfg, timeout=args.timeout) as client:
            record = await TokenStore(client).revoke(args.name, actor=_actor())
        print(f"token {record.name} revoked", file=sys.stderr)
        return 0

    return run_trio(main)
