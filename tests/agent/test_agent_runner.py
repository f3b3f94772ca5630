"""The step runner with real subprocesses (and simulated steps on a mock clock)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from lpmosd.agent.runner import (
    LogShipper,
    run_step,
    step_env,
)
from lpmosd.api_requests import LogLevel
from lpmosd.plan import PlaceholderError, PlanStep, render_command

VALUES = {
    "task_id": "task-001",
    "idc": "dc1",
    "sn": "sn-001",
    "mac": "00:1a:2b:3c:4d:5e",
    "os_type": "Ubuntu 22.04",
    "os_version": "22.04",
    "disk_layout": "auto",
    "network_config": "dhcp",
}


class Recorder:
    """A StepReporter that remembers everything."""

    def __init__(self) -> None:
        self.progress_calls: list[tuple[str, int, str]] = []
        self.batches: list[tuple[list[str], LogLevel, float]] = []

    async def progress(self, step: str, percent: int, message: str) -> None:
        self.progress_calls.append((step, percent, message))

    async def logs(self, lines: Sequence[str], level: LogLevel) -> None:
        self.batches.append((list(lines), level, trio.current_time()))

    @property
    def lines(self) -> list[str]:
        return [line for batch, _, _ in self.batches for line in batch]

    @property
    def percents(self) -> list[int]:
        return [p for _, p, _ in self.progress_calls]


def sh(script: str, *, name: str = "step", timeout: float = 10) -> PlanStep:
    return PlanStep(name=name, command=("/bin/sh", "-c", script), timeout=timeout)


def _gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie left for a non-reaping init counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def _wait_gone(pid: int) -> None:
    with trio.fail_after(5):
        while not _gone(pid):  # noqa: ASYNC110 -- nothing to wait on but /proc
            await trio.sleep(0.02)


# ------------------------------------------------------------------------ rendering


def test_render_fills_placeholders_without_a_shell() -> None:
    values = dict(VALUES, sn="a b; rm -rf /")
    argv = render_command(
        ["install", "--sn={sn}", "{os_type}", "{{literal}}", "{mac}{idc}"], values
    )
    assert argv == (
        "install",
        "--sn=a b; rm -rf /",
        "Ubuntu 22.04",
        "{literal}",
        "00:1a:2b:3c:4d:5edc1",
    )


@pytest.mark.parametrize(
    "arg", ["{nope}", "{sn.__class__}", "{sn[0]}", "{sn!r}", "{sn:>10}", "{}", "{0}", "x}", "{x"]
)
def test_render_refuses_anything_but_known_names(arg: str) -> None:
    with pytest.raises(PlaceholderError, match=r"command\[1\]"):
        render_command(["ok", arg], VALUES)


def test_step_env() -> None:
    env = step_env(VALUES, "partitioning", {"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["LPMOS_SN"] == "sn-001"
    assert env["LPMOS_OS_TYPE"] == "Ubuntu 22.04"
    assert env["LPMOS_NETWORK_CONFIG"] == "dhcp"
    assert env["LPMOS_STEP"] == "partitioning"


# ----------------------------------------------------------------------- commands


async def test_output_lines_are_streamed_in_order() -> None:
    rec = Recorder()
    script = "echo one; echo two >&2; printf 'three\\r\\n\\n   \\n'; printf 'no newline'"
    result = await run_step(sh(script), VALUES, rec)
    assert result.ok and result.exit_code == 0
    assert rec.lines == ["one", "two", "three", "no newline"]
    assert {level for _, level, _ in rec.batches} == {"INFO"}
    assert rec.percents == [0, 100]
    assert result.tail == ("one", "two", "three", "no newline")


async def test_placeholders_and_env_reach_the_command() -> None:
    rec = Recorder()
    step = PlanStep(
        name="check",
        command=("/bin/sh", "-c", 'echo "arg=$1 env=$LPMOS_SN step=$LPMOS_STEP"', "x", "{os_type}"),
        timeout=10,
    )
    result = await run_step(step, VALUES, rec)
    assert result.ok
    assert rec.lines == ["arg=Ubuntu 22.04 env=sn-001 step=check"]


async def test_batches_are_bounded() -> None:
    rec = Recorder()
    result = await run_step(
        sh("i=0; while [ $i -lt 230 ]; do echo line$i; i=$((i+1)); done"),
        VALUES,
        rec,
        flush_interval=0.2,
        batch_lines=50,
    )
    assert result.ok
    assert rec.lines == [f"line{i}" for i in range(230)]
    assert all(len(batch) <= 50 for batch, _, _ in rec.batches)
    assert len(rec.batches) <= 8


async def test_long_lines_are_cut_for_the_regional() -> None:
    rec = Recorder()
    result = await run_step(
        sh(f"{sys.executable} -c \"print('x' * 5000); print('y' * 30000, end='')\""),
        VALUES,
        rec,
    )
    assert result.ok
    assert all(len(line) <= 2000 for line in rec.lines)
    assert rec.lines[0].startswith("xxx") and rec.lines[0].endswith("…")
    assert rec.lines[1].startswith("yyy")


async def test_failing_command() -> None:
    rec = Recorder()
    result = await run_step(sh("echo boom; exit 3"), VALUES, rec)
    assert not result.ok
    assert result.exit_code == 3
    assert result.reason == "exit code 3"
    assert result.tail == ("boom",)
    assert rec.percents == [0]  # never 100 on failure
    assert rec.lines == ["boom"]


async def test_command_killed_by_signal() -> None:
    result = await run_step(sh("kill -9 $$"), VALUES, Recorder())
    assert not result.ok
    assert result.reason == "killed by SIGKILL"


async def test_command_not_found() -> None:
    step = PlanStep(name="x", command=("/nonexistent/installer", "{sn}"), timeout=5)
    result = await run_step(step, VALUES, Recorder())
    assert not result.ok
    assert "cannot start '/nonexistent/installer'" in result.reason


async def test_bad_placeholder_fails_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    step = PlanStep(name="x", command=("touch", str(marker), "{secret}"), timeout=5)
    result = await run_step(step, VALUES, Recorder())
    assert not result.ok
    assert "unknown placeholder {secret}" in result.reason
    assert not marker.exists()


async def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    rec = Recorder()
    started = trio.current_time()
    result = await run_step(
        sh(f"echo started; sleep 30 & echo $! > {pidfile}; wait", timeout=0.5),
        VALUES,
        rec,
        kill_grace=1,
    )
    assert trio.current_time() - started < 5
    assert not result.ok and result.timed_out
    assert result.reason == "timed out after 0.5s"
    assert rec.lines == ["started"]
    await _wait_gone(int(pidfile.read_text()))


async def test_timeout_escalates_to_sigkill() -> None:
    started = trio.current_time()
    result = await run_step(
        sh("trap '' TERM; echo ready; while :; do sleep 0.05; done", timeout=0.3),
        VALUES,
        Recorder(),
        kill_grace=0.3,
    )
    assert result.timed_out
    assert result.exit_code == -9
    assert trio.current_time() - started < 3


async def test_leftover_background_children_are_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    started = trio.current_time()
    result = await run_step(sh(f"sleep 30 & echo $! > {pidfile}; echo done"), VALUES, Recorder())
    assert result.ok
    assert trio.current_time() - started < 3  # did not wait for the orphan's pipe
    await _wait_gone(int(pidfile.read_text()))


async def test_cancellation_kills_the_step(tmp_path: Path) -> None:
    pidfile = tmp_path / "step.pid"
    with trio.move_on_after(0.5) as scope:
        await run_step(sh(f"echo $$ > {pidfile}; exec sleep 30"), VALUES, Recorder())
    assert scope.cancelled_caught
    await _wait_gone(int(pidfile.read_text()))


async def test_reporter_error_kills_the_step(tmp_path: Path) -> None:
    pidfile = tmp_path / "step.pid"

    class Refusing(Recorder):
        async def logs(self, lines: Sequence[str], level: LogLevel) -> None:
            raise RuntimeError("409: task cancelled")

    with pytest.raises(RuntimeError, match="409"):
        await run_step(sh(f"echo $$ > {pidfile}; echo hi; exec sleep 30"), VALUES, Refusing())
    await _wait_gone(int(pidfile.read_text()))


async def test_work_dir(tmp_path: Path) -> None:
    rec = Recorder()
    result = await run_step(sh("pwd -P"), VALUES, rec, cwd=str(tmp_path))
    assert result.ok
    assert rec.lines == [str(tmp_path)]


# ----------------------------------------------------------------------- simulate


async def test_simulated_step(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    step = PlanStep(name="packages", command=(), timeout=60, simulate=10)
    started = trio.current_time()
    result = await run_step(step, VALUES, rec)
    assert result.ok
    assert trio.current_time() - started == pytest.approx(10)
    assert [(s, p) for s, p, _ in rec.progress_calls] == [
        ("packages", 0),
        ("packages", 50),
        ("packages", 100),
    ]
    assert rec.lines == ["simulating step packages for 10s (no command is run)"]


async def test_simulated_step_times_out(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    step = PlanStep(name="slow", timeout=3, simulate=10)
    result = await run_step(step, VALUES, rec)
    assert not result.ok and result.timed_out
    assert rec.percents == [0]


async def test_step_without_command() -> None:
    result = await run_step(PlanStep(name="empty", timeout=5), VALUES, Recorder())
    assert not result.ok
    assert "neither a command nor simulate" in result.reason


# ---------------------------------------------------------------------- the shipper


async def test_shipper_rate_and_batch_size(autojump_clock: trio.testing.MockClock) -> None:
    sent: list[tuple[float, list[str]]] = []

    async def send(lines: list[str]) -> None:
        sent.append((trio.current_time(), lines))

    shipper = LogShipper(send, interval=0.5, batch_lines=50)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(shipper.run)
        for i in range(20):  # a slow trickle: one line every 0.1 s
            shipper.add(f"slow{i}")
            await trio.sleep(0.1)
        for i in range(120):  # a burst
            shipper.add(f"fast{i}")
        await trio.sleep(0.01)
        shipper.close()
    lines = [line for _, batch in sent for line in batch]
    assert lines == [f"slow{i}" for i in range(20)] + [f"fast{i}" for i in range(120)]
    assert all(len(batch) <= 50 for _, batch in sent)
    # Partial batches go out at most every 0.5 s; full ones may go out at once, and close()
    # flushes the rest at once.
    times = [t for t, batch in sent[:-1] if len(batch) < 50]
    assert times == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert len(sent) <= 8


async def test_shipper_drops_oldest_when_the_regional_is_stuck(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent: list[list[str]] = []
    release = trio.Event()

    async def send(lines: list[str]) -> None:
        await release.wait()
        sent.append(lines)

    shipper = LogShipper(send, interval=0.5, batch_lines=10, max_pending=20)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(shipper.run)
        shipper.add("first")
        await trio.sleep(1)  # "first" is in flight, stuck
        for i in range(50):
            shipper.add(f"l{i}")
        release.set()
        shipper.close()
    lines = [line for batch in sent for line in batch]
    assert lines[0] == "first"
    assert "[lpmosd agent: 30 output lines dropped]" in lines
    assert lines[-20:] == [f"l{i}" for i in range(30, 50)]
