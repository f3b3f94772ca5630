"""Command-line entry point: ``lpmosd run | dev | check-config | ...``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the lpmosd command line; returns the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    print(f"lpmosd: not implemented yet: {args}", file=sys.stderr)
    return 2
