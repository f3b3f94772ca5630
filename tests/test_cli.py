"""``lpmosd check-config`` and ``lpmosd run`` start-up errors: exit codes and messages.

``lpmosd run`` stopping on SIGTERM is tested with real processes in tests/e2e.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lpmosd.cli import main

GOOD = """\
roles = ["control-plane", "regional"]
log_level = "info"

[etcd]
endpoints = ["http://127.0.0.1:2379"]

[control_plane]
listen = "127.0.0.1"
port = 8080

[regional]
idc = "dc1"
port = 8081
agent_lease_ttl = 30
heartbeat_interval = 10

[regional.plans."Ubuntu 22.04"]
steps = [
  { name = "partitioning", command = ["/usr/sbin/sgdisk", "--zap-all", "/dev/sda"], timeout = 600 },
  { name = "base_system", simulate = 1.0 },
]
"""

#: (what is wrong, the file, the key path the message must name)
BAD = [
    ("unknown key", GOOD.replace("port = 8081", "prot = 8081"), "regional.prot"),
    ("port out of range", GOOD.replace("port = 8081", "port = 70000"), "regional.port"),
    ("wrong type", GOOD.replace("port = 8081", 'port = "8081"'), "regional.port"),
    ("bad idc", GOOD.replace('idc = "dc1"', 'idc = "../dc1"'), "regional.idc"),
    ("unknown role", GOOD.replace('"regional"]', '"regionl"]'), "roles[1]"),
    (
        "heartbeat not under half the TTL",
        GOOD.replace("heartbeat_interval = 10", "heartbeat_interval = 15"),
        "regional.heartbeat_interval",
    ),
    (
        "bad endpoint",
        GOOD.replace('"http://127.0.0.1:2379"', '"127.0.0.1:2379"'),
        "etcd.endpoints[0]",
    ),
    (
        "bad plan step",
        GOOD.replace('name = "partitioning"', 'name = "Partitioning"'),
        'regional.plans."Ubuntu 22.04".steps[0].name',
    ),
    (
        "relative program",
        GOOD.replace('"/usr/sbin/sgdisk"', '"sgdisk"'),
        'regional.plans."Ubuntu 22.04".steps[0].command[0]',
    ),
    (
        "missing section",
        GOOD.split("[control_plane]")[0],
        "control_plane",
    ),
    ("port clash", GOOD.replace("port = 8081", "port = 8080"), "regional.port"),
    ("invalid TOML", GOOD.replace("[regional]", "[regional"), "line"),
]


def write(tmp_path: Path, text: str, name: str = "lpmosd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_check_config_good(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD)
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "control-plane" in out and "regional" in out


def test_check_config_applies_the_guides_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, GOOD)
    assert main(["check-config", str(path), "--idc=dc2", "--api-port=9081"]) == 0
    assert main(["check-config", str(path), "--api-port=0"]) == 2
    assert "regional.port" in capsys.readouterr().err


@pytest.mark.parametrize(("what", "text", "key"), BAD, ids=[b[0] for b in BAD])
def test_check_config_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, text: str, key: str
) -> None:
    path = write(tmp_path, text)
    assert main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("lpmosd: config error: "), captured.err
    assert key in captured.err, captured.err
    assert "Traceback" not in captured.err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["check-config", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_real_processes_exit_codes(tmp_path: Path) -> None:
    """The installed entry point, as systemd's ExecStartPre and an operator run it."""
    good = write(tmp_path, GOOD)
    bad = write(tmp_path, BAD[0][1], "bad.toml")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lpmosd", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ok = run("check-config", str(good))
    assert ok.returncode == 0, ok.stderr
    refused = run("check-config", str(bad))
    assert refused.returncode == 2
    assert "regional.prot: unknown key (did you mean 'port'?)" in refused.stderr
    # `lpmosd run` validates before touching etcd or ports: same message, same code.
    refused = run("run", "--config", str(bad))
    assert refused.returncode == 2
    assert "regional.prot" in refused.stderr and "Traceback" not in refused.stderr
