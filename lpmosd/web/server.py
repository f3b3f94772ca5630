"""Serving a quart-trio app with hypercorn inside our Trio process."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart_trio import QuartTrio

#: Largest request line + header block accepted (431/400 beyond it, from hypercorn).
MAX_HEADER_BYTES = 16 * 1024


async def serve_app(
    app: QuartTrio,
    *,
    host: str,
    port: int,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    graceful_timeout: float = 5.0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled (or ``shutdown_trigger`` returns).

    Reports the URL it listens on (with the real port when ``port`` is 0) to ``task_status``.
    HTTPS when a certificate and key are given.
    """
    cfg = HypercornConfig()
    bind_host = f"[{host}]" if ":" in host else host
    cfg.bind = [f"{bind_host}:{port}"]
    if certfile and keyfile:
        cfg.certfile = str(certfile)
        cfg.keyfile = str(keyfile)
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("lpmosd.http")
    cfg.graceful_timeout = graceful_timeout
    # Header limits against hostile clients (request line + headers, HTTP/1.1 and HTTP/2):
    # 16 KiB, as nginx's default large_client_header_buffers. Bodies are capped per app.
    # No read_timeout: it would cut the dashboard's server-sent-event streams.
    cfg.h11_max_incomplete_size = MAX_HEADER_BYTES
    cfg.h2_max_header_list_size = MAX_HEADER_BYTES
    cfg.include_server_header = False

    async def _started(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, cfg, shutdown_trigger=shutdown_trigger, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(_started)
        task_status.started(binds[0])
