"""The debian-12 plan's built-in steps, on the host: disk choice, network config, and the
image stream (sha256 while streaming, Range resume after a dropped connection)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from lpmosd.agent.actions import ActionContext, ActionError
from lpmosd.agent.actions.disks import MIN_DISK_BYTES, find_disk
from lpmosd.agent.actions.image import stream_image
from lpmosd.agent.actions.network import networkd_file, parse_network_config
from lpmosd.api_requests import LogLevel


@dataclass
class Recorder:
    """A StepReporter that keeps what it was told."""

    progress_calls: list[tuple[str, int, str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    async def progress(self, step: str, percent: int, message: str) -> None:
        self.progress_calls.append((step, percent, message))

    async def logs(self, lines: Sequence[str], level: LogLevel) -> None:
        self.lines.extend(lines)


def context(tmp: Path, **kw: object) -> ActionContext:
    values = {"sn": "sn-1", "mac": "52:54:00:12:34:56", "disk_layout": "auto"}
    values.update(kw.pop("values", {}))  # type: ignore[call-overload]
    return ActionContext(
        regional_url=str(kw.pop("regional_url", "http://127.0.0.1:9")),
        reporter=Recorder(),
        values=values,
        sysroot=tmp,
        step="test",
        **kw,  # type: ignore[arg-type]
    )


def fake_block(sysroot: Path, name: str, size: int, removable: bool = False) -> None:
    d = sysroot / "sys/block" / name
    d.mkdir(parents=True)
    (d / "size").write_text(f"{size // 512}\n")
    (d / "removable").write_text("1\n" if removable else "0\n")


def test_auto_picks_the_first_fixed_disk_large_enough(tmp_path: Path) -> None:
    fake_block(tmp_path, "loop0", 100 * 1024**3)
    fake_block(tmp_path, "sda", 1024**3)  # too small
    fake_block(tmp_path, "sdb", 64 * 1024**3, removable=True)  # a USB stick
    fake_block(tmp_path, "sdc", MIN_DISK_BYTES)
    fake_block(tmp_path, "sdd", 500 * 1024**3)
    assert find_disk(context(tmp_path)) == Path("/dev/sdc")


def test_auto_fails_naming_the_sizes(tmp_path: Path) -> None:
    fake_block(tmp_path, "sda", 2 * 1024**3)
    fake_block(tmp_path, "sdb", 64 * 1024**3, removable=True)
    with pytest.raises(ActionError, match=r"at least 3 GiB \(disks: sda \(2.0 GiB\), sdb"):
        find_disk(context(tmp_path))
    with pytest.raises(ActionError, match="disk_layout 'raid1' is not supported"):
        find_disk(context(tmp_path, values={"disk_layout": "raid1"}))


def test_network_config() -> None:
    mac = "52:54:00:12:34:56"
    assert networkd_file(parse_network_config("dhcp"), mac).splitlines()[2:] == [
        f"MACAddress={mac}",
        "",
        "[Network]",
        "DHCP=yes",
    ]
    spec = parse_network_config("static address=10.0.0.5/24 gateway=10.0.0.1 dns=10.0.0.53,::1")
    assert networkd_file(spec, mac).splitlines()[5:] == [
        "Address=10.0.0.5/24",
        "Gateway=10.0.0.1",
        "DNS=10.0.0.53",
        "DNS=::1",
    ]
    for bad, why in [
        ("static", "static needs address"),
        ("static address=10.0.0.5", "prefix length"),
        ("static address=10.0.0.300/24", "10.0.0.300"),
        ("static address=10.0.0.5/24 mtu=9000", "unexpected 'mtu=9000'"),
        ("bond", "use 'dhcp' or"),
    ]:
        with pytest.raises(ActionError, match=why):
            parse_network_config(bad)


# --------------------------------------------------------------- the image stream


def make_image(tmp: Path) -> bytes:
    src = tmp / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/os-release").write_text("ID=debian\n")
    # Incompressible bytes, so the image is large enough to be cut in the middle.
    (src / "blob").write_bytes(hashlib.shake_256(b"lpmosd").digest(2_000_000))
    tar = subprocess.run(["tar", "-c", "-C", src, "."], check=True, capture_output=True).stdout
    return subprocess.run(["zstd", "-q", "-c"], input=tar, check=True, capture_output=True).stdout


@dataclass
class FileServer:
    """A minimal HTTP/1.1 file server on loopback: Range support switchable, and a fault
    point: the first image response is cut after ``cut_at`` bytes."""

    files: dict[str, bytes]
    ranges: bool = True
    cut_at: int | None = None
    requests: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        head = data.split(b"\r\n\r\n")[0].decode()
        path = head.split()[1]
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])
        )
        rng = headers.get("range", "")
        self.requests.append((path, rng))
        body = self.files.get(path.removeprefix("/boot/files/"))
        if body is None:
            await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        status, start = "200 OK", 0
        extra = ""
        if rng and self.ranges:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            status = "206 Partial Content"
            extra = f"Content-Range: bytes {start}-{len(body) - 1}/{len(body)}\r\n"
        payload = body[start:]
        await stream.send_all(
            (
                f"HTTP/1.1 {status}\r\nContent-Length: {len(payload)}\r\n{extra}"
                "Connection: close\r\n\r\n"
            ).encode()
        )
        if self.cut_at is not None and path.endswith(".zst"):
            cut, self.cut_at = self.cut_at, None
            await stream.send_all(payload[:cut])
            return  # the connection drops mid-body
        await stream.send_all(payload)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.handle, listeners)


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
async def test_image_resumes_after_a_dropped_connection(tmp_path: Path, ranges: bool) -> None:
    image = make_image(tmp_path)
    digest = hashlib.sha256(image).hexdigest()
    server = FileServer(
        {"images/x.tar.zst": image, "images/x.tar.zst.sha256": f"{digest}  x.tar.zst\n".encode()},
        ranges=ranges,
        cut_at=len(image) // 2,
    )
    into = tmp_path / "target"
    into.mkdir()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        ctx = context(tmp_path, regional_url=f"http://127.0.0.1:{server.port}")
        assert await stream_image(ctx, "images/x.tar.zst", into) == len(image)
        nursery.cancel_scope.cancel()
    assert (into / "etc/os-release").read_text() == "ID=debian\n"
    assert (into / "blob").stat().st_size == 2_000_000
    image_requests = [r for r in server.requests if r[0].endswith(".zst")]
    assert image_requests[0][1] == "" and image_requests[1][1].startswith("bytes=")
    assert int(image_requests[1][1][6:-1]) > 0, "resumed where it stopped"
    recorder = ctx.reporter
    assert isinstance(recorder, Recorder)
    percents = [p for _, p, _ in recorder.progress_calls]
    assert percents == sorted(percents) and percents[-1] == 99
    assert any("resuming at byte" in line for line in recorder.lines)
    assert any(f"sha256 {digest} verified" in line for line in recorder.lines)


async def test_image_with_a_wrong_digest_fails(tmp_path: Path) -> None:
    image = make_image(tmp_path)
    server = FileServer(
        {"images/x.tar.zst": image, "images/x.tar.zst.sha256": b"0" * 64 + b"  x.tar.zst\n"}
    )
    into = tmp_path / "target"
    into.mkdir()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        ctx = context(tmp_path, regional_url=f"http://127.0.0.1:{server.port}")
        with pytest.raises(ActionError, match="does not match 0000"):
            await stream_image(ctx, "images/x.tar.zst", into)
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------- on a loop device


def _detach_all(backing: Path) -> None:
    out = subprocess.run(
        ["losetup", "-n", "-O", "NAME", "-j", str(backing)], capture_output=True, text=True
    ).stdout
    for name in out.split():
        subprocess.run(["losetup", "-d", name], check=False)


async def _run_steps(tmp_path: Path, disk: Path, target: Path) -> None:
    from lpmosd.agent.actions.steps import ACTIONS

    image = make_image(tmp_path)
    digest = hashlib.sha256(image).hexdigest()
    server = FileServer(
        {"images/x.tar.zst": image, "images/x.tar.zst.sha256": f"{digest}  x\n".encode()}
    )

    async def credential() -> str:
        return "lpf_test"

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        ctx = context(
            tmp_path,
            regional_url=f"http://127.0.0.1:{server.port}",
            disk=disk,
            target=target,
            image="images/x.tar.zst",
            ssh_authorized_keys=("ssh-ed25519 AAAA op@host",),
            first_boot_credential=credential,
        )
        for name in ("partitioning", "base_system", "network", "post_install"):
            ctx.step = name
            await ACTIONS[name](ctx)
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mount need root (CI is root)")
def test_steps_on_a_loop_disk(tmp_path: Path) -> None:
    """partitioning, base_system, network, post_install on a 3 GiB sparse file (the
    bootloader needs a real disk and firmware: the VM test covers it)."""
    from lpmosd.agent.actions.steps import FIRST_BOOT_FILE

    backing = tmp_path / "disk.img"
    with backing.open("wb") as f:
        f.truncate(MIN_DISK_BYTES)
    losetup = ["losetup", "--find", "--show", str(backing)]
    disk = Path(subprocess.run(losetup, check=True, capture_output=True, text=True).stdout.strip())
    target = tmp_path / "target"
    try:
        trio.run(_run_steps, tmp_path, disk, target)
        layout = subprocess.run(
            ["sfdisk", "--dump", str(disk)], check=True, capture_output=True, text=True
        ).stdout
        assert "label: gpt" in layout and 'name="esp"' in layout and 'name="root"' in layout
        assert str(target) not in Path("/proc/self/mounts").read_text()
        # Mount the root again (the partition at the largest offset) and look at it.
        listed = subprocess.run(
            ["losetup", "-n", "-O", "NAME,OFFSET", "-j", str(backing)],
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        root = max((line.split() for line in listed if line.strip()), key=lambda f: int(f[1]))
        check = tmp_path / "check"
        check.mkdir()
        subprocess.run(["mount", root[0], str(check)], check=True)
        try:
            assert (check / "etc/os-release").read_text() == "ID=debian\n"
            assert (check / "etc/hostname").read_text() == "sn-1\n"
            net = (check / "etc/systemd/network/10-lpmosd.network").read_text()
            assert "MACAddress=52:54:00:12:34:56" in net and "DHCP=yes" in net
            keys = check / "root/.ssh/authorized_keys"
            assert keys.read_text() == "ssh-ed25519 AAAA op@host\n"
            assert keys.stat().st_mode & 0o777 == 0o600
            first = check / FIRST_BOOT_FILE
            assert first.stat().st_mode & 0o777 == 0o600
            assert '"credential": "lpf_test"' in first.read_text()
        finally:
            subprocess.run(["umount", str(check)], check=True)
    finally:
        subprocess.run(["umount", "-R", str(target)], check=False, capture_output=True)
        _detach_all(backing)
