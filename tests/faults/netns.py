"""A 3-member etcd cluster whose members talk to each other over network namespaces,
so that one member can be cut off from its peers while its clients still reach it.

Each member runs in a namespace of its own (``ip netns``), its peer traffic on a veth
into a shared bridge (in a hub namespace: nothing is added to the host's network), its
client port on the namespace's loopback. Clients in the test's namespace reach that port
through two socat relays joined by a Unix socket (Unix sockets cross namespaces), at
``http://127.0.0.1:PORT``. :meth:`NetnsCluster.partition` takes the member's veth down:
the member keeps serving its clients, but it hears nothing from its peers.

Needs root (CAP_NET_ADMIN) and socat.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

from provisioning_kit import free_port

from lpmosd.etcd_process import find_etcd_binary

SUBNET = "10.213.77"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def available() -> str | None:
    """Why the cluster cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("socat") is None or shutil.which("ip") is None:
        return "needs socat and iproute2"
    return None


class NetnsCluster:
    """Three etcd members in network namespaces; see the module docstring."""

    def __init__(self, size: int = 3) -> None:
        tag = f"{os.getpid() % 100000}"
        self.hub = f"lpm{tag}h"
        self.namespaces = [f"lpm{tag}m{i}" for i in range(size)]
        self.veths = [(f"l{tag}v{i}", f"l{tag}p{i}") for i in range(size)]
        self.workdir = Path(tempfile.mkdtemp(prefix="lpmosd-netns-"))
        self.ports = [free_port() for _ in range(size)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.size = size

    @property
    def endpoints(self) -> list[str]:
        """Each member's client URL, as seen from the test's namespace."""
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def _peer(self, i: int) -> str:
        return f"http://{SUBNET}.{i + 1}:2380"

    def start(self) -> None:
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        initial = ",".join(f"lpmosd-m{i}={self._peer(i)}" for i in range(self.size))
        etcd = find_etcd_binary()
        for i, ns in enumerate(self.namespaces):
            veth, peer = self.veths[i]
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip(
                "link",
                "add",
                veth,
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                self.hub,
            )
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", self.hub, "link", "set", peer, "master", "br0")
            _ip("-n", self.hub, "link", "set", peer, "up")
            sock = self.workdir / f"m{i}.sock"
            in_ns = ["ip", "netns", "exec", ns]
            self._spawn_member(i, in_ns, etcd, initial, sock)
        deadline = time.monotonic() + 20
        for url in self.endpoints:
            while not self._healthy(url):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member at {url} not healthy: {self.log_tail()}")
                time.sleep(0.1)

    def _spawn_member(self, i: int, in_ns: list[str], etcd: str, initial: str, sock: Path) -> None:
        member = [
            *in_ns,
            etcd,
            f"--name=lpmosd-m{i}",
            f"--data-dir={self.workdir / f'm{i}.data'}",
            "--listen-client-urls=http://127.0.0.1:2379",
            f"--advertise-client-urls={self.endpoints[i]}",
            f"--listen-peer-urls={self._peer(i)}",
            f"--initial-advertise-peer-urls={self._peer(i)}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token=lpmosd-netns-{os.getpid()}",
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--log-level=warn",
        ]
        # The member's loopback port, relayed out of its namespace over a Unix socket.
        inner = [*in_ns, "socat", f"UNIX-LISTEN:{sock},fork", "TCP:127.0.0.1:2379"]
        outer = [
            "socat",
            f"TCP-LISTEN:{self.ports[i]},bind=127.0.0.1,fork,reuseaddr",
            f"UNIX-CONNECT:{sock}",
        ]
        with (self.workdir / f"m{i}.log").open("ab") as log:
            for argv in (member, inner, outer):
                self.procs.append(
                    subprocess.Popen(
                        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                    )
                )

    @staticmethod
    def _healthy(url: str) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url + "/health", timeout=1) as resp:
                return b'"true"' in resp.read()
        except OSError:
            return False

    def log_tail(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-2000:] for p in sorted(self.workdir.glob("*.log"))
        )

    def partition(self, i: int) -> None:
        """Cut member ``i`` off from its peers (its clients still reach it)."""
        _ip("-n", self.namespaces[i], "link", "set", self.veths[i][0], "down")

    def heal(self, i: int) -> None:
        """Reconnect member ``i`` to its peers."""
        _ip("-n", self.namespaces[i], "link", "set", self.veths[i][0], "up")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for ns in [*self.namespaces, self.hub]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
