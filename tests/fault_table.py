"""The fault x outcome table: fault tests add a row once their checks passed; the run
prints the table at the end (``pytest_terminal_summary`` in tests/conftest.py)."""

from __future__ import annotations

#: (fault, outcome) rows, in run order.
RESULTS: list[tuple[str, str]] = []


def record(fault: str, outcome: str) -> None:
    """Add a row (call once the test's checks passed)."""
    RESULTS.append((fault, outcome))


def fault_table() -> str:
    """The rows as a Markdown table."""
    width = max((len(f) for f, _ in RESULTS), default=5)
    lines = [f"| {'fault':<{width}} | outcome |", f"| {'-' * width} | --- |"]
    lines += [f"| {fault:<{width}} | {outcome} |" for fault, outcome in RESULTS]
    return "\n".join(lines)
