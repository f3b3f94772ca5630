"""Named fault points: tests stop or kill a process at a known step, never after a sleep.

Code marks a point with ``await hooks.reach("writer.before-txn")``. Nothing happens unless
a test asked for it, either in-process (:func:`install`) or, for a child process, with the
environment variable ``LPMOSD_FAULT_AT="point:action,..."`` where action is ``stop``
(SIGSTOP itself, to be woken with SIGCONT) or ``kill`` (SIGKILL itself). Environment faults
fire once per process, the first time the point is reached, or the n-th time with
``point#n:action`` (``migrate.after-txn#50:stop``: after the 50th server's Txn).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Iterator

ENV = "LPMOSD_FAULT_AT"
_SIGNALS = {"stop": signal.SIGSTOP, "kill": signal.SIGKILL}

Handler = Callable[[], Awaitable[None]]
_handlers: dict[str, Handler] = {}


def _from_env() -> dict[str, tuple[int, signal.Signals]]:
    """point -> (reaches left before the fault, its signal)."""
    faults: dict[str, tuple[int, signal.Signals]] = {}
    for item in os.environ.get(ENV, "").split(","):
        where, _, action = item.strip().rpartition(":")
        point, _, nth = where.partition("#")
        if point and action in _SIGNALS and (not nth or (nth.isdigit() and int(nth) > 0)):
            faults[point] = (int(nth or 1), _SIGNALS[action])
    return faults


_env_faults = _from_env()


async def reach(point: str) -> None:
    """Mark ``point``: run the fault a test attached to it, if any."""
    handler = _handlers.get(point)
    if handler is not None:
        await handler()
    fault = _env_faults.get(point)
    if fault is not None:
        left, sig = fault
        if left > 1:
            _env_faults[point] = (left - 1, sig)
            return
        del _env_faults[point]
        os.kill(os.getpid(), sig)


@contextlib.contextmanager
def install(point: str, handler: Handler) -> Iterator[None]:
    """Run ``handler`` whenever ``point`` is reached, for the duration of the block."""
    _handlers[point] = handler
    try:
        yield
    finally:
        _handlers.pop(point, None)
