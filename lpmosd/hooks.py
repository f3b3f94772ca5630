"""Named fault points: tests stop or kill a process at a known step, never after a sleep.

Code marks a point with ``await hooks.reach("writer.before-txn")``. Nothing happens unless
a test asked for it, either in-process (:func:`install`) or, for a child process, with the
environment variable ``LPMOSD_FAULT_AT="point:action,..."`` where action is ``stop``
(SIGSTOP itself, to be woken with SIGCONT) or ``kill`` (SIGKILL itself). Environment faults
fire once per process, at the first time the point is reached.
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


def _from_env() -> dict[str, signal.Signals]:
    faults: dict[str, signal.Signals] = {}
    for item in os.environ.get(ENV, "").split(","):
        point, _, action = item.strip().rpartition(":")
        if point and action in _SIGNALS:
            faults[point] = _SIGNALS[action]
    return faults


_env_faults = _from_env()


async def reach(point: str) -> None:
    """Mark ``point``: run the fault a test attached to it, if any."""
    handler = _handlers.get(point)
    if handler is not None:
        await handler()
    sig = _env_faults.pop(point, None)
    if sig is not None:
        os.kill(os.getpid(), sig)


@contextlib.contextmanager
def install(point: str, handler: Handler) -> Iterator[None]:
    """Run ``handler`` whenever ``point`` is reached, for the duration of the block."""
    _handlers[point] = handler
    try:
        yield
    finally:
        _handlers.pop(point, None)
