"""``lpmosd agent``: the command line of the agent.

:func:`register` adds the sub-command to the main parser's subparsers and sets
``handler`` (``handler(args) -> int``), which runs :func:`~lpmosd.agent.main.run_agent`
under ``trio.run``. SIGTERM and SIGINT cancel the agent, which kills the running step's
process group before exiting (128 + signal number).
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import trio

from lpmosd.agent.client import RetryPolicy
from lpmosd.agent.main import EXIT_ERROR, AgentOptions, run_agent
from lpmosd.errors import ValidationError
from lpmosd.logs import setup_logging
from lpmosd.schema import normalize_mac, validate_sn

__all__ = ["handle", "register"]

log = logging.getLogger("lpmosd.agent")

_MAX_SECRET_BYTES: Final = 4096


def _sn(value: str) -> str:
    try:
        return validate_sn(value)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _mac(value: str) -> str:
    try:
        return normalize_mac(value)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected http(s)://host[:port], got {value!r}")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("the regional URL must not have a query or fragment")
    return value.rstrip("/")


def _urls(value: str) -> tuple[str, ...]:
    """One regional URL, or several separated by commas (the IDC's PXE hosts)."""
    urls = tuple(_url(part.strip()) for part in value.split(",") if part.strip())
    if not urls:
        raise argparse.ArgumentTypeError("expected at least one http(s)://host[:port]")
    return urls


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``agent`` sub-command to ``subparsers``; returns its parser."""
    parser = subparsers.add_parser(
        "agent",
        help="run the install agent on the machine being provisioned",
        description=(
            "Collect this machine's hardware facts, register with the IDC's regional, wait "
            "for approval, run the install plan and report the result. Exit codes: 0 done, "
            "1 install failed, 2 could not run (refused, unreachable), 3 cancelled."
        ),
    )
    parser.add_argument(
        "--regional-url",
        required=True,
        type=_urls,
        help=(
            "e.g. http://regional:8081; several comma-separated for an IDC with a standby "
            "regional (the agent moves to the next one when a regional answers 503 or is "
            "unreachable)"
        ),
    )
    parser.add_argument("--sn", required=True, type=_sn, help="this machine's serial number")
    parser.add_argument(
        "--mac", type=_mac, default=None, help="MAC to register with (default: first physical NIC)"
    )
    parser.add_argument(
        "--enrollment-secret-file",
        type=Path,
        default=None,
        help="file holding the task's enrollment secret (from the boot parameters)",
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        help="CA certificate(s) to verify an https:// regional with (default: system CAs)",
    )
    parser.add_argument(
        "--sysroot", type=Path, default=Path("/"), help="where /proc and /sys are (default /)"
    )
    parser.add_argument(
        "--poll-interval",
        type=_positive,
        default=2.0,
        help="seconds between task polls while waiting for approval (default 2)",
    )
    parser.add_argument(
        "--register-retry-interval",
        type=_positive,
        default=10.0,
        help="seconds between registration attempts while the task does not exist (default 10)",
    )
    parser.add_argument(
        "--register-timeout",
        type=_positive,
        default=None,
        help="give up registering after this many seconds (default: never)",
    )
    parser.add_argument(
        "--max-retry-time",
        type=_positive,
        default=600.0,
        help="give up one API call after retrying this many seconds (default 600)",
    )
    parser.add_argument(
        "--request-timeout",
        type=_positive,
        default=10.0,
        help="one HTTP request's timeout before it is retried, on the next regional URL "
        "when there are several (default 10)",
    )
    parser.add_argument(
        "--work-dir", default=None, help="working directory of plan steps (default: ours)"
    )
    parser.add_argument(
        "--log-level",
        dest="agent_log_level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="debug also logs every line of step output (default info)",
    )
    parser.add_argument(
        "--log-format",
        dest="agent_log_format",
        choices=["text", "json"],
        default="text",
        help="stderr log format (default text: the agent usually runs on a console)",
    )
    parser.set_defaults(handler=handle)
    return parser


def _read_secret(path: Path) -> str:
    with path.open("rb") as f:
        data = f.read(_MAX_SECRET_BYTES + 1)
    if len(data) > _MAX_SECRET_BYTES:
        raise ValueError(f"{path}: longer than {_MAX_SECRET_BYTES} bytes")
    secret = data.decode("utf-8").rstrip("\r\n")  # `echo secret > file` adds a newline
    if not secret:
        raise ValueError(f"{path}: empty")
    return secret


async def _run_until_signal(opts: AgentOptions) -> int:
    """Run the agent; SIGTERM/SIGINT cancel it (its steps are killed) and set 128+signum."""
    code = EXIT_ERROR
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def agent() -> None:
                nonlocal code
                code = await run_agent(opts)
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                nonlocal code
                async for signum in signals:
                    log.warning("signal received; stopping", extra={"signal": signum})
                    code = 128 + signum
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(agent)
            nursery.start_soon(watch)
    return code


def handle(args: argparse.Namespace) -> int:
    """Run ``lpmosd agent`` with parsed ``args``; returns the exit code."""
    setup_logging(args.agent_log_level, args.agent_log_format)
    secret = None
    if args.enrollment_secret_file is not None:
        try:
            secret = _read_secret(args.enrollment_secret_file)
        except (OSError, ValueError) as exc:
            log.error("cannot read the enrollment secret", extra={"error": str(exc)})
            return EXIT_ERROR
    if args.ca_file is not None and not args.ca_file.is_file():
        log.error("cannot read the CA file", extra={"path": str(args.ca_file)})
        return EXIT_ERROR
    opts = AgentOptions(
        regional_url=args.regional_url,
        ca_file=args.ca_file,
        sn=args.sn,
        mac=args.mac,
        enrollment_secret=secret,
        sysroot=args.sysroot,
        poll_interval=args.poll_interval,
        register_retry_interval=args.register_retry_interval,
        register_timeout=args.register_timeout,
        retry=RetryPolicy(total=args.max_retry_time),
        request_timeout=args.request_timeout,
        work_dir=args.work_dir,
    )
    return trio.run(_run_until_signal, opts)
