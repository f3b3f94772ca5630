"""Unit checks of the hostile-input defences: log line sanitising, the rate limiter."""

from __future__ import annotations

import json
import logging

import pytest

from lpmosd.logs import JsonFormatter, TextFormatter
from lpmosd.web.ratelimit import RateLimiter


@pytest.fixture
def aio_loop() -> None:
    """No trio-asyncio loop: these tests are synchronous (overrides the package's)."""


HOSTILE = "ok\n2026-01-01 error forged: line\r\x1b[2J\x1b]0;pwned\x07\x9b31m\u2028\ud800end"


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("lpmosd.test", logging.WARNING, __file__, 1, msg, None, None)
    record.__dict__.update(extra)
    return record


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_log_lines_cannot_be_forged(formatter: logging.Formatter) -> None:
    line = formatter.format(_record(HOSTILE, sn=HOSTILE, path="/x\n/y"))
    assert "\n" not in line and "\r" not in line, line
    assert not any(c in line for c in "\x1b\x07\x9b\u2028\ud800"), repr(line)
    if isinstance(formatter, JsonFormatter):
        doc = json.loads(line)
        assert doc["msg"].startswith("ok\\n2026")  # visible, escaped, one line
    line.encode("utf-8")  # nothing unencodable reaches the stream


def test_rate_limiter_token_bucket() -> None:
    now = [100.0]
    limiter = RateLimiter(2.0, 3, clock=lambda: now[0], max_clients=2)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)  # next token in 1/rate s
    assert limiter.take("b") == 0.0  # per client
    now[0] += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    now[0] += 60
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # burst, not more
    assert limiter.take("a") > 0
    limiter.take("c")  # a third client: the least recent one is forgotten
    assert len(limiter) == 2
    with pytest.raises(ValueError):
        RateLimiter(0, 1)


def test_sessions_expire_and_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from lpmosd.timestamps import utcnow
    from lpmosd.tokens import Role, TokenRecord
    from lpmosd.web import auth

    now = [1000.0]
    monkeypatch.setattr("lpmosd.web.auth.time.monotonic", lambda: now[0])
    record = TokenRecord(
        name="a", role=Role.VIEWER, token_hash="sha256:x", created_at=utcnow(), created_by="t"
    )
    sessions = auth._Sessions(lifetime=timedelta(hours=1), limit=2)
    first, _ = sessions.create(record, until_expiry=None)
    short, _ = sessions.create(record, until_expiry=60)  # the token expires in a minute
    assert sessions.get(first) is not None and sessions.get(short) is not None
    now[0] += 61
    assert sessions.get(short) is None and sessions.get(first) is not None
    third, _ = sessions.create(record, until_expiry=None)
    fourth, _ = sessions.create(record, until_expiry=None)
    assert len(sessions) == 2 and sessions.get(first) is None  # the oldest went first
    assert sessions.get(third) is not None and sessions.get(fourth) is not None
    now[0] += 3601
    assert sessions.get(third) is None
    assert len({first, short, third, fourth}) == 4 and all(len(s) >= 43 for s in (first, third))
