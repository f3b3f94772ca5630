"""Plumbing shared by the operator commands (``lpmosd migrate ...``, ``lpmosd inspect ...``).

- etcd settings: ``--config FILE`` (only its ``[etcd]`` section is read, so the file needs no
  role sections) and/or ``--etcd-endpoints URL,...`` (which alone needs no file at all);
- :func:`open_etcd_client`: connect with a short timeout and a one-line error when etcd does
  not answer;
- :func:`run_trio`: ``trio.run`` that hands our own single error to ``lpmosd.cli.main``
  instead of an ExceptionGroup (the trio-asyncio loop's nursery wraps everything);
- :class:`Progress` and :func:`bar`: a progress bar on a TTY, nothing otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, TextIO

import trio

from lpmosd.config import (
    DEFAULT_CONFIG_PATH,
    EtcdConfig,
    load_etcd_config,
    parse_endpoints,
    with_etcd_endpoints,
)
from lpmosd.errors import ConfigError, EtcdUnavailableError, ValidationError
from lpmosd.etcd import Auth, EtcdClient, TLSFiles, open_client
from lpmosd.schema import validate_idc, validate_sn

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "Progress",
    "add_etcd_arguments",
    "bar",
    "etcd_config_from_args",
    "etcd_credentials",
    "idc_arg",
    "open_etcd_client",
    "run_trio",
    "sn_arg",
]

DEFAULT_CONNECT_TIMEOUT: Final = 5.0

# --------------------------------------------------------------------------- arguments


def idc_arg(value: str) -> str:
    """argparse type: a valid IDC name."""
    try:
        return validate_idc(value)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def sn_arg(value: str) -> str:
    """argparse type: a valid serial number."""
    try:
        return validate_sn(value)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _timeout_arg(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def add_etcd_arguments(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--etcd-endpoints`` and ``--timeout`` on an operator command."""
    g = p.add_argument_group("etcd connection")
    g.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help=f"TOML config whose [etcd] section to use (default {DEFAULT_CONFIG_PATH}, "
        "not read when --etcd-endpoints is given alone)",
    )
    g.add_argument(
        "--etcd-endpoints",
        metavar="URL,...",
        help="etcd endpoints, comma-separated (overrides the config file's)",
    )
    g.add_argument(
        "--timeout",
        type=_timeout_arg,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up when etcd does not answer within this time (default "
        f"{DEFAULT_CONNECT_TIMEOUT:g})",
    )


# ------------------------------------------------------------------------------ config


def etcd_config_from_args(args: argparse.Namespace) -> EtcdConfig:
    """The etcd settings of an operator command's arguments (see :func:`add_etcd_arguments`)."""
    endpoints: tuple[str, ...] | None = None
    if args.etcd_endpoints is not None:
        raw = [e.strip() for e in str(args.etcd_endpoints).split(",") if e.strip()]
        endpoints = parse_endpoints(raw, "--etcd-endpoints")
    config_path: Path | None = args.config
    if config_path is None and endpoints is not None:
        return EtcdConfig(endpoints=endpoints)
    path = config_path if config_path is not None else DEFAULT_CONFIG_PATH
    try:
        cfg = load_etcd_config(path)
    except ConfigError as exc:
        if config_path is None and not path.exists():
            raise ConfigError(
                str(path), "does not exist (give --config FILE or --etcd-endpoints URL)"
            ) from exc
        raise
    if endpoints is not None:
        cfg = with_etcd_endpoints(cfg, endpoints)
    return cfg


# ------------------------------------------------------------------------------ client


def etcd_credentials(cfg: EtcdConfig) -> tuple[TLSFiles | None, Auth | None]:
    """The client TLS files and auth of an ``[etcd]`` section (the password read now)."""
    tls = None
    if cfg.tls is not None:
        tls = TLSFiles(
            str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
            str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
            str(cfg.tls.key_file) if cfg.tls.key_file else None,
        )
    password = cfg.read_password()
    auth = Auth(cfg.auth.username, password) if cfg.auth and password is not None else None
    return tls, auth


@asynccontextmanager
async def open_etcd_client(
    cfg: EtcdConfig, *, timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> AsyncIterator[EtcdClient]:
    """A connected client, or EtcdUnavailableError with one clear line after ``timeout`` s.

    The connect check (and its retries over the endpoints) shares ``timeout``; afterwards
    requests use the config's ``request_timeout``.
    """
    tls, auth = etcd_credentials(cfg)
    # The client tries max(2, n) endpoints before giving up: split the budget between them.
    per_attempt = timeout / max(2, len(cfg.endpoints))
    where = ", ".join(cfg.endpoints)
    connected = False
    try:
        async with open_client(
            list(cfg.endpoints),
            tls=tls,
            auth=auth,
            request_timeout=per_attempt,
            keepalive_interval=cfg.keepalive_interval,
        ) as client:
            connected = True
            client.request_timeout = cfg.request_timeout
            yield client
    except BaseExceptionGroup as group:
        leaf = _single(group)
        if leaf is group:
            raise
        if isinstance(leaf, EtcdUnavailableError) and not connected:
            raise _unreachable(leaf, where, timeout) from None
        raise leaf from None
    except EtcdUnavailableError as exc:
        if connected:
            raise
        raise _unreachable(exc, where, timeout) from None


def _unreachable(exc: EtcdUnavailableError, where: str, timeout: float) -> EtcdUnavailableError:
    text = " ".join(str(exc).split())  # one line, whatever grpclib said
    return EtcdUnavailableError(f"cannot reach etcd at {where} (timeout {timeout:g}s): {text}")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _single(group: BaseExceptionGroup[Any]) -> BaseException:
    """The one real error in ``group`` (Cancelled leaves are noise), else the group itself."""
    real = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
    if len(real) == 1:
        return real[0]
    return group


def run_trio(fn: Callable[[], Awaitable[int]]) -> int:
    """``trio.run(fn)``, re-raising a lone error out of any ExceptionGroup.

    ``lpmosd.cli.main`` maps our errors to one-line messages and exit codes; a group would
    reach the user as a traceback instead.
    """
    try:
        return trio.run(fn)
    except BaseExceptionGroup as group:
        leaf = _single(group)
        if leaf is group:
            raise
        raise leaf from None


# ---------------------------------------------------------------------------- progress


def bar(percent: float, width: int = 20) -> str:
    """``[#########...........]``: ``percent`` (0..100, clamped) as a fixed-width bar."""
    p = min(100.0, max(0.0, percent))
    filled = round(width * p / 100)
    return "[" + "#" * filled + "." * (width - filled) + "]"


class Progress:
    """A one-line progress bar on ``stream`` when it is a TTY; otherwise it draws nothing.

    :meth:`line` prints a message (to stdout) above the bar, so per-item messages and the
    bar can be mixed; the bar is redrawn at most ten times a second.
    """

    def __init__(
        self,
        total: int,
        label: str,
        *,
        stream: TextIO | None = None,
        out: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.total = total
        self.done = 0
        self.label = label
        self.note = ""
        self._stream = stream if stream is not None else sys.stderr
        self._out = out if out is not None else sys.stdout
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self._last_draw = 0.0
        self._drawn = False
        self._start = time.monotonic()

    def advance(self, n: int = 1, note: str | None = None) -> None:
        """Count ``n`` more items done; redraw when due."""
        self.done += n
        if note is not None:
            self.note = note
        self._draw(force=self.done >= self.total)

    def line(self, text: str) -> None:
        """Print ``text`` as its own line (above the bar on a TTY)."""
        self._clear()
        print(text, file=self._out, flush=True)
        self._draw(force=True)

    def close(self) -> None:
        """Leave the final bar on screen and end its line."""
        if self.enabled and self._drawn:
            self._draw(force=True)
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False

    def _clear(self) -> None:
        if self.enabled and self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._drawn = False

    def _draw(self, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        pct = 100.0 * self.done / self.total if self.total else 100.0
        elapsed = now - self._start
        text = (
            f"\r\x1b[K{self.label} {bar(pct, 30)} {self.done}/{self.total} {pct:3.0f}% "
            f"{elapsed:5.1f}s"
        )
        if self.note:
            text += f" {self.note}"
        self._stream.write(text)
        self._stream.flush()
        self._drawn = True
