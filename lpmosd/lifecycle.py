"""The task lifecycle: the state machine and the operations that move a task along it.

Task operations (:func:`approve`, :func:`record_progress`, ...) are pure: they return a
*new* :class:`~lpmosd.documents.Task` and never mutate their input, because they run inside
a read → fn → compare-and-swap loop that may call them several times. They also keep the
task within its size budget (:func:`cap_logs`, :func:`cap_history`).

State machine (anything else raises ConflictError)::

    pending    -> approved, cancelled
    approved   -> installing, cancelled, failed
    installing -> completed, failed, cancelled
    failed     -> approved               (retry; resumes from the first unfinished step)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, Final

from lpmosd.api_requests import CreateTaskRequest, LogLevel, parse_level, parse_step
from lpmosd.documents import (
    MAX_ACTOR_CHARS,
    MAX_HISTORY,
    MAX_HISTORY_BYTES,
    MAX_HISTORY_REASON_CHARS,
    MAX_LOG_BYTES,
    MAX_LOG_LINE_CHARS,
    MAX_LOG_LINES,
    MAX_PROGRESS_MESSAGE_CHARS,
    MAX_PROGRESS_STEPS,
    MAX_TEXT_CHARS,
    Approval,
    ProgressStep,
    StatusChange,
    Task,
    TaskStatus,
)
from lpmosd.errors import ConflictError, ValidationError
from lpmosd.fields import json_len, sanitize_text
from lpmosd.timestamps import format_ts, norm_now

__all__ = [
    "ACTIVE_AGENT",
    "LIVE",
    "TERMINAL",
    "TRANSITIONS",
    "append_logs",
    "approve",
    "cancel",
    "cap_history",
    "cap_logs",
    "check_transition",
    "complete",
    "fail",
    "first_boot",
    "new_task",
    "record_progress",
    "retry",
    "transition",
]

_S = TaskStatus
TRANSITIONS: Final[Mapping[TaskStatus, frozenset[TaskStatus]]] = {
    _S.PENDING: frozenset({_S.APPROVED, _S.CANCELLED}),
    _S.APPROVED: frozenset({_S.INSTALLING, _S.CANCELLED, _S.FAILED}),
    _S.INSTALLING: frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED}),
    _S.FAILED: frozenset({_S.APPROVED}),  # retry
    _S.COMPLETED: frozenset(),
    _S.CANCELLED: frozenset(),
}
#: Finished tasks: they may be deleted, or replaced by a new create.
TERMINAL: Final[frozenset[TaskStatus]] = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED})
#: Statuses in which a task accepts its agent's credentials (enrolment secret, agent token).
LIVE: Final[frozenset[TaskStatus]] = frozenset(TaskStatus) - TERMINAL
#: Statuses in which the agent's lease matters: losing it fails the task.
ACTIVE_AGENT: Final[frozenset[TaskStatus]] = frozenset({_S.APPROVED, _S.INSTALLING})


def check_transition(frm: TaskStatus, to: TaskStatus) -> None:
    """Raise ConflictError(field="status") unless ``frm → to`` is allowed."""
    if to not in TRANSITIONS[frm]:
        raise ConflictError(f"cannot change task status from {frm} to {to}", field="status")


def _actor(actor: str) -> str:
    return sanitize_text(actor, MAX_ACTOR_CHARS)


def cap_logs(logs: tuple[str, ...], dropped: int) -> tuple[tuple[str, ...], int]:
    """Keep the newest lines within MAX_LOG_LINES and MAX_LOG_BYTES; count the rest."""
    keep = 0
    size = 2  # []
    for line in reversed(logs):
        cost = json_len(line) + 1  # the comma
        if keep == MAX_LOG_LINES or size + cost > MAX_LOG_BYTES:
            break
        keep += 1
        size += cost
    if keep == len(logs):
        return logs, dropped
    return logs[len(logs) - keep :], dropped + len(logs) - keep


def cap_history(history: tuple[StatusChange, ...]) -> tuple[StatusChange, ...]:
    """Keep the first entry (creation) and the newest, within MAX_HISTORY and its byte cap."""
    if len(history) <= 1:
        return history
    first, rest = history[0], history[1:]
    size = 2 + first.json_size() + 1
    keep = 0
    for entry in reversed(rest):
        cost = entry.json_size() + 1
        if keep == MAX_HISTORY - 1 or size + cost > MAX_HISTORY_BYTES:
            break
        keep += 1
        size += cost
    if keep == len(rest):
        return history
    return (first, *rest[len(rest) - keep :])


def _with_logs(task: Task, texts: Iterable[str], level: LogLevel, now: datetime) -> Task:
    ts = format_ts(now)
    new = tuple(f"{ts} [{level}] {sanitize_text(t, MAX_LOG_LINE_CHARS)}" for t in texts)
    logs, dropped = cap_logs(task.logs + new, task.logs_dropped)
    return replace(task, logs=logs, logs_dropped=dropped, updated_at=now)


def _transition(
    task: Task,
    to: TaskStatus,
    *,
    now: datetime,
    actor: str,
    reason: str,
    log: str | None = None,
    level: LogLevel = "INFO",
    **changes: Any,
) -> Task:
    check_transition(task.status, to)
    now = norm_now(now)
    actor = _actor(actor)
    reason = sanitize_text(reason, MAX_TEXT_CHARS)
    change = StatusChange(to, now, actor, sanitize_text(reason, MAX_HISTORY_REASON_CHARS))
    if log is None:
        log = f"Status {task.status} -> {to}"
        if actor:
            log += f" by {actor}"
        if reason:
            log += f": {reason}"
    task = replace(
        task, status=to, status_history=cap_history((*task.status_history, change)), **changes
    )
    return _with_logs(task, [log], level, now)


def new_task(req: CreateTaskRequest, *, task_id: str, now: datetime, actor: str) -> Task:
    """A new pending task for ``req``, created by ``actor``."""
    now = norm_now(now)
    actor = _actor(actor)
    task = Task(
        task_id=task_id,
        idc=req.idc,
        sn=req.sn,
        mac=req.mac,
        os_type=req.os_type,
        os_version=req.os_version,
        disk_layout=req.disk_layout,
        network_config=req.network_config,
        ssh_authorized_keys=req.ssh_authorized_keys,
        status=TaskStatus.PENDING,
        status_history=(StatusChange(TaskStatus.PENDING, now, actor),),
        created_at=now,
        updated_at=now,
        created_by=actor,
    )
    return _with_logs(task, [f"Task created for {req.sn}"], "INFO", now)


def transition(task: Task, to: TaskStatus, *, now: datetime, actor: str, reason: str = "") -> Task:
    """Move ``task`` to ``to`` (ConflictError if not allowed), recording history and a log."""
    return _transition(task, TaskStatus(to), now=now, actor=actor, reason=reason)


def approve(task: Task, *, approved_by: str, notes: str = "", now: datetime) -> Task:
    """Approve a pending task (a failed one goes through :func:`retry` instead)."""
    if task.status is not TaskStatus.PENDING:
        raise ConflictError(
            f"cannot change task status from {task.status} to approved: only a pending task "
            "can be approved (retry a failed one)",
            field="status",
        )
    now = norm_now(now)
    approval = Approval(True, _actor(approved_by), now, sanitize_text(notes, MAX_TEXT_CHARS))
    return _transition(
        task, TaskStatus.APPROVED, now=now, actor=approved_by, reason="", approval=approval
    )


def cancel(task: Task, *, now: datetime, actor: str, reason: str = "") -> Task:
    """Cancel a task that has not finished."""
    return _transition(task, TaskStatus.CANCELLED, now=now, actor=actor, reason=reason)


def _first_unfinished(progress: tuple[ProgressStep, ...]) -> str | None:
    return next((p.step for p in progress if p.percent < 100), None)


def retry(task: Task, *, now: datetime, actor: str, reason: str = "") -> Task:
    """Re-approve a failed task; it resumes from its first unfinished step."""
    return _transition(
        task,
        TaskStatus.APPROVED,
        now=now,
        actor=actor,
        reason=reason or "retry",
        resume_from=_first_unfinished(task.progress),
        error=None,
        netboot=True,
    )


def record_progress(
    task: Task,
    step: str,
    percent: int,
    message: str = "",
    *,
    now: datetime,
    actor: str = "agent",
) -> Task:
    """Record ``percent`` for ``step`` (one entry per step, updated in place).

    The first progress on an approved task moves it to installing. A step at 100 % does not
    complete the task; :func:`complete` does. Only a step's start and its reaching 100 %
    are logged, so frequent reports do not push real log lines out of the capped log.
    """
    if task.status not in ACTIVE_AGENT:
        raise ConflictError(
            f"cannot record progress on a task in status {task.status}", field="status"
        )
    parse_step(step)
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ValidationError("percent must be an integer between 0 and 100", field="percent")
    now = norm_now(now)
    entry = ProgressStep(step, percent, now, sanitize_text(message, MAX_PROGRESS_MESSAGE_CHARS))
    index = next((i for i, p in enumerate(task.progress) if p.step == step), None)
    if index is None:
        if len(task.progress) >= MAX_PROGRESS_STEPS:
            raise ValidationError(
                f"a task has at most {MAX_PROGRESS_STEPS} progress steps", field="step"
            )
        progress = (*task.progress, entry)
        log: str | None = f"{step} {'done' if percent >= 100 else 'started'} ({percent}%)"
    else:
        progress = (*task.progress[:index], entry, *task.progress[index + 1 :])
        done_now = percent >= 100 and task.progress[index].percent < 100
        log = f"{step} done ({percent}%)" if done_now else None
    if log is not None and entry.message:
        log += f": {entry.message}"
    if task.status is TaskStatus.APPROVED:
        task = _transition(task, TaskStatus.INSTALLING, now=now, actor=actor, reason="")
    task = replace(task, progress=progress, updated_at=now)
    return task if log is None else _with_logs(task, [log], "INFO", now)


def append_logs(
    task: Task, lines: Iterable[str], *, level: LogLevel = "INFO", now: datetime
) -> Task:
    """Append sanitised lines as ``"<ts> [LEVEL] text"``, keeping the newest within the caps."""
    return _with_logs(task, list(lines), parse_level(level, None), norm_now(now))


def complete(task: Task, *, now: datetime, actor: str = "agent") -> Task:
    """Mark an installing task completed."""
    return _transition(
        task,
        TaskStatus.COMPLETED,
        now=now,
        actor=actor,
        reason="",
        log="Installation completed",
        resume_from=None,
        netboot=False,
    )


def first_boot(task: Task, *, now: datetime, hostname: str = "") -> Task:
    """Record that the installed system booted (once, on a completed task)."""
    if task.status is not TaskStatus.COMPLETED:
        raise ConflictError(
            f"task is {task.status}: only a completed install can report its first boot",
            field="status",
        )
    if task.first_boot_at is not None:
        raise ConflictError("the first boot was already reported", field="first_boot_at")
    now = norm_now(now)
    line = "First boot of the installed system"
    if hostname:
        line += f" (hostname {hostname})"
    return _with_logs(replace(task, first_boot_at=now), [line], "INFO", now)


def _last_step(progress: tuple[ProgressStep, ...]) -> str | None:
    """The most recently updated step (the later one on a timestamp tie)."""
    best: ProgressStep | None = None
    for p in progress:
        if best is None or p.timestamp >= best.timestamp:
            best = p
    return None if best is None else best.step


def fail(task: Task, reason: str, *, now: datetime, actor: str) -> Task:
    """Fail an approved or installing task, keeping ``reason`` in ``error`` and the log."""
    reason = sanitize_text(reason, MAX_TEXT_CHARS) or "no reason given"
    step = _last_step(task.progress)
    at = f" at step {step}" if step else ""
    by = f" by {_actor(actor)}" if actor else ""
    return _transition(
        task,
        TaskStatus.FAILED,
        now=now,
        actor=actor,
        reason=reason,
        log=f"Task failed{at}{by}: {reason}",
        level="ERROR",
        error=reason,
    )
