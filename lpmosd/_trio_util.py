"""Small Trio helpers shared across lpmosd."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


@contextlib.asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery that raises a lone error as itself instead of inside an ExceptionGroup.

    Trio wraps every nursery error in an ExceptionGroup; our callers get our own single
    errors. When several tasks fail at once, the first non-Cancelled error wins (the rest
    are chained as its ``__context__`` through the group).
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        chosen = real[0] if real else leaves[0]
        raise chosen from (group if len(real) > 1 else None)
