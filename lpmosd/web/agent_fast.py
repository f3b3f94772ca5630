"""The agent API's hot routes answered below Quart: heartbeat, progress and logs.

At 10,000 installing machines nearly every request the regional gets is one of these
three. :class:`AgentFastPath` answers them for the lean server (:mod:`lpmosd.web.lean`)
with the same steps as the Quart routes of :mod:`lpmosd.web.agent_app`, in the same order
and from the same pieces: admission control (progress and logs), the per-client rate limit
(429 + Retry-After), :meth:`AgentService.authorize`, the strict JSON body with its limit,
the ``Idempotency-Key``, the request models, and the errors of
:func:`lpmosd.web.common.map_error`. Same status codes, same bodies (tests compare both
paths request by request); only the HTTP machinery is left out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final

from lpmosd.agent_service import AgentService, Heard, Reported, TaskEndedError
from lpmosd.api_requests import LogRequest, ProgressRequest
from lpmosd.documents import valid_op_id
from lpmosd.errors import ValidationError
from lpmosd.web.admission import OVERLOAD_MESSAGE, Admission
from lpmosd.web.common import (
    HTTP_REQUESTS,
    error_body,
    json_body,
    map_error,
    no_fields,
    parse_body,
)
from lpmosd.web.lean import BodyReader, FastReply
from lpmosd.web.ratelimit import RateLimiter

if TYPE_CHECKING:
    from prometheus_client import Counter

__all__ = ["AgentFastPath", "heard_body", "op_id_of", "reported_reply", "task_ended_reply"]

_PREFIX: Final = b"/api/v1/agent/"
_RULES: Final = {
    b"heartbeat": "/api/v1/agent/<sn>/heartbeat",
    b"progress": "/api/v1/agent/<sn>/progress",
    b"logs": "/api/v1/agent/<sn>/logs",
}
#: The header that names one agent request, the same on each of its retries.
OP_ID_HEADER: Final = "Idempotency-Key"
_WWW_AUTHENTICATE: Final = 'Bearer realm="lpmosd-agent"'


def op_id_of(value: str | None) -> str | None:
    """The operation id of an ``Idempotency-Key`` header value (400 when malformed)."""
    if value is None:
        return None
    if len(value) > 64 or not valid_op_id(value):
        raise ValidationError(
            f"{OP_ID_HEADER} must be 1-64 letters, digits or _.:-", field=OP_ID_HEADER
        )
    return f"agent:{value}"


def task_ended_reply(exc: TaskEndedError) -> tuple[int, bytes, dict[str, str]]:
    """A revoked token of an ended task: 401 naming the task's status."""
    body = {"error": exc.message, "field": exc.field, "task_status": exc.task_status.value}
    return 401, json_body(body), {"WWW-Authenticate": _WWW_AUTHENTICATE}


def reported_reply(reported: Reported) -> tuple[int, dict[str, Any]]:
    """A report's answer: 200 committed, or 202 journaled (etcd unreachable)."""
    if reported.committed:
        return 200, {"status": reported.task.status.value, "committed": True}
    return 202, {"status": reported.task.status.value, "committed": False, "journaled": True}


def heard_body(heard: Heard) -> dict[str, Any]:
    """A heartbeat's answer."""
    body: dict[str, Any] = {"status": heard.status.value, "lease_ttl": heard.lease_ttl}
    if not heard.committed:
        body["committed"] = False  # etcd is unreachable: heard, the lease not refreshed
    return body


def retry_after(wait: float) -> str:
    """Retry-After for a refusal that clears in ``wait`` seconds (whole seconds, >= 1)."""
    return str(max(1, math.ceil(wait)))


class AgentFastPath:
    """Answers ``POST /api/v1/agent/{sn}/heartbeat|progress|logs`` for the lean server."""

    def __init__(
        self,
        agents: AgentService,
        *,
        limiter: RateLimiter,
        admission: Admission,
        max_body: int,
        rate_limited: Counter,
    ) -> None:
        self.agents = agents
        self.limiter = limiter
        self.admission = admission
        self.max_body = max_body
        self.rate_limited = rate_limited
        self._counters: dict[tuple[bytes, int], Any] = {}

    def match(self, method: bytes, path: bytes) -> tuple[bytes, str] | None:
        """``(kind, sn)`` for a hot route, else None (the Quart app serves it)."""
        if method != b"POST" or not path.startswith(_PREFIX):
            return None
        sn, sep, kind = path[len(_PREFIX) :].partition(b"/")
        if not sep or not sn or kind not in _RULES or b"%" in sn:
            return None  # percent-escapes, odd paths: Quart decodes and routes them
        return kind, sn.decode("ascii")

    async def handle(
        self, route: tuple[bytes, str], headers: dict[bytes, bytes], client: str, body: BodyReader
    ) -> FastReply:
        """Answer one hot-route request."""
        kind, sn = route
        if kind == b"heartbeat":  # heartbeats keep leases alive: never queued
            reply = await self._answer(kind, sn, headers, client, body)
        elif self.admission.overloaded():
            wait = str(self.admission.retry_after).encode()
            return FastReply(429, error_body(OVERLOAD_MESSAGE), [(b"retry-after", wait)])
        else:
            async with self.admission.limiter:
                reply = await self._answer(kind, sn, headers, client, body)
        counter = self._counters.get((kind, reply.status))
        if counter is None:
            counter = HTTP_REQUESTS.labels("regional", _RULES[kind], str(reply.status))
            self._counters[(kind, reply.status)] = counter
        counter.inc()
        return reply

    async def _answer(
        self, kind: bytes, sn: str, headers: dict[bytes, bytes], client: str, body: BodyReader
    ) -> FastReply:
        wait = self.limiter.take(client)
        if wait > 0:
            self.rate_limited.inc()
            return FastReply(
                429,
                error_body("too many requests; slow down"),
                [(b"retry-after", retry_after(wait).encode())],
            )
        try:
            return await self._route(kind, sn, headers, body)
        except TaskEndedError as exc:
            status, data, extra = task_ended_reply(exc)
            return FastReply(
                status, data, [(k.lower().encode(), v.encode()) for k, v in extra.items()]
            )
        except Exception as exc:
            status, message, field = map_error(exc, path=f"/api/v1/agent/{sn}/{kind.decode()}")
            return FastReply(status, error_body(message, field), close=status == 413)

    async def _route(
        self, kind: bytes, sn: str, headers: dict[bytes, bytes], body: BodyReader
    ) -> FastReply:
        agents = self.agents
        auth = headers.get(b"authorization")
        call = await agents.authorize(sn, None if auth is None else auth.decode("latin-1"))
        if kind == b"heartbeat":
            no_fields(parse_body(await body.read(self.max_body), empty_ok=True))
            return FastReply(200, json_body(heard_body(await agents.heartbeat(call))))
        data = parse_body(await body.read(self.max_body))
        if kind == b"progress":
            progress = ProgressRequest.from_obj(data)
            op_id = self._op_id(headers)
            reported = await agents.progress(call, progress, op_id=op_id)
        else:
            logs = LogRequest.from_obj(data)
            op_id = self._op_id(headers)
            reported = await agents.logs(call, logs, op_id=op_id)
        status, answer = reported_reply(reported)
        return FastReply(status, json_body(answer))

    @staticmethod
    def _op_id(headers: dict[bytes, bytes]) -> str | None:
        value = headers.get(b"idempotency-key")
        return op_id_of(None if value is None else value.decode("latin-1"))
