"""Fixtures of the boot tests: a daemon (both roles) over the shared etcd, with an
artifacts directory, and HTTP clients of its control plane and regional."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from provisioning_kit import TEST_PLANS, make_config, open_control_api, open_daemon

from lpmosd.config import BootConfig
from lpmosd.daemon import Daemon
from lpmosd.etcd_process import EtcdProcess
from lpmosd.plan import DEMO_PLAN, Plan

#: Debian's ``ipxe`` ships iPXE as a Linux-kernel-format image: a real bzImage the
#: firmware's ``kernel``/``boot`` accept, small, and visible on the serial console.
IPXE_LKRN = Path("/boot/ipxe.lkrn")
IMAGE = "images/debian-12.tar.zst"


@dataclass
class BootWorld:
    """A running daemon with boot artifacts, and clients of its two ports."""

    daemon: Daemon
    cp: httpx.AsyncClient
    regional: httpx.AsyncClient
    artifacts: Path

    async def create(self, sn: str, mac: str, os_type: str = "demo") -> dict[str, object]:
        """Create a task through the control-plane API (201 expected)."""
        body = {"idc": "dc1", "sn": sn, "mac": mac, "os_type": os_type}
        r = await self.cp.post("/api/v1/tasks", json=body)
        assert r.status_code == 201, r.text
        task: dict[str, object] = r.json()
        return task


def make_artifacts(root: Path, *, image_bytes: int = 3 * 1024 * 1024 + 17) -> Path:
    """installer/vmlinuz (iPXE's lkrn when present), installer/initrd, the image and a
    shipped .sha256 for the kernel only (the others' sums are computed on demand)."""
    (root / "installer").mkdir(parents=True)
    (root / "images").mkdir()
    kernel = IPXE_LKRN.read_bytes() if IPXE_LKRN.exists() else os.urandom(300_000)
    (root / "installer/vmlinuz").write_bytes(kernel)
    (root / "installer/initrd").write_bytes(os.urandom(200_000))
    with (root / IMAGE).open("wb") as f:
        f.write(os.urandom(image_bytes))
    import hashlib

    digest = hashlib.sha256(kernel).hexdigest()
    (root / "installer/vmlinuz.sha256").write_text(f"{digest}  vmlinuz\n")
    return root


BOOT_PLANS: dict[str, Plan] = {
    **TEST_PLANS,
    "debian-12": Plan(os_type="debian-12", steps=DEMO_PLAN.steps, image=IMAGE),
    "rocky-9": Plan(os_type="rocky-9", steps=DEMO_PLAN.steps, image="images/rocky-9.tar.zst"),
}


@pytest.fixture
async def world(etcd: EtcdProcess, aio_loop: None, tmp_path: Path) -> AsyncIterator[BootWorld]:
    """Both roles, heartbeat 3 s / lease 10 s, artifacts in ``tmp_path/artifacts``."""
    artifacts = make_artifacts(tmp_path / "artifacts")
    config = make_config(etcd.endpoints, agent_lease_ttl=10, heartbeat_interval=3)
    assert config.regional is not None
    regional = dataclasses.replace(
        config.regional, plans=BOOT_PLANS, boot=BootConfig(artifacts_dir=artifacts)
    )
    config = dataclasses.replace(config, regional=regional)
    async with (
        open_daemon(config) as daemon,
        open_control_api(daemon) as cp,
        httpx.AsyncClient(base_url=daemon.urls["regional"]) as rg,
    ):
        assert daemon.regional is not None
        with trio.fail_after(10):
            await daemon.regional.boot.published.wait()  # it leads: tasks may be created
        yield BootWorld(daemon, cp, rg, artifacts)
