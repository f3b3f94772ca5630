"""Command-line entry point: ``lpmosd run | dev | check-config | agent | token | …``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import trio

from lpmosd import __version__
from lpmosd.agent.cli import register as register_agent
from lpmosd.config import DEFAULT_CONFIG_PATH, Config, load_config
from lpmosd.errors import ConfigError, EtcdError, LpmosdError
from lpmosd.logs import setup_logging

Handler = Callable[[argparse.Namespace], int]


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    return config.with_overrides(
        idc=args.idc,
        api_port=args.api_port,
        control_plane_port=args.control_plane_port,
        etcd_endpoints=args.etcd_endpoints.split(",") if args.etcd_endpoints else None,
        log_level=args.log_level,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from lpmosd.daemon import serve_until_signalled

    config = _load(args)
    setup_logging(config.log_level, config.log_format)
    trio.run(serve_until_signalled, config)
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    roles = ", ".join(sorted(config.roles))
    print(f"{args.config}: OK (roles: {roles}; etcd: {', '.join(config.etcd.endpoints)})")
    return 0


def _cmd_dev(args: argparse.Namespace) -> int:
    from lpmosd.dev import DevOptions, run_dev

    setup_logging(args.log_level or "info", "text")
    opts = DevOptions(
        etcd_endpoints=args.etcd_endpoints.split(",") if args.etcd_endpoints else None,
        control_plane_port=args.control_plane_port or 8080,
        regional_port=args.api_port or 8081,
        demo=not args.no_demo,
        idc=args.idc or "dc1",
    )
    return trio.run(run_dev, opts)


def _add_common(p: argparse.ArgumentParser, *, config: bool = True) -> None:
    if config:
        p.add_argument(
            "--config",
            "-c",
            type=Path,
            default=Path(DEFAULT_CONFIG_PATH),
            help=f"TOML config file (default {DEFAULT_CONFIG_PATH})",
        )
    p.add_argument("--idc", help="override regional.idc")
    p.add_argument("--api-port", type=int, help="override regional.port (the agent API)")
    p.add_argument("--control-plane-port", type=int, help="override control_plane.port")
    p.add_argument("--etcd-endpoints", help="override etcd.endpoints (comma-separated URLs)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


#: Modules whose ``register(subparsers)`` adds the operator commands; they need the server
#: stack (the ``server`` extra), the agent does not.
SERVER_COMMANDS: Final = (
    "lpmosd.migrate",
    "lpmosd.inspect",
    "lpmosd.bench",
    "lpmosd.token_cli",
    "lpmosd.etcd_cli",
    "lpmosd.boot.cli",
    "lpmosd.image.cli",
)


def _ours(exc: ModuleNotFoundError) -> bool:
    """Whether the missing module is lpmosd's own (a bug), not a dependency."""
    return exc.name is None or exc.name.split(".")[0] == "lpmosd"


def build_parser(*, agent_only: bool = False) -> argparse.ArgumentParser:
    """The argument parser of every sub-command (``agent_only``: just ``lpmosd agent``,
    which then imports only the agent's dependencies: trio, httpx, the standard library)."""
    parser = argparse.ArgumentParser(prog="lpmosd", description="Bare-metal OS provisioning.")
    parser.add_argument("--version", action="version", version=f"lpmosd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon with the roles of the config file")
    _add_common(p)
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("config", type=Path, help="the TOML file to check")
    _add_common(p, config=False)
    p.set_defaults(handler=_cmd_check_config)

    p = sub.add_parser(
        "dev", help="all-in-one first look: private etcd, both roles, a demo install"
    )
    _add_common(p, config=False)
    p.add_argument("--no-demo", action="store_true", help="do not run the demo task")
    p.set_defaults(handler=_cmd_dev)

    register_agent(sub)
    if not agent_only:
        for module in SERVER_COMMANDS:
            try:
                importlib.import_module(module).register(sub)
            except ModuleNotFoundError as exc:
                if _ours(exc):
                    raise
                # An agent-only install (the installer image) has no server stack.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the lpmosd command line; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(agent_only=argv[:1] == ["agent"]).parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"lpmosd: config error: {exc}", file=sys.stderr)
        return 2
    except EtcdError as exc:
        print(f"lpmosd: etcd error: {exc}", file=sys.stderr)
        return 1
    except LpmosdError as exc:
        print(f"lpmosd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        if _ours(exc):
            raise
        print(
            f"lpmosd: {args.command} needs the server stack, which this installation lacks "
            f"(no module {exc.name!r}): pip install 'lpmosd[server]'",
            file=sys.stderr,
        )
        return 2
