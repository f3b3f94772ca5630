"""``lpmosd agent``: argument parsing, and the agent as a real process over real HTTP."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lpmosd.agent import cli
from lpmosd.cli import build_parser

from .agent_fakes import FakeRegional, serve_http


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lpmosd")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_wired_into_the_main_cli() -> None:
    args = build_parser().parse_args(["agent", "--regional-url=http://r:8081", "--sn=sn-001"])
    assert args.handler is cli.handle


def test_defaults() -> None:
    args = parse("agent", "--regional-url=http://localhost:8081/", "--sn=sn-001")
    assert args.handler is cli.handle
    assert args.regional_url == ("http://localhost:8081",)
    assert args.sn == "sn-001"
    assert args.mac is None
    assert args.sysroot == Path("/")
    assert args.poll_interval == 2.0
    assert args.register_timeout is None
    assert args.max_retry_time == 600.0


def test_mac_is_normalised() -> None:
    args = parse("agent", "--regional-url=http://r", "--sn=a", "--mac", "001A.2B3C.4D5E")
    assert args.mac == "00:1a:2b:3c:4d:5e"


@pytest.mark.parametrize(
    "bad",
    [
        ["--regional-url=ftp://r", "--sn=a"],
        ["--regional-url=http://r?x=1", "--sn=a"],
        ["--regional-url=http://r", "--sn=../etc"],
        ["--regional-url=http://r", "--sn=a/b"],
        ["--regional-url=http://r", "--sn=a", "--mac=nope"],
        ["--regional-url=http://r", "--sn=a", "--poll-interval=0"],
        ["--regional-url=http://r", "--sn=a", "--poll-interval=nan"],
        ["--sn=a"],
    ],
)
def test_bad_arguments(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse("agent", *bad)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_unreadable_secret_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "setup_logging", lambda level, fmt: None)  # keep caplog's handler
    args = parse(
        "agent",
        "--regional-url=http://127.0.0.1:1",
        "--sn=a",
        f"--enrollment-secret-file={tmp_path / 'missing'}",
    )
    with caplog.at_level(logging.ERROR, "lpmosd.agent"):
        assert cli.handle(args) == 2
    assert "enrollment secret" in caplog.text


def test_read_secret(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("s3cret\n")
    assert cli._read_secret(path) == "s3cret"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        cli._read_secret(path)


def _agent(url: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lpmosd", "agent", f"--regional-url={url}", "--sn=sn-001",
         "--mac=00:1a:2b:3c:4d:5e", "--poll-interval=0.05", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_process_installs_over_http(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    regional = FakeRegional(issue_tokens=True, secret="s3cret")
    task = regional.add_task(status="approved")
    with serve_http(regional) as url:
        proc = _agent(url, f"--enrollment-secret-file={secret}")
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert task.status == "completed"
    assert "registered" in err and "install completed" in err
    assert task.hardware is not None and task.hardware["cpu_cores"] >= 1


def test_process_unreachable_regional_exits_2() -> None:
    proc = _agent("http://127.0.0.1:1", "--register-timeout=0.5", "--max-retry-time=0.2",
                  "--register-retry-interval=0.1")  # fmt: skip
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert "registration refused" in err or "cannot register yet" in err


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_sigterm_kills_the_running_step(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    regional = FakeRegional(
        plan={
            "name": "t",
            "steps": [{"name": "long", "command": ["/bin/sh", "-c",
                       f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 60"],
                       "timeout": 100}],
        }
    )  # fmt: skip
    regional.add_task(status="approved")
    with serve_http(regional) as url:
        proc = _agent(url)
        deadline = time.monotonic() + 20
        while not pidfile.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        step_pid = int(pidfile.read_text())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGTERM, err
    deadline = time.monotonic() + 5
    while not _gone(step_pid):
        assert time.monotonic() < deadline, "step survived the agent"
        time.sleep(0.02)
