"""The agent's life: facts → register → heartbeat → wait for approval → run the plan → report.

Exit codes of :func:`run_agent`:

- ``0`` (:data:`EXIT_OK`): every step ran and the task was completed.
- ``1`` (:data:`EXIT_FAILED`): a step failed (the task was failed with the reason), or the
  regional failed the task meanwhile (e.g. it lost our heartbeat).
- ``2`` (:data:`EXIT_ERROR`): the agent could not do its job at all: no MAC to register
  with, the regional refused registration (bad secret, bad facts), or it stayed unreachable
  past the retry budget.
- ``3`` (:data:`EXIT_CANCELLED`): the task was cancelled (or deleted) by an operator; the
  running step was killed.

State lives in memory (:class:`_Agent`): the current step keeps running while the regional
restarts, each call retrying until it answers again, so the install continues where it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx
import trio

from lpmosd._trio_util import open_nursery
from lpmosd.agent.actions import ActionContext, run_action
from lpmosd.agent.client import (
    AgentAPIError,
    AgentClient,
    RegionalUnavailableError,
    Registration,
    RetryPolicy,
    TaskEndedError,
    TaskReply,
)
from lpmosd.agent.facts import HardwareFacts, collect_facts
from lpmosd.agent.runner import StepResult, run_step
from lpmosd.documents import MAX_LOG_LINE_CHARS
from lpmosd.plan import Plan

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_ERROR",
    "EXIT_FAILED",
    "EXIT_OK",
    "AgentOptions",
    "run_agent",
]

log = logging.getLogger("lpmosd.agent")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_ERROR: Final = 2
EXIT_CANCELLED: Final = 3

_RUNNABLE: Final = frozenset({"approved", "installing"})
_MAX_REASON: Final = 2000  # the regional's limit on a failure reason


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentOptions:
    """Everything :func:`run_agent` needs; the CLI fills it from flags.

    ``register_timeout`` bounds how long the agent waits for its task to exist (404) or to
    become registrable (409); ``None`` waits forever, as a freshly booted machine should.
    ``facts`` skips hardware collection (tests); ``transport`` replaces the network (tests).
    """

    #: One URL or several (an IDC's active and standby regionals).
    regional_url: str | tuple[str, ...]
    sn: str
    mac: str | None = None
    enrollment_secret: str | None = field(default=None, repr=False)
    #: CA bundle that verifies an https:// regional (None: the system's CAs).
    ca_file: Path | None = None
    sysroot: Path = Path("/")
    poll_interval: float = 2.0
    register_retry_interval: float = 10.0
    register_timeout: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    request_timeout: float = 10.0
    log_flush_interval: float = 0.5
    log_batch_lines: int = 50
    kill_grace: float = 5.0
    work_dir: str | None = None
    #: The built-in plans' target disk instead of their ``disk_layout`` rule (tests).
    disk: Path | None = None
    facts: HardwareFacts | None = None
    transport: httpx.AsyncBaseTransport | None = field(default=None, repr=False, compare=False)


class _Stop(Exception):
    """The task is no longer ours to run; ``code`` is the exit code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


async def _register(
    client: AgentClient, opts: AgentOptions, mac: str, facts: HardwareFacts
) -> Registration:
    """Register, retrying slowly while the task does not exist (404) or is not live (409).

    Raises AgentAPIError for refusals that waiting cannot fix (400, 401, 403, ...), and
    RegionalUnavailableError when ``register_timeout`` passes.
    """
    deadline = (
        None if opts.register_timeout is None else trio.current_time() + opts.register_timeout
    )
    attempt = 0
    while True:
        attempt += 1
        try:
            reg = await client.register(mac, facts.to_dict(), opts.enrollment_secret)
        except RegionalUnavailableError as exc:
            why = str(exc)
        except AgentAPIError as exc:
            if exc.status not in (404, 409):
                raise
            why = str(exc)
        else:
            log.info(
                "registered",
                extra={
                    "sn": opts.sn,
                    "mac": mac,
                    "task_id": reg.task.task_id,
                    "status": reg.task.status,
                    "heartbeat_interval": reg.heartbeat_interval,
                    "token": reg.agent_token is not None,
                },
            )
            return reg
        if deadline is not None and trio.current_time() >= deadline:
            raise RegionalUnavailableError(0, f"not registered after {attempt} attempts: {why}")
        # 404: the operator has not created the task yet; 409: wrong MAC or finished task,
        # which an operator can fix. Either way: wait and ask again, loudly now and then.
        log.log(
            logging.WARNING if attempt % 6 == 1 else logging.INFO,
            "cannot register yet; will retry",
            extra={"sn": opts.sn, "attempt": attempt, "error": why},
        )
        await trio.sleep(opts.register_retry_interval)


def _failure_reason(step: str, result: StepResult) -> str:
    reason = f"step {step} failed: {result.reason}"
    if result.tail:
        reason += "; last output: " + " | ".join(result.tail[-3:])
    if len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 1] + "…"
    return reason


class _Agent:
    """One registered agent: its client, task, plan, and where it is in the plan."""

    def __init__(self, opts: AgentOptions, client: AgentClient, reg: Registration) -> None:
        self.opts = opts
        self.client = client
        self.reply: TaskReply = reg
        self.heartbeat_interval = reg.heartbeat_interval
        self.current_step: str | None = None
        self.finishing = False  # complete/fail under way: the heartbeat must not interrupt it
        self.stop: _Stop | None = None
        self.work_scope = trio.CancelScope()

    # ------------------------------------------------------------------ stopping

    def _request_stop(self, stop: _Stop) -> None:
        if self.stop is None and not self.finishing:
            log.warning(
                "stopping: task is no longer ours to run",
                extra={"reason": stop.reason, "step": self.current_step, "exit_code": stop.code},
            )
            self.stop = stop
            self.work_scope.cancel()

    async def _why_stopped(self, error: AgentAPIError) -> _Stop:
        """Turn a 404/409 from the regional into the right exit, by looking at the task."""
        if error.status == 404:
            return _Stop(EXIT_CANCELLED, f"task is gone: {error.message}")
        try:
            status = await self._status_after(error)
        except AgentAPIError as exc:
            return _Stop(EXIT_CANCELLED, f"{error.message} (task unreadable: {exc.message})")
        if status == "failed":
            return _Stop(EXIT_FAILED, "the regional failed the task")
        return _Stop(EXIT_CANCELLED, f"task is {status or 'unknown'}: {error.message}")

    async def _status_after(self, error: AgentAPIError) -> str:
        """The task's status after a refusal: told by a revoked token, else asked for."""
        if isinstance(error, TaskEndedError):
            return error.task_status
        return (await self.client.get_task()).task.status

    # ------------------------------------------------------------------ heartbeat

    async def _heartbeat_conflict(self, error: AgentAPIError) -> None:
        """A 409 on heartbeat: our lease is gone. Register again if the task is still live
        (e.g. the regional was down past the lease TTL while we waited for approval);
        otherwise the task ended without us and we stop."""
        try:
            status = await self._status_after(error)
        except AgentAPIError as exc:
            log.error("heartbeat refused", extra={"error": str(error), "task_error": str(exc)})
            return
        if status not in _RUNNABLE | {"pending"}:
            self._request_stop(await self._why_stopped(error))
            return
        log.warning("agent lease lost; registering again", extra={"error": error.message})
        try:
            reg = await self.client.reregister()
        except AgentAPIError as exc:
            log.error("re-registration failed", extra={"error": str(exc)})
            return
        self.heartbeat_interval = reg.heartbeat_interval

    async def heartbeat_loop(self) -> None:
        """Heartbeat every ``heartbeat_interval`` until cancelled; never raises."""
        while True:
            next_beat = trio.current_time() + self.heartbeat_interval
            try:
                hb = await self.client.heartbeat()
            except RegionalUnavailableError as exc:
                log.error("heartbeat failed", extra={"error": str(exc)})
            except AgentAPIError as exc:
                if exc.status == 409:
                    await self._heartbeat_conflict(exc)
                elif exc.status == 404:
                    self._request_stop(await self._why_stopped(exc))
                else:
                    log.error("heartbeat refused", extra={"error": str(exc)})
            else:
                if hb.status == "cancelled":
                    self._request_stop(_Stop(EXIT_CANCELLED, "cancelled by an operator"))
                elif hb.status == "failed":
                    self._request_stop(_Stop(EXIT_FAILED, "the regional failed the task"))
            await trio.sleep_until(next_beat)

    # ------------------------------------------------------------------ the work

    async def _wait_for_approval(self) -> TaskReply:
        reply = self.reply
        logged = False
        while reply.task.status not in _RUNNABLE:
            status = reply.task.status
            if status == "cancelled":
                raise _Stop(EXIT_CANCELLED, "cancelled by an operator")
            if status == "failed":
                raise _Stop(EXIT_FAILED, "the task is failed")
            if status == "completed":
                raise _Stop(EXIT_CANCELLED, "the task is already completed")
            if not logged:
                log.info("waiting for approval", extra={"status": status})
                logged = True
            await trio.sleep(self.opts.poll_interval)
            try:
                reply = await self.client.get_task()
            except AgentAPIError as exc:
                if exc.status in (404, 409):
                    raise await self._why_stopped(exc) from None
                raise
        log.info("task approved", extra={"status": reply.task.status})
        return reply

    def _steps_to_run(self, plan: Plan, reply: TaskReply) -> list[int]:
        names = plan.step_names
        start = 0
        resume = reply.task.resume_from
        if resume is not None:
            if resume in names:
                start = names.index(resume)
            else:
                log.warning(
                    "resume_from is not a step of the plan; starting at the top",
                    extra={"resume_from": resume, "plan": plan.os_type},
                )
        done = reply.task.progress
        todo = [i for i in range(start, len(names)) if done.get(names[i], 0) < 100]
        skipped = [names[i] for i in range(len(names)) if i not in todo]
        if skipped:
            log.info("skipping steps already done", extra={"steps": skipped})
        return todo

    async def _finish(self, *, reason: str | None) -> int:
        """Report complete (``reason`` None) or fail; a 409 means someone got there first."""
        self.finishing = True
        try:
            if reason is None:
                await self.client.complete()
                log.info("install completed")
                return EXIT_OK
            await self.client.fail(reason)
            log.error("install failed", extra={"reason": reason})
            return EXIT_FAILED
        except AgentAPIError as exc:
            if exc.status not in (404, 409):
                raise
            try:
                status = await self._status_after(exc)
            except AgentAPIError:
                status = ""
            # Our earlier attempt may have landed (its answer lost in a regional restart).
            if reason is None and status == "completed":
                return EXIT_OK
            if reason is not None and status == "failed":
                return EXIT_FAILED
            raise _Stop(
                EXIT_CANCELLED if status != "failed" else EXIT_FAILED,
                f"task is {status or 'gone'}: {exc.message}",
            ) from None

    async def _fail_quietly(self, reason: str) -> None:
        """Best effort: fail the task so the operator sees why instead of waiting for the
        lease to run out (an unexpected refusal, e.g. a 400 on progress)."""
        self.finishing = True
        try:
            await self.client.fail(reason[:_MAX_REASON])
        except AgentAPIError as exc:
            log.warning("could not fail the task", extra={"error": str(exc)})

    def _action_context(
        self, plan: Plan, reply: TaskReply, values: dict[str, str]
    ) -> ActionContext:
        return ActionContext(
            regional_url=self.client.regional_url,
            reporter=self.client,
            values=values,
            ssh_authorized_keys=reply.task.ssh_authorized_keys,
            image=plan.image,
            ca_file=self.opts.ca_file,
            sysroot=self.opts.sysroot,
            disk=self.opts.disk,
            first_boot_credential=self.client.first_boot_credential,
        )

    async def work(self) -> int:
        """Wait for approval and run the plan; returns the exit code or raises _Stop."""
        reply = await self._wait_for_approval()
        self.reply = reply
        if reply.plan is None:
            why = reply.plan_error or f"no install plan for os_type {reply.task.os_type!r}"
            return await self._finish(reason=f"cannot install: {why}")
        plan = reply.plan
        todo = self._steps_to_run(plan, reply)
        values = reply.task.placeholders()
        values["sn"] = values["sn"] or self.opts.sn
        log.info(
            "running plan",
            extra={"plan": plan.os_type, "steps": [plan.steps[i].name for i in todo]},
        )
        if todo:
            running = ", ".join(plan.steps[i].name for i in todo)
            await self.client.logs(
                [f"agent: plan {plan.os_type}: running {running}"],
                "INFO",
            )
        for i in todo:
            step = plan.steps[i]
            self.current_step = step.name
            if step.action is not None:
                result = await run_action(step, self._action_context(plan, reply, values))
            else:
                result = await run_step(
                    step,
                    values,
                    self.client,
                    flush_interval=self.opts.log_flush_interval,
                    batch_lines=self.opts.log_batch_lines,
                    kill_grace=self.opts.kill_grace,
                    cwd=self.opts.work_dir,
                )
            if not result.ok:
                reason = _failure_reason(step.name, result)
                await self.client.logs([reason[:MAX_LOG_LINE_CHARS]], "ERROR")
                return await self._finish(reason=reason)
        self.current_step = None
        return await self._finish(reason=None)

    async def run(self) -> int:
        """Heartbeat in the background while :meth:`work` runs; returns the exit code."""
        code = EXIT_ERROR
        async with open_nursery() as nursery:
            nursery.start_soon(self.heartbeat_loop)
            try:
                with self.work_scope:
                    code = await self.work()
            except _Stop as stop:
                self.stop = self.stop or stop
            except AgentAPIError as exc:
                if isinstance(exc, RegionalUnavailableError) or exc.status not in (404, 409):
                    log.error("giving up", extra={"error": str(exc), "step": self.current_step})
                    code = EXIT_ERROR
                    if not isinstance(exc, RegionalUnavailableError) and not self.finishing:
                        await self._fail_quietly(f"agent error: {exc}")
                else:
                    # A progress or log call refused: the task left approved/installing.
                    self.stop = self.stop or await self._why_stopped(exc)
            nursery.cancel_scope.cancel()
        if self.stop is not None:
            log.warning(
                "agent stopped",
                extra={
                    "reason": self.stop.reason,
                    "exit_code": self.stop.code,
                    "step": self.current_step,
                },
            )
            return self.stop.code
        return code


async def run_agent(
    opts: AgentOptions, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> int:
    """Run the agent to the end of its task; returns the process exit code (module doc).

    ``task_status.started()`` is called once the agent is registered, so
    ``await nursery.start(run_agent, opts)`` returns when the regional knows the machine.
    """
    log.info("agent starting", extra={"sn": opts.sn, "regional_url": opts.regional_url})
    facts = opts.facts
    if facts is None:
        facts = await trio.to_thread.run_sync(collect_facts, opts.sysroot)
    mac = opts.mac or facts.default_mac
    if mac is None:
        log.error("no network interface with a MAC address; pass --mac")
        return EXIT_ERROR
    async with AgentClient(
        opts.regional_url,
        opts.sn,
        retry=opts.retry,
        request_timeout=opts.request_timeout,
        transport=opts.transport,
        ca_file=opts.ca_file,
    ) as client:
        try:
            reg = await _register(client, opts, mac, facts)
        except AgentAPIError as exc:
            log.error(
                "registration refused",
                extra={"error": exc.message, "field": exc.field, "status": exc.status},
            )
            return EXIT_ERROR
        task_status.started()
        return await _Agent(opts, client, reg).run()
