"""The live part of packaging/test-install, run by the installed venv's interpreter.

Starts a throwaway etcd (lpmosd.etcd_process.EtcdProcess, as installed), fills the blanks of
the shipped /etc/lpmosd/lpmosd.toml into copies in WORKDIR, runs `/usr/bin/lpmosd
check-config` on them, then runs the unit's ExecStart command the way the unit would (as
the lpmosd user, no new privileges, no capabilities, systemd's environment with a
NOTIFY_SOCKET): it must send READY=1, serve /healthz on every role's port, log JSON lines,
send STOPPING=1 on SIGTERM and exit 0. Everything it starts is stopped on the way out,
even on failure or SIGTERM/SIGINT/SIGHUP.

Usage: /opt/venvs/lpmosd/bin/python packaging/test-install-daemon.py WORKDIR
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from types import FrameType

from lpmosd.etcd_process import EtcdProcess

SHIPPED = Path("/etc/lpmosd/lpmosd.toml")
UNIT = Path("/lib/systemd/system/lpmosd.service")
USER = "lpmosd"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


class Failure(Exception):
    """A check failed; the message says which."""


def say(msg: str) -> None:
    print(f"test-install: {msg}", flush=True)


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def unit_exec_start() -> list[str]:
    """The ExecStart command line of the installed unit."""
    for line in UNIT.read_text().splitlines():
        if line.startswith("ExecStart="):
            return shlex.split(line.removeprefix("ExecStart="))
    raise Failure(f"{UNIT}: no ExecStart=")


def fill_config(
    text: str, *, etcd: str, idc: str, port: int, control_plane_port: int | None
) -> str:
    """The shipped config with its blanks filled in (and the control plane enabled)."""
    out: list[str] = []
    section = ""
    in_endpoints = False
    for line in text.splitlines():
        if in_endpoints:
            in_endpoints = not line.startswith("]")
            continue
        header = re.match(r"^\[([^\]]+)\]\s*$", line)
        if header:
            section = header.group(1)
        if section == "etcd" and line.startswith("endpoints = ["):
            out.append(f'endpoints = ["{etcd}"]')
            in_endpoints = not line.rstrip().endswith("]")
        elif section == "regional" and line == 'idc = ""':
            out.append(f'idc = "{idc}"')
        elif section == "regional" and line.startswith("#listen = "):
            out.append('listen = "127.0.0.1"')
        elif section == "regional" and line.startswith("#port = "):
            out.append(f"port = {port}")
        elif control_plane_port is not None and line.startswith("roles = "):
            out.append('roles = ["control-plane", "regional"]')
        else:
            out.append(line)
    if control_plane_port is not None:
        out += ["", "[control_plane]", 'listen = "127.0.0.1"', f"port = {control_plane_port}"]
    filled = "\n".join(out) + "\n"

    # The edits must have landed: if the shipped file changes shape, update this function.
    doc = tomllib.loads(filled)
    want_roles = ["regional"] if control_plane_port is None else ["control-plane", "regional"]
    got = (doc.get("roles"), doc["etcd"].get("endpoints"), doc["regional"].get("idc"))
    if got != (want_roles, [etcd], idc) or doc["regional"].get("port") != port:
        raise Failure(f"filling the shipped config's blanks went wrong: {got}")
    return filled


def write_config(path: Path, text: str) -> None:
    """Like /etc/lpmosd/*: root:lpmosd 0640."""
    path.write_text(text)
    os.chown(path, 0, grp.getgrnam(USER).gr_gid)
    path.chmod(0o640)


def check_config(path: Path) -> None:
    proc = subprocess.run(
        ["/usr/bin/lpmosd", "check-config", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise Failure(f"lpmosd check-config {path}: exit {proc.returncode}: {proc.stderr}")
    say(f"check-config: {proc.stdout.strip()}")


def healthz(port: int) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"http://127.0.0.1:{port}/healthz"
    with opener.open(url, timeout=5) as resp:
        body = resp.read().decode(errors="replace")
        if resp.status != 200:
            raise Failure(f"GET {url}: {resp.status} {body}")
    say(f"GET {url}: 200 {body.strip()[:80]}")


def run_daemon(workdir: Path, config: Path, ports: dict[str, int]) -> None:
    """The unit's ExecStart as the unit runs it; checks readiness, /healthz, SIGTERM."""
    pw = pwd.getpwnam(USER)
    argv = unit_exec_start()
    if argv[:2] != ["/usr/bin/lpmosd", "run"] or "--config" not in argv:
        raise Failure(f"unexpected ExecStart: {argv}")
    argv[argv.index("--config") + 1] = str(config)  # the filled copy, not /etc's

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_name = f"@lpmosd-pkgtest-{os.getpid()}"
    notify.bind("\0" + notify_name[1:])
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": pw.pw_dir,
        "USER": USER,
        "LOGNAME": USER,
        "SHELL": pw.pw_shell,
        "NOTIFY_SOCKET": notify_name,
    }
    # User=lpmosd, Group=lpmosd, NoNewPrivileges=yes, CapabilityBoundingSet= (empty).
    setpriv = [
        "setpriv",
        f"--reuid={pw.pw_uid}",
        f"--regid={pw.pw_gid}",
        "--init-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]
    log_path = workdir / f"daemon-{config.stem}.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            setpriv + argv,
            env=env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            umask=0o027,  # UMask=0027
            start_new_session=True,
        )
    (workdir / "daemon.pid").write_text(f"{proc.pid}\n")
    say(f"started as {USER}: {shlex.join(argv)} (pid {proc.pid})")

    def log_tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])

    try:
        messages: list[str] = []
        notify.settimeout(0.5)
        while "READY=1" not in messages:
            if proc.poll() is not None:
                raise Failure(f"daemon exited ({proc.returncode}) before READY=1:\n{log_tail()}")
            if time.monotonic() - started > READY_TIMEOUT:
                raise Failure(f"no READY=1 within {READY_TIMEOUT:.0f} s:\n{log_tail()}")
            try:
                messages += notify.recv(4096).decode().split("\n")
            except TimeoutError:
                continue
        say(f"READY=1 after {time.monotonic() - started:.1f} s")

        for port in ports.values():
            healthz(port)

        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Failure(f"still running {STOP_TIMEOUT:.0f} s after SIGTERM") from None
        notify.setblocking(False)
        try:
            while True:
                messages += notify.recv(4096).decode().split("\n")
        except BlockingIOError:
            pass
        if rc != 0:
            raise Failure(f"exit status {rc} after SIGTERM:\n{log_tail()}")
        if "STOPPING=1" not in messages:
            raise Failure(f"no STOPPING=1 on SIGTERM (got {messages})")
        say("SIGTERM: STOPPING=1, exit 0")

        lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
        try:
            records = [json.loads(ln) for ln in lines]
        except json.JSONDecodeError as exc:
            raise Failure(f"a log line is not JSON ({exc}):\n{log_tail()}") from None
        if not any("lpmosd ready" in json.dumps(r) for r in records):
            raise Failure(f"no 'lpmosd ready' log record:\n{log_tail()}")
        say(f"{len(records)} JSON log lines on stderr")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        (workdir / "daemon.pid").unlink(missing_ok=True)


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _raise_exit)
    workdir = Path(sys.argv[1])
    shipped = SHIPPED.read_text()
    etcd = EtcdProcess(name="lpmosd-pkgtest")
    try:
        etcd.start()
        (workdir / "etcd.pid").write_text(f"{etcd.pid}\n")
        say(f"test etcd at {etcd.endpoint} (pid {etcd.pid})")

        port = free_port()
        regional = workdir / "regional.toml"
        write_config(
            regional,
            fill_config(
                shipped, etcd=etcd.endpoint, idc="pkgtest", port=port, control_plane_port=None
            ),
        )
        check_config(regional)
        run_daemon(workdir, regional, {"regional": port})

        port, cp_port = free_port(), free_port()
        both = workdir / "both-roles.toml"
        write_config(
            both,
            fill_config(
                shipped, etcd=etcd.endpoint, idc="pkgtest2", port=port, control_plane_port=cp_port
            ),
        )
        check_config(both)
        run_daemon(workdir, both, {"regional": port, "control-plane": cp_port})
    except Failure as exc:
        print(f"test-install: FAIL: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        etcd.close()
        (workdir / "etcd.pid").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
