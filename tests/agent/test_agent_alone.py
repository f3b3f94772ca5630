"""The agent installs alone: ``lpmosd agent`` needs only trio, httpx and the standard library.

The installer image carries the agent without the server stack (grpclib, betterproto2, quart,
hypercorn, prometheus_client, trio-asyncio). A fresh venv gets lpmosd without dependencies
plus exactly the project's base dependencies (pinned by constraints.txt); its ``lpmosd
agent`` then installs the demo plan against a real regional.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from provisioning_kit import GUIDE_TASK, make_config, open_daemon, wait_for

from lpmosd.api_requests import CreateTaskRequest
from lpmosd.config import Config
from lpmosd.documents import TaskStatus
from lpmosd.etcd import open_client
from lpmosd.etcd_process import EtcdProcess
from lpmosd.plan import Plan, PlanStep
from lpmosd.store import Store

ROOT = Path(__file__).resolve().parents[2]
#: Third-party packages only the server needs; the agent must not import any of them.
SERVER_STACK = (
    "grpclib",
    "betterproto2",
    "quart",
    "quart_trio",
    "hypercorn",
    "prometheus_client",
    "trio_asyncio",
    "h2",
)


def agent_dependencies() -> list[str]:
    """The project's base dependencies: by design, exactly the agent's."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    return deps


def test_agent_imports_no_server_module() -> None:
    code = (
        "import sys\n"
        "from lpmosd.cli import main\n"
        "try:\n"
        "    main(['agent', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    loaded = set(out.split())
    assert "httpx" in loaded and "trio" in loaded
    assert loaded.isdisjoint(SERVER_STACK), loaded & set(SERVER_STACK)


def test_base_dependencies_are_the_agents() -> None:
    names = {
        d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in agent_dependencies()
    }
    assert names == {"trio", "httpx"}


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv with lpmosd (no dependencies) and the agent's dependencies only."""
    venv = tmp_path_factory.mktemp("agent-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    # The test venv's pip installs into it (no ensurepip: quicker); the pip cache serves.
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"]
    pip += ["--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True, timeout=300)
    subprocess.run(
        [*pip, "--constraint", str(ROOT / "constraints.txt"), *agent_dependencies()],
        check=True,
        timeout=300,
    )
    yield venv


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv / "bin" / "lpmosd", *args], capture_output=True, text=True, timeout=60
    )


def test_agent_venv_has_no_server_stack(agent_venv: Path) -> None:
    probe = f"import importlib.util as u; print([m for m in {SERVER_STACK!r} if u.find_spec(m)])"
    out = subprocess.run(
        [agent_venv / "bin" / "python", "-c", probe], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
    help_ = _run(agent_venv, "agent", "--help")
    assert help_.returncode == 0, help_.stderr
    assert "--regional-url" in help_.stdout
    # A server command says what is missing instead of a traceback.
    run = _run(agent_venv, "run", "--config", "/nonexistent.toml")
    assert run.returncode == 2 and "server" in run.stderr and "Traceback" not in run.stderr


def _quick_demo(config: Config) -> Config:
    rg = config.regional
    assert rg is not None
    demo = Plan(
        os_type="demo",
        steps=tuple(PlanStep(name=n, timeout=10, simulate=0.05) for n in ("disk", "os")),
    )
    plans = types.MappingProxyType({**rg.plans, "demo": demo})
    return dataclasses.replace(config, regional=dataclasses.replace(rg, plans=plans))


async def test_agent_alone_installs_the_demo(
    agent_venv: Path, etcd: EtcdProcess, tmp_path: Path, aio_loop: None
) -> None:
    config = _quick_demo(make_config(etcd.endpoints))
    async with open_daemon(config) as daemon, open_client(etcd.endpoints) as client:
        store = Store(client)
        req = CreateTaskRequest.from_obj({**GUIDE_TASK, "os_type": "demo"})
        _, secret = await store.create_enrolled_task(req, actor="test")
        secret_file = tmp_path / "secret"
        secret_file.write_text(secret)
        argv = [
            str(agent_venv / "bin" / "lpmosd"),
            "agent",
            f"--regional-url={daemon.urls['regional']}",
            f"--sn={req.sn}",
            f"--mac={req.mac}",
            f"--enrollment-secret-file={secret_file}",
            "--poll-interval=0.05",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(
                functools.partial(trio.run_process, argv, check=False, env=env)
            )

            async def reported() -> bool:
                return await store.get_meta(req.idc, req.sn) is not None

            await wait_for(reported, timeout=30, what="the agent's hardware report")
            await store.approve(req.idc, req.sn, approved_by="test")
            with trio.fail_after(30):
                await proc.wait()
        assert proc.returncode == 0
        task = (await store.get_task(req.idc, req.sn)).task
        assert task.status is TaskStatus.COMPLETED
        assert [p.step for p in task.progress][1:] == ["disk", "os"]
