"""Run one install-plan step: a command (never a shell) or a simulated sleep.

A command step is started in its own session (so its whole process group can be killed),
with stdin closed, stdout and stderr merged into one pipe (so the operator sees the lines in
the order the tool wrote them) and ``LPMOS_*`` variables in its environment. Output lines are
shipped to the regional in batches by :class:`LogShipper`, and mirrored to the agent's own
log at DEBUG level. The step fails on a non-zero exit, a signal, a timeout, or a command that
cannot be started; the process group is killed on timeout and whenever the step is cancelled
(an operator cancel, the agent shutting down).

Progress for the step is reported here too: 0 % at the start, 50 % halfway through a
simulated step, and 100 % on success (never on failure).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from lpmosd._trio_util import open_nursery
from lpmosd.api_requests import MAX_LOG_REQUEST_LINES, LogLevel
from lpmosd.documents import MAX_LOG_LINE_CHARS
from lpmosd.plan import PlaceholderError, PlanStep, render_command

__all__ = [
    "LogShipper",
    "StepReporter",
    "StepResult",
    "run_step",
    "step_env",
]

log = logging.getLogger("lpmosd.agent")

#: Longest unterminated output we buffer before emitting it as a line anyway (a tool that
#: writes a progress bar without newlines must not grow our memory without bound).
_MAX_LINE_BYTES: Final = 16 * 1024
#: Lines kept for the failure reason.
_TAIL_LINES: Final = 5
#: After the command exits: how long we wait for the pipe to reach EOF. Only a process that
#: left our process group (setsid) and kept the pipe open can make us wait this long.
_DRAIN_TIMEOUT: Final = 2.0


class StepReporter(Protocol):
    """Where a step sends its progress and output (the regional client in production)."""

    async def progress(self, step: str, percent: int, message: str) -> None:
        """Report ``percent`` (0-100) done for ``step``."""

    async def logs(self, lines: Sequence[str], level: LogLevel) -> None:
        """Ship a batch of at most 100 output lines."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult:
    """How a step ended. ``reason`` explains a failure; ``tail`` holds the last output lines."""

    ok: bool
    reason: str = ""
    exit_code: int | None = None
    timed_out: bool = False
    duration: float = 0.0
    tail: tuple[str, ...] = ()


class _ResultFactory(Protocol):
    def __call__(
        self, ok: bool, reason: str = "", *, exit_code: int | None = None, timed_out: bool = False
    ) -> StepResult: ...


def step_env(
    values: Mapping[str, str], step: str, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The step's environment: ``base`` (default: ours) plus ``LPMOS_<NAME>`` for each value."""
    env = dict(os.environ if base is None else base)
    for name, value in values.items():
        env[f"LPMOS_{name.upper()}"] = value
    env["LPMOS_STEP"] = step
    return env


def _clean_line(raw: bytes) -> str | None:
    """Decode one output line; None for blank lines (they would waste the task's log budget)."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r")
    if "\r" in text:
        # A progress bar redrawn with CR: keep what a terminal would finally show.
        text = next((seg for seg in reversed(text.split("\r")) if seg.strip()), "")
    text = text.rstrip()
    if not text.strip():
        return None
    if len(text) > MAX_LOG_LINE_CHARS:
        # The regional refuses longer lines outright (400), so cut here.
        text = text[: MAX_LOG_LINE_CHARS - 1] + "…"
    return text


class LogShipper:
    """Batches output lines and sends them: at most one call per ``interval``, or sooner
    when ``batch_lines`` are pending.

    :meth:`add` never blocks, so a slow or restarting regional cannot stall the install
    (a child blocked on a full pipe would just burn its step timeout). Past ``max_pending``
    queued lines the oldest are dropped and a marker line says how many.
    """

    def __init__(
        self,
        send: Callable[[list[str]], Awaitable[None]],
        *,
        interval: float = 0.5,
        batch_lines: int = 50,
        max_pending: int = 10_000,
    ) -> None:
        self._send = send
        self._interval = interval
        self._batch = max(1, min(batch_lines, MAX_LOG_REQUEST_LINES - 1))  # room for a marker
        self._max_pending = max(self._batch, max_pending)
        self._pending: deque[str] = deque()
        self._dropped = 0
        self._closed = False
        self._wakeup = trio.Event()
        self._last_send = -math.inf

    def add(self, line: str) -> None:
        """Queue one line for shipping."""
        if self._closed:
            raise RuntimeError("LogShipper is closed")
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self._dropped += 1
        self._pending.append(line)
        self._wakeup.set()

    def close(self) -> None:
        """No more lines: :meth:`run` sends what is pending and returns."""
        self._closed = True
        self._wakeup.set()

    async def _wait(self) -> None:
        await self._wakeup.wait()
        self._wakeup = trio.Event()

    async def run(self) -> None:
        """Ship batches until :meth:`close` has been called and everything is sent."""
        while True:
            if not self._pending:
                if self._closed:
                    return
                await self._wait()
                continue
            if len(self._pending) < self._batch and not self._closed:
                with trio.move_on_at(self._last_send + self._interval):
                    while len(self._pending) < self._batch and not self._closed:
                        await self._wait()
            batch = [self._pending.popleft() for _ in range(min(self._batch, len(self._pending)))]
            if self._dropped:
                batch.insert(0, f"[lpmosd agent: {self._dropped} output lines dropped]")
                self._dropped = 0
            self._last_send = trio.current_time()
            await self._send(batch)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # ProcessLookupError: the group is gone already.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _pump(
    stream: trio.abc.ReceiveStream, on_line: Callable[[str], None], done: trio.Event
) -> None:
    """Split ``stream`` into lines and hand each to ``on_line``; set ``done`` at EOF."""
    buf = bytearray()

    def emit(raw: bytes) -> None:
        line = _clean_line(raw)
        if line is not None:
            on_line(line)

    try:
        while chunk := await stream.receive_some(65536):
            buf += chunk
            while (nl := buf.find(b"\n")) >= 0:
                emit(bytes(buf[:nl]))
                del buf[: nl + 1]
            if len(buf) > _MAX_LINE_BYTES:
                emit(bytes(buf))
                buf.clear()
        if buf:
            emit(bytes(buf))
    finally:
        done.set()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}"


async def _run_command(
    step: PlanStep,
    argv: tuple[str, ...],
    env: Mapping[str, str],
    cwd: str | None,
    on_line: Callable[[str], None],
    kill_grace: float,
) -> tuple[int | None, bool, str]:
    """Run ``argv`` to completion or timeout; returns (exit code, timed out, error)."""
    try:
        proc = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: a timeout kills the whole tree
            env=dict(env),
            cwd=cwd,
        )
    except OSError as exc:
        return None, False, f"cannot start {argv[0]!r}: {exc.strerror or exc}"
    assert proc.stdout is not None
    log.info("step command started", extra={"step": step.name, "argv": argv, "pid": proc.pid})
    timed_out = False
    eof = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, proc.stdout, on_line, eof)
            with trio.move_on_after(step.timeout) as timer:
                await proc.wait()
            if timer.cancelled_caught:
                timed_out = True
                log.warning(
                    "step timed out; killing its process group",
                    extra={"step": step.name, "timeout": step.timeout, "pid": proc.pid},
                )
                _signal_group(proc.pid, signal.SIGTERM)
                with trio.move_on_after(kill_grace):
                    await proc.wait()
            # Children the command left behind would hold the pipe open (and outlive the
            # step): a step owns its process group, so end it before reading to EOF.
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            with trio.move_on_after(_DRAIN_TIMEOUT):
                await eof.wait()
            nursery.cancel_scope.cancel()  # an escapee (setsid) still holds the pipe
    finally:
        with trio.CancelScope(shield=True):
            # Reached with the child still running only when we are cancelled (operator
            # cancel, agent shutdown): nothing of the step may outlive it.
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            await proc.stdout.aclose()
    return proc.returncode, timed_out, ""


async def run_step(
    step: PlanStep,
    values: Mapping[str, str],
    reporter: StepReporter,
    *,
    flush_interval: float = 0.5,
    batch_lines: int = 50,
    kill_grace: float = 5.0,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> StepResult:
    """Run ``step`` with placeholders and ``LPMOS_*`` variables taken from ``values``.

    ``values`` maps placeholder names (``sn``, ``mac``, ``os_type``, ...) to the task's
    values. ``env`` is the base environment (default: the agent's). Errors raised by the
    reporter (the task was cancelled, the regional is gone for good) propagate after the
    step's processes are killed; everything about the step itself is in the result.
    """
    started = trio.current_time()
    tail: deque[str] = deque(maxlen=_TAIL_LINES)

    async def send(lines: list[str]) -> None:
        await reporter.logs(lines, "INFO")

    shipper = LogShipper(send, interval=flush_interval, batch_lines=batch_lines)

    def on_line(line: str) -> None:
        tail.append(line)
        log.debug("step output", extra={"step": step.name, "line": line})
        shipper.add(line)

    def result(
        ok: bool, reason: str = "", *, exit_code: int | None = None, timed_out: bool = False
    ) -> StepResult:
        return StepResult(
            ok=ok,
            reason=reason,
            exit_code=exit_code,
            timed_out=timed_out,
            duration=trio.current_time() - started,
            tail=tuple(tail),
        )

    await reporter.progress(step.name, 0, "started")
    outcome: StepResult
    async with open_nursery() as nursery:
        nursery.start_soon(shipper.run)
        try:
            if step.simulate is not None:
                outcome = await _simulate(step, reporter, shipper, result)
            elif not step.command:
                outcome = result(False, "step has neither a command nor simulate")
            else:
                try:
                    argv = render_command(step.command, values)
                except PlaceholderError as exc:
                    outcome = result(False, str(exc))
                else:
                    code, timed_out, error = await _run_command(
                        step, argv, step_env(values, step.name, env), cwd, on_line, kill_grace
                    )
                    if error:
                        outcome = result(False, error)
                    elif timed_out:
                        outcome = result(
                            False,
                            f"timed out after {step.timeout:g}s",
                            exit_code=code,
                            timed_out=True,
                        )
                    elif code != 0:
                        assert code is not None
                        outcome = result(False, _describe_exit(code), exit_code=code)
                    else:
                        outcome = result(True, exit_code=0)
        finally:
            shipper.close()  # the nursery now waits for the last batch
    if outcome.ok:
        await reporter.progress(step.name, 100, f"done in {outcome.duration:.1f}s")
    fields: dict[str, object] = {"step": step.name, "duration": round(outcome.duration, 3)}
    if outcome.exit_code is not None:
        fields["exit_code"] = outcome.exit_code
    if outcome.ok:
        log.info("step finished", extra=fields)
    else:
        log.warning("step failed", extra={**fields, "reason": outcome.reason})
    return outcome


async def _simulate(
    step: PlanStep,
    reporter: StepReporter,
    shipper: LogShipper,
    result: _ResultFactory,
) -> StepResult:
    """A demo step: sleep ``simulate`` seconds (50 % reported halfway), touch nothing."""
    assert step.simulate is not None
    seconds = step.simulate
    shipper.add(f"simulating step {step.name} for {seconds:g}s (no command is run)")
    deadline = trio.current_time() + step.timeout
    with trio.move_on_at(deadline) as first:
        await trio.sleep(seconds / 2)
    if not first.cancelled_caught:
        await reporter.progress(step.name, 50, "simulating")
        with trio.move_on_at(deadline) as second:
            await trio.sleep(seconds / 2)
        if not second.cancelled_caught:
            return result(True)
    return result(False, f"timed out after {step.timeout:g}s", timed_out=True)
