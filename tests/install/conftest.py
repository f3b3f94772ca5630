"""Web tests start in-process daemons: open the test's trio-asyncio loop first."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def use_aio_loop(aio_loop: None) -> None:
    """Open the test's trio-asyncio loop before anything else (see tests/conftest.py)."""
