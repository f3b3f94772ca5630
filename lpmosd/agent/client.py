"""HTTP client for the regional's agent API (``lpmosd/web/openapi/agent.yaml``).

Every call retries, with capped exponential backoff and jitter, on anything that looks like
a regional that is restarting or unreachable: connection errors, timeouts, 429 and 5xx (a
regional that lost its etcd session answers 503 until it is back). The retries of one call
are bounded by :attr:`RetryPolicy.total`; past it :class:`RegionalUnavailableError` is raised.
Other errors raise :class:`AgentAPIError` with the regional's ``error`` and ``field``.

Several regional URLs may be given (the IDC's PXE hosts: one active regional, the others
standby and answering 503): a connection failure or a 503 moves the client to the next
URL at once, and it waits only after it has tried every one.

A retried POST may have been applied by the first attempt (the answer was lost), possibly
by another regional. Progress, log batches, complete and fail carry one operation id
(``Idempotency-Key``) on all their attempts; the regional records it in the task with the
change and recognises a repeat, so each is applied exactly once. A 409 on complete/fail
still means "look at the task" (see :mod:`lpmosd.agent.main`).

Authentication: when registration returns ``agent_token`` it is sent as a bearer token on
every later call. A 401 on a later call means the regional no longer knows the token (it
was re-enrolled or its token store was reset): the client registers again with the body it
registered with, and repeats the call once. A 401 that names ``task_status`` means the token
was revoked because the task ended (completed, failed or cancelled): that raises
:class:`TaskEndedError` (a 409 to the rest of the agent: the task is no longer ours).
"""

from __future__ import annotations

import logging
import random
import secrets
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

import httpx
import trio

from lpmosd.api_requests import LogLevel
from lpmosd.errors import LpmosdError
from lpmosd.plan import Plan, PlanError, plan_from_wire

__all__ = [
    "AgentAPIError",
    "AgentClient",
    "Heartbeat",
    "RegionalUnavailableError",
    "Registration",
    "RetryPolicy",
    "TaskEndedError",
    "TaskReply",
    "TaskView",
]

log = logging.getLogger("lpmosd.agent")

API_PREFIX: Final = "/api/v1/agent"
_RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
#: A longer Retry-After is taken as this many seconds.
MAX_RETRY_AFTER: Final = 60.0
#: Log a still-failing call at WARNING every this many attempts (DEBUG in between).
_WARN_EVERY: Final = 10


class AgentAPIError(LpmosdError):
    """The regional refused a call; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.field = field


class RegionalUnavailableError(AgentAPIError):
    """The regional did not answer usefully within the retry budget of one call."""


class TaskEndedError(AgentAPIError):
    """The regional revoked our token because the task ended; ``task_status`` says how.

    Its ``status`` is 409, like any other "the task is no longer ours" refusal.
    """

    def __init__(self, task_status: str, message: str) -> None:
        super().__init__(409, message, "status")
        self.task_status = task_status


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff for retried calls: ``initial`` doubling up to ``maximum`` seconds (±20 %
    jitter), for at most ``total`` seconds per call."""

    initial: float = 0.5
    maximum: float = 5.0
    total: float = 600.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        base: float = min(self.maximum, self.initial * 2.0 ** min(attempt - 1, 32))
        return base * random.uniform(0.8, 1.2)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskView:
    """The agent's view of its task (the ``task`` object of the API)."""

    task_id: str
    idc: str
    sn: str
    mac: str
    os_type: str
    os_version: str = ""
    disk_layout: str = ""
    network_config: str = ""
    status: str
    resume_from: str | None = None
    #: Latest percent per step name, from the task's progress list.
    progress: Mapping[str, int] = field(default_factory=dict)
    #: Public keys for root on the installed system (the built-in plans' post_install).
    ssh_authorized_keys: tuple[str, ...] = ()

    @classmethod
    def from_obj(cls, obj: object) -> Self:
        """Parse leniently (unknown fields are ignored); raises ValueError on wrong shapes."""
        if not isinstance(obj, dict):
            raise ValueError("task must be an object")

        def text(name: str, *, required: bool = False) -> str:
            value = obj.get(name)
            if value is None and not required:
                return ""
            if not isinstance(value, str):
                raise ValueError(f"task.{name} must be a string")
            return value

        progress: dict[str, int] = {}
        raw_progress = obj.get("progress") or []
        if not isinstance(raw_progress, list):
            raise ValueError("task.progress must be a list")
        for entry in raw_progress:
            if not isinstance(entry, dict):
                raise ValueError("task.progress entries must be objects")
            step, percent = entry.get("step"), entry.get("percent")
            if not isinstance(step, str) or isinstance(percent, bool):
                raise ValueError("task.progress entries need step and percent")
            if not isinstance(percent, int):
                raise ValueError("task.progress percent must be an integer")
            progress[step] = percent
        resume = obj.get("resume_from")
        if resume is not None and not isinstance(resume, str):
            raise ValueError("task.resume_from must be a string or null")
        keys = obj.get("ssh_authorized_keys") or []
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError("task.ssh_authorized_keys must be a list of strings")
        return cls(
            task_id=text("task_id", required=True),
            idc=text("idc"),
            sn=text("sn", required=True),
            mac=text("mac"),
            os_type=text("os_type"),
            os_version=text("os_version"),
            disk_layout=text("disk_layout"),
            network_config=text("network_config"),
            status=text("status", required=True),
            resume_from=resume or None,
            progress=progress,
            ssh_authorized_keys=tuple(keys),
        )

    def placeholders(self) -> dict[str, str]:
        """Values for a plan command's ``{name}`` placeholders (and ``LPMOS_*`` variables)."""
        return {
            "task_id": self.task_id,
            "idc": self.idc,
            "sn": self.sn,
            "mac": self.mac,
            "os_type": self.os_type,
            "os_version": self.os_version,
            "disk_layout": self.disk_layout,
            "network_config": self.network_config,
        }


@dataclass(frozen=True, slots=True)
class TaskReply:
    """A task with its plan. ``plan_error`` is set (and ``plan`` None) when the served plan
    is malformed, so the agent can fail the task saying why."""

    task: TaskView
    plan: Plan | None
    plan_error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration(TaskReply):
    """The answer to register."""

    lease_ttl: float = 30.0
    heartbeat_interval: float = 10.0
    agent_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The answer to a heartbeat: the task's status and the agent lease's TTL."""

    status: str
    lease_ttl: float


def _task_reply(body: dict[str, Any], status: int) -> tuple[TaskView, Plan | None, str | None]:
    try:
        task = TaskView.from_obj(body.get("task"))
    except ValueError as exc:
        raise AgentAPIError(status, f"malformed response: {exc}") from None
    try:
        return task, plan_from_wire(body.get("plan")), None
    except PlanError as exc:
        return task, None, str(exc)


def _positive(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return default
    return float(value)


def _error_of(resp: httpx.Response) -> AgentAPIError:
    message, field_ = f"{resp.reason_phrase or 'error'}", None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            message = body["error"]
        if isinstance(body.get("field"), str):
            field_ = body["field"]
    return AgentAPIError(resp.status_code, message, field_)


def _ended_status(resp: httpx.Response) -> str | None:
    """The ``task_status`` of a 401 for a token revoked because its task ended."""
    try:
        body = resp.json()
    except ValueError:
        return None
    status = body.get("task_status") if isinstance(body, dict) else None
    return status if isinstance(status, str) and status else None


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: ignore, use our backoff


class AgentClient:
    """The regional's agent API for one machine (``sn``), with retries and the agent token.

    Use as an async context manager (it owns an :class:`httpx.AsyncClient`). ``transport``
    replaces the network (tests). The methods :meth:`progress` and :meth:`logs` make it a
    :class:`~lpmosd.agent.runner.StepReporter`.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        sn: str,
        *,
        retry: RetryPolicy | None = None,
        request_timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.sn = sn
        self.retry = retry or RetryPolicy()
        # Certificates are always verified: against ``ca_file`` (a private CA) when given.
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else True
        )
        bases = [base_url] if isinstance(base_url, str) else list(base_url)
        if not bases:
            raise ValueError("at least one regional URL is needed")
        self._bases = [b.rstrip("/") for b in bases]
        self._current = 0
        self._http = httpx.AsyncClient(
            timeout=request_timeout,
            transport=transport,
            verify=verify,
            headers={"User-Agent": "lpmosd-agent"},
            follow_redirects=False,
        )
        self._base = f"{API_PREFIX}/{quote(sn, safe='')}"
        self._token: str | None = None
        self._token_generation = 0
        self._register_body: dict[str, Any] | None = None
        self._reauth_lock = trio.Lock()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        with trio.CancelScope(shield=True):
            await self._http.aclose()

    @property
    def regional_url(self) -> str:
        """The regional URL calls go to now."""
        return self._bases[self._current]

    def _next_regional(self, failed: str, avoid: set[str]) -> None:
        """Move on from ``failed`` (unless a concurrent call already did), preferring a
        regional not in ``avoid`` (unreachable a moment ago): a standby answering 503 is
        about to take over from an unreachable active one, not the other way round."""
        if self._bases[self._current] != failed:
            return
        n = len(self._bases)
        order = [(self._current + step) % n for step in range(1, n + 1)]
        good = [i for i in order if self._bases[i] not in avoid]
        self._current = (good or order)[0]

    @property
    def has_token(self) -> bool:
        """Whether the regional gave us an agent token."""
        return self._token is not None

    # ------------------------------------------------------------------ transport

    async def _send(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        op_id: str | None = None,
        *,
        persistent: bool = False,
    ) -> httpx.Response:
        """One call with retries on transient failures; returns the final response.

        ``op_id`` goes with every attempt (``Idempotency-Key``): the regional records it
        with the change, so an attempt whose answer was lost is not applied twice. A
        ``persistent`` call (a report: progress, logs, complete, fail) is never given up:
        the retry budget does not apply, so no report is dropped however long the regional
        is away.
        """
        policy = self.retry
        started = trio.current_time()
        attempt = 0
        tried: set[str] = set()
        unreachable: set[str] = set()  # in this call: not worth going back to soon
        while True:
            attempt += 1
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            if op_id is not None:
                headers["Idempotency-Key"] = op_id
            problem: str
            wait: float | None = None
            base = self._bases[self._current]
            tried.add(base)
            try:
                resp = await self._http.request(method, base + path, json=body, headers=headers)
            except httpx.TransportError as exc:
                problem = f"{base}: {type(exc).__name__}: {exc}"
                unreachable.add(base)
                self._next_regional(base, unreachable)
            else:
                if resp.status_code not in _RETRY_STATUSES:
                    if attempt > 1:
                        log.info(
                            "regional answers again",
                            extra={
                                "path": path,
                                "attempts": attempt,
                                "down_for": round(trio.current_time() - started, 1),
                            },
                        )
                    return resp
                problem = f"{base}: HTTP {resp.status_code}: {_error_of(resp).message}"
                wait = _retry_after(resp)
                if resp.status_code == 503:
                    self._next_regional(base, unreachable)
            elapsed = trio.current_time() - started
            if elapsed >= policy.total and not persistent:
                log.error(
                    "giving up on the regional",
                    extra={"path": path, "attempts": attempt, "error": problem},
                )
                raise RegionalUnavailableError(
                    0, f"{method} {path}: no answer after {elapsed:.0f}s: {problem}"
                )
            delay = policy.delay(attempt)
            if wait is not None:
                # The regional's Retry-After (an overloaded one answers 429 with it), plus up
                # to 50 % jitter: refused agents must not all come back in the same instant.
                delay = min(wait, MAX_RETRY_AFTER) * random.uniform(1.0, 1.5)
            if not persistent:
                delay = min(delay, policy.total - elapsed)
            if self._bases[self._current] not in tried and wait is None:
                delay = 0.0  # another regional to try before waiting
            level = logging.WARNING if attempt % _WARN_EVERY == 1 else logging.DEBUG
            log.log(
                level,
                "regional unavailable, retrying",
                extra={
                    "path": path,
                    "attempt": attempt,
                    "retry_in": round(delay, 2),
                    "error": problem,
                },
            )
            await trio.sleep(delay)

    async def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        once: bool = False,
        persistent: bool = False,
    ) -> dict[str, Any]:
        """A call with retries and re-registration on 401; returns the JSON object answered.

        ``once``: a change to apply exactly once, however often it is sent (one operation
        id for all its attempts).
        """
        op_id = secrets.token_hex(8) if once else None
        for reauthed in (False, True):
            generation = self._token_generation
            resp = await self._send(method, path, body, op_id, persistent=persistent)
            if resp.status_code == 401:
                ended = _ended_status(resp)
                if ended is not None:
                    raise TaskEndedError(ended, _error_of(resp).message)
                if not reauthed and self._register_body is not None:
                    await self._reauthenticate(generation)
                    continue
            return self._json(resp)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _json(resp: httpx.Response) -> dict[str, Any]:
        if not resp.is_success:
            raise _error_of(resp)
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise AgentAPIError(resp.status_code, "malformed response: not a JSON object")
        return body

    async def _reauthenticate(self, generation: int) -> None:
        async with self._reauth_lock:
            if self._token_generation != generation:
                return  # another task re-registered while we waited: just use its token
            log.warning("regional refused our token; registering again", extra={"sn": self.sn})
            assert self._register_body is not None
            self._token = None
            await self._do_register(self._register_body)

    # ------------------------------------------------------------------ API

    async def _do_register(self, body: dict[str, Any]) -> Registration:
        resp = await self._send("POST", f"{API_PREFIX}/register", body)
        data = self._json(resp)
        task, plan, plan_error = _task_reply(data, resp.status_code)
        token = data.get("agent_token")
        if token is not None and not isinstance(token, str):
            raise AgentAPIError(resp.status_code, "malformed response: agent_token")
        self._token = token or None
        self._token_generation += 1
        self._register_body = body
        return Registration(
            task,
            plan,
            plan_error,
            lease_ttl=_positive(data, "lease_ttl", 30.0),
            heartbeat_interval=_positive(data, "heartbeat_interval", 10.0),
            agent_token=self._token,
        )

    async def register(
        self, mac: str, hardware: Mapping[str, Any], enrollment_secret: str | None = None
    ) -> Registration:
        """``POST /register``: report the hardware and get the task, plan and lease terms."""
        body: dict[str, Any] = {"sn": self.sn, "mac": mac, "hardware": dict(hardware)}
        if enrollment_secret is not None:
            body["enrollment_secret"] = enrollment_secret
        return await self._do_register(body)

    async def reregister(self) -> Registration:
        """Register again with the body of the last registration (a new lease and token).

        For when the regional says our lease is gone while the task is still live.
        """
        if self._register_body is None:
            raise RuntimeError("reregister() before register()")
        return await self._do_register(self._register_body)

    async def get_task(self) -> TaskReply:
        """``GET /{sn}/task``: the task (its status tells the agent about approval) and plan."""
        resp_body = await self._call("GET", f"{self._base}/task")
        task, plan, plan_error = _task_reply(resp_body, 200)
        return TaskReply(task, plan, plan_error)

    async def heartbeat(self) -> Heartbeat:
        """``POST /{sn}/heartbeat``: refresh the agent's lease; returns the task status."""
        body = await self._call("POST", f"{self._base}/heartbeat", {})
        status = body.get("status")
        return Heartbeat(
            status if isinstance(status, str) else "", _positive(body, "lease_ttl", 30.0)
        )

    async def progress(self, step: str, percent: int, message: str) -> None:
        """``POST /{sn}/progress``; a 409 means the task is no longer being installed.

        Reports are retried until the regional answers (never dropped); it answers 200
        (committed to etcd) or 202 (journaled while etcd is away, applied later in order).
        """
        await self._call(
            "POST",
            f"{self._base}/progress",
            {"step": step, "percent": percent, "message": message},
            once=True,
            persistent=True,
        )

    async def logs(self, lines: Sequence[str], level: LogLevel = "INFO") -> None:
        """``POST /{sn}/logs`` with at most 100 lines (a report: retried until answered)."""
        if lines:
            body = {"lines": list(lines), "level": level}
            await self._call("POST", f"{self._base}/logs", body, once=True, persistent=True)

    async def first_boot_credential(self) -> str:
        """``POST /{sn}/first-boot-credential``: the one-time credential the installed
        system presents on its first boot."""
        body = await self._call("POST", f"{self._base}/first-boot-credential", {})
        credential = body.get("credential")
        if not isinstance(credential, str) or not credential:
            raise AgentAPIError(200, "malformed response: no credential")
        return credential

    async def complete(self) -> str:
        """``POST /{sn}/complete`` (a report); returns the status the regional knows."""
        body = await self._call("POST", f"{self._base}/complete", {}, once=True, persistent=True)
        return str(body.get("status", ""))

    async def fail(self, reason: str) -> str:
        """``POST /{sn}/fail`` (a report); returns the status the regional knows."""
        body = await self._call(
            "POST", f"{self._base}/fail", {"reason": reason}, once=True, persistent=True
        )
        return str(body.get("status", ""))
