"""``lpmosd image build installer|debian-12 --output DIR``."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from lpmosd.image.common import DEFAULT_SOURCE_DATE_EPOCH, DEFAULT_SUITE, BuildError, BuildOptions

__all__ = ["register"]

log = logging.getLogger("lpmosd.image")

TARGETS = ("installer", "debian-12")


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``image build`` to the main parser's ``subparsers``."""
    parser = subparsers.add_parser("image", help="build the installer and OS images")
    sub = parser.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = sub.add_parser(
        "build",
        help="build an image with mmdebstrap (as root)",
        description=(
            "installer: installer/vmlinuz + installer/initrd (the agent's boot environment); "
            "debian-12: images/debian-12.tar.zst (the OS the debian-12 plan installs). "
            "Each file gets a .sha256 beside it. Only Debian 12 (bookworm) is tested; "
            "--suite/--mirror build from another Debian-family archive."
        ),
    )
    build.add_argument("target", choices=TARGETS)
    build.add_argument("--output", "-o", type=Path, required=True, help="artifacts directory")
    build.add_argument("--suite", default=DEFAULT_SUITE, help=f"default {DEFAULT_SUITE}")
    build.add_argument(
        "--mirror", default=None, help="archive URL (default: the Debian mirror apt uses here)"
    )
    build.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="reuse builds with the same inputs from here (default: no cache)",
    )
    build.set_defaults(handler=_handle)
    return parser


def _handle(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_SOURCE_DATE_EPOCH))
    opts = BuildOptions(
        output=args.output,
        suite=args.suite,
        mirror=args.mirror,
        cache_dir=args.cache_dir,
        source_date_epoch=epoch,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        if args.target == "installer":
            from lpmosd.image.installer import build_installer

            sizes = build_installer(opts)
        else:
            from lpmosd.image.debian import build_debian

            sizes = build_debian(opts)
    except BuildError as exc:
        log.error("image build failed: %s", exc)
        return 1
    for name, size in sizes.items():
        print(f"{args.output / name}: {size / 1e6:.1f} MB")
    print(f"{args.target}: {time.monotonic() - started:.0f} s")
    return 0
