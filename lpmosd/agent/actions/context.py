"""What a built-in step gets: the task's values, the reporter, tools, the target disk."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from lpmosd.documents import MAX_LOG_LINE_CHARS
from lpmosd.plan import PlanStep

if TYPE_CHECKING:
    from lpmosd.agent.runner import StepReporter, StepResult

__all__ = ["ActionContext", "ActionError", "run_action"]

log = logging.getLogger("lpmosd.agent")

#: Where the new system is mounted while it is installed.
DEFAULT_TARGET: Final = Path("/mnt/target")


class ActionError(Exception):
    """A built-in step failed; the message is the task's failure reason."""


@dataclass(kw_only=True)
class ActionContext:
    """Everything a built-in step needs.

    ``values`` are the task's placeholders (``sn``, ``mac``, ``disk_layout``, ...);
    ``image`` is the plan's OS image path under the regional's ``/boot/files/``;
    ``sysroot`` is where /sys is (tests point it at a fake tree); ``disk`` forces the target
    disk (tests: a loop device) instead of the ``disk_layout`` rule.
    """

    regional_url: str
    reporter: StepReporter
    values: Mapping[str, str]
    ssh_authorized_keys: Sequence[str] = ()
    image: str = ""
    ca_file: Path | None = None
    sysroot: Path = Path("/")
    dev: Path = Path("/dev")
    target: Path = DEFAULT_TARGET
    disk: Path | None = None
    #: Asks the regional for the first-boot credential (post_install).
    first_boot_credential: Callable[[], Awaitable[str]] | None = None
    step: str = ""
    _last_percent: int = field(default=-1, repr=False)

    async def progress(self, percent: int, message: str = "") -> None:
        """Report ``percent`` of the current step (only when it moved)."""
        percent = max(0, min(99, percent))  # 100 only once the step succeeded
        if percent != self._last_percent:
            self._last_percent = percent
            await self.reporter.progress(self.step, percent, message)

    async def say(self, *lines: str) -> None:
        """Log lines to the task."""
        cut = [
            ln if len(ln) <= MAX_LOG_LINE_CHARS else ln[: MAX_LOG_LINE_CHARS - 1] + "…"
            for ln in lines
            if ln.strip()
        ]
        for i in range(0, len(cut), 90):
            await self.reporter.logs(cut[i : i + 90], "INFO")

    async def run(
        self,
        argv: Sequence[str | Path],
        *,
        input: bytes | None = None,
        check: bool = True,
        quiet: bool = False,
    ) -> str:
        """Run a tool (never a shell); its output goes to the task's log. Returns stdout+err."""
        args = [str(a) for a in argv]
        env = {**os.environ, "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
        try:
            proc = await trio.run_process(
                args,
                stdin=input if input is not None else subprocess.DEVNULL,
                capture_stdout=True,
                stderr=subprocess.STDOUT,
                check=False,
                env=env,
            )
        except OSError as exc:
            raise ActionError(f"cannot run {args[0]}: {exc.strerror or exc}") from None
        out = proc.stdout.decode("utf-8", errors="replace")
        lines = [ln.rstrip() for ln in out.replace("\r", "\n").splitlines()]
        if not quiet or proc.returncode != 0:
            await self.say(f"$ {' '.join(args)}", *lines)
        if check and proc.returncode != 0:
            tail = "; ".join(ln for ln in lines[-3:] if ln.strip())
            raise ActionError(f"{args[0]} exited with {proc.returncode}: {tail}")
        return out


async def run_action(step: PlanStep, ctx: ActionContext) -> StepResult:
    """Run the built-in step ``step.action`` with a timeout; a failure becomes the result."""
    from lpmosd.agent.actions import steps
    from lpmosd.agent.runner import StepResult

    started = trio.current_time()
    ctx.step = step.name
    ctx._last_percent = -1

    def result(ok: bool, reason: str = "", *, timed_out: bool = False) -> StepResult:
        return StepResult(
            ok=ok, reason=reason, timed_out=timed_out, duration=trio.current_time() - started
        )

    fn = steps.ACTIONS.get(step.action or "")
    if fn is None:
        return result(False, f"unknown built-in step {step.action!r}")
    await ctx.reporter.progress(step.name, 0, "started")
    with trio.move_on_after(step.timeout) as timer:
        try:
            await fn(ctx)
        except ActionError as exc:
            log.error("step failed", extra={"step": step.name, "reason": str(exc)})
            return result(False, str(exc))
    if timer.cancelled_caught:
        return result(False, f"timed out after {step.timeout:g}s", timed_out=True)
    outcome = result(True)
    await ctx.reporter.progress(step.name, 100, f"done in {outcome.duration:.1f}s")
    return outcome
