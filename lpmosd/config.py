"""Configuration: one TOML file -> frozen dataclasses, one per section.

Every problem is a :class:`~lpmosd.errors.ConfigError` whose ``path`` is the dotted key path
(``regional.port``, ``etcd.endpoints[1]``, ``regional.plans."Ubuntu 22.04".steps[0].name``), so an
operator can find the line to fix. Unknown keys are rejected at every level (a typo must not
silently fall back to a default). Files named by the config are resolved against the config
file's directory and checked for readability at load time. Secrets are never held by the config
objects: only their paths are, and :meth:`EtcdConfig.read_password` reads the password on demand.

Public API: :func:`load_config`, :func:`parse_config`, :func:`dev_config`,
:meth:`Config.with_overrides`, and the dataclasses :class:`Config`, :class:`EtcdConfig`,
:class:`EtcdTLS`, :class:`EtcdAuth`, :class:`ControlPlaneConfig`, :class:`RegionalConfig`
(plans are :class:`lpmosd.plan.Plan`).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import re
import stat
import tomllib
import types
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from lpmosd.boot.artifacts import check_artifact_path
from lpmosd.boot.scripts import check_base_url
from lpmosd.errors import ConfigError, ValidationError
from lpmosd.fields import bounded_number
from lpmosd.plan import (
    DEBIAN_12_PLAN,
    DEMO_PLAN,
    STEP_KEYS,
    Plan,
    PlanError,
    check_os_type,
    parse_steps,
)
from lpmosd.schema import NAME_RE

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "ROLES",
    "ROLE_CONTROL_PLANE",
    "ROLE_REGIONAL",
    "Config",
    "ControlPlaneConfig",
    "EtcdAuth",
    "EtcdConfig",
    "EtcdTLS",
    "RegionalConfig",
    "dev_config",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH: Final = Path("/etc/lpmosd/lpmosd.toml")
"""Where the Debian package installs the configuration file."""

ROLE_CONTROL_PLANE: Final = "control-plane"
ROLE_REGIONAL: Final = "regional"
ROLES: Final = frozenset({ROLE_CONTROL_PLANE, ROLE_REGIONAL})
"""The roles one lpmosd process can run."""

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("json", "text")

_DEFAULT_ENDPOINTS: Final = ("http://127.0.0.1:2379",)
_DEFAULT_MAX_BODY: Final = 1024 * 1024
_MAX_BODY_RANGE: Final = (1024, 64 * 1024 * 1024)

_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::"})


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, kw_only=True, slots=True)
class EtcdTLS:
    """``[etcd.tls]``: client TLS towards etcd. No ``ca_file`` means the system CA store."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class EtcdAuth:
    """``[etcd.auth]``: etcd user; the password lives in ``password_file``, never in memory here."""

    username: str
    password_file: Path


@dataclass(frozen=True, kw_only=True, slots=True)
class EtcdConfig:
    """``[etcd]``: how to reach the etcd cluster."""

    endpoints: tuple[str, ...] = _DEFAULT_ENDPOINTS
    dial_timeout: float = 5.0
    request_timeout: float = 10.0
    keepalive_interval: float = 10.0
    tls: EtcdTLS | None = None
    auth: EtcdAuth | None = None

    def read_password(self) -> str | None:
        """Read the etcd password from ``auth.password_file``; ``None`` without ``[etcd.auth]``.

        Read on demand so the secret never sits in the config object (or its repr). One
        trailing newline is stripped, as ``echo pw > file`` leaves one.
        """
        if self.auth is None:
            return None
        return _read_password_file(self.auth.password_file, "etcd.auth.password_file")


@dataclass(frozen=True, kw_only=True, slots=True)
class DisruptionConfig:
    """``[control_plane.disruption]``: telling one dead machine from a sick IDC.

    When an agent's lease vanishes the reaper waits ``decision_delay`` seconds, then looks at
    the agent's IDC. The IDC is *disrupted* while its regional holds no session, or while at
    least ``silent_share`` of its agents (and at least ``min_silent_agents``) are silent: their
    lease vanished within the last lease TTL, or (a sample of ``sample_size`` live leases,
    asked of etcd) it has not been refreshed for more than ``silent_after`` of its TTL. Tasks of
    a disrupted IDC, or of one healthy again for less than a lease TTL, are not failed: they
    show "agent unreachable" and carry on when their agent is heard again; one is failed only
    when its agent stays silent for a full lease TTL after the IDC is healthy again. In a
    healthy IDC a vanished lease fails its task at once, as before. ``enabled = false``
    restores the plain reaper.
    """

    enabled: bool = True
    silent_share: float = 0.55
    min_silent_agents: int = 3
    silent_after: float = 0.5
    sample_size: int = 32
    decision_delay: float = 0.1


@dataclass(frozen=True, kw_only=True, slots=True)
class ControlPlaneConfig:
    """``[control_plane]``: the API + dashboard listener.

    API tokens live in etcd (``/lpmosd/tokens/``, see :mod:`lpmosd.tokens`), not in the
    config. ``metrics_public`` serves ``/metrics`` without a token (an ops network scrapes
    it); when false it needs a viewer token.
    """

    listen: str = "0.0.0.0"
    port: int = 8080
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    max_body_bytes: int = _DEFAULT_MAX_BODY
    metrics_public: bool = True
    disruption: DisruptionConfig = field(default_factory=DisruptionConfig)
    #: Seconds between etcd compactions, each to the revision seen one interval earlier
    #: (the Kubernetes API server's scheme); 0 turns compaction off.
    compaction_interval: float = 300.0


def _default_plans() -> Mapping[str, Plan]:
    return types.MappingProxyType(
        {DEMO_PLAN.os_type: DEMO_PLAN, DEBIAN_12_PLAN.os_type: DEBIAN_12_PLAN}
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class BootConfig:
    """``[regional.boot]``: the regional as its IDC's boot server.

    ``artifacts_dir`` holds the installer kernel and initrd and the OS images, served at
    ``/boot/files/``; ``public_url`` is the regional's URL as booting machines reach it
    (default: the Host the request came to).
    """

    artifacts_dir: Path | None = None
    public_url: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RegionalConfig:
    """``[regional]``: the IDC watcher and the agent API for one IDC."""

    idc: str
    listen: str = "0.0.0.0"
    port: int = 8081
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    agent_lease_ttl: int = 30
    session_ttl: int = 10
    heartbeat_interval: int = 10
    max_body_bytes: int = _DEFAULT_MAX_BODY
    rate_limit_per_second: float = 50.0
    rate_limit_burst: int = 100
    #: Serve ``/metrics`` on the agent port; the regional holds no operator tokens, so the
    #: only choice is open (default) or not served (404).
    metrics_public: bool = True
    plans: Mapping[str, Plan] = field(default_factory=_default_plans)
    #: Where the regional keeps its journal of reports etcd could not take yet.
    state_dir: Path = Path("/var/lib/lpmosd")
    #: Reports the journal holds at most (beyond: 503, the agents retry).
    journal_max_entries: int = 100_000
    #: Seconds a heartbeat waits for etcd to refresh the lease before it is answered from
    #: the view (etcd away: the lease is re-established afterwards).
    journal_after: float = 2.0
    #: ``lean``: the agent API's hot routes (heartbeat, progress, logs) on a lean HTTP/1.1
    #: server, everything else through the same Quart app (lpmosd.web.lean); ``hypercorn``:
    #: all through hypercorn. With TLS the regional always serves with hypercorn.
    http_server: str = "lean"
    #: Agent writes (all but heartbeats) handled at once; more wait in arrival order.
    max_active_writes: int = 64
    #: Writes waiting beyond which a new one is refused 429 + Retry-After (overload).
    max_queued_writes: int = 1000
    boot: BootConfig = field(default_factory=BootConfig)

    def plan_for(self, os_type: str) -> Plan | None:
        """The install plan for ``os_type`` (``"demo"`` always has one), or ``None``.

        The caller turns ``None`` into its own 404/409 answer.
        """
        return self.plans.get(os_type)


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    """The whole configuration. A role's section is ``None`` when the role is not enabled."""

    roles: frozenset[str]
    log_level: str = "info"
    log_format: str = "json"
    shutdown_timeout: float = 10.0
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    control_plane: ControlPlaneConfig | None = None
    regional: RegionalConfig | None = None

    def with_overrides(
        self,
        *,
        idc: str | None = None,
        api_port: int | None = None,
        control_plane_port: int | None = None,
        etcd_endpoints: Sequence[str] | None = None,
        log_level: str | None = None,
    ) -> Config:
        """Return a copy with command-line overrides applied, validated like the file.

        ``api_port`` is the regional (agent API) port, as in ``--idc=dc1 --api-port=8081``.
        Overriding a section whose role is not enabled is an error rather than a silent no-op.
        """
        config = self
        if log_level is not None:
            config = dataclasses.replace(
                config, log_level=_choice(log_level, "log_level", LOG_LEVELS)
            )
        if etcd_endpoints is not None:
            endpoints = _endpoints(list(etcd_endpoints), "etcd.endpoints")
            _check_etcd_tls_scheme(endpoints, config.etcd.tls)
            config = dataclasses.replace(
                config, etcd=dataclasses.replace(config.etcd, endpoints=endpoints)
            )
        if control_plane_port is not None:
            cp = config.control_plane
            if cp is None:
                raise ConfigError("control_plane.port", "cannot override: role not enabled")
            port = _integer(control_plane_port, "control_plane.port", 1, 65535)
            config = dataclasses.replace(config, control_plane=dataclasses.replace(cp, port=port))
        if idc is not None or api_port is not None:
            rg = config.regional
            if rg is None:
                what = "regional.idc" if idc is not None else "regional.port"
                raise ConfigError(what, "cannot override: role not enabled")
            if idc is not None:
                rg = dataclasses.replace(rg, idc=_idc(idc, "regional.idc"))
            if api_port is not None:
                rg = dataclasses.replace(rg, port=_integer(api_port, "regional.port", 1, 65535))
            config = dataclasses.replace(config, regional=rg)
        _check_port_clash(config)
        return config


# --------------------------------------------------------------------------- entry points


def _read_toml(path: str | Path) -> tuple[dict[str, object], Path]:
    """The TOML file's tables and the directory its relative paths are relative to."""
    file = Path(path)
    try:
        with file.open("rb") as fp:
            data = tomllib.load(fp)
    except OSError as exc:
        raise ConfigError(str(file), f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(file), f"not valid UTF-8: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        # The message carries "(at line L, column C)".
        raise ConfigError(str(file), f"invalid TOML: {exc}") from exc
    return data, file.absolute().parent


def load_config(path: str | Path) -> Config:
    """Read and validate the TOML file at ``path``; relative paths in it are relative to it."""
    data, base = _read_toml(path)
    return parse_config(data, base_dir=base)


def load_etcd_config(path: str | Path) -> EtcdConfig:
    """Only the ``[etcd]`` section of the TOML file at ``path``, validated as ``load_config`` does.

    Other sections are not validated: the operator commands must work with a file that has
    no role sections (or a role section this version does not know).
    """
    data, base = _read_toml(path)
    return _parse_etcd(data.get("etcd", {}), "etcd", base)


def parse_endpoints(raw: Sequence[str], path: str) -> tuple[str, ...]:
    """Validate etcd endpoint URLs given outside a file (``path`` names them in errors)."""
    return _endpoints(list(raw), path)


def with_etcd_endpoints(cfg: EtcdConfig, endpoints: tuple[str, ...]) -> EtcdConfig:
    """``cfg`` talking to ``endpoints`` instead (checked against its TLS settings)."""
    _check_etcd_tls_scheme(endpoints, cfg.tls)
    return dataclasses.replace(cfg, endpoints=endpoints)


def parse_config(data: Mapping[str, object], *, base_dir: Path | None = None) -> Config:
    """Validate already-parsed TOML data; relative file paths are resolved against ``base_dir``
    (the current directory when ``None``)."""
    base = (base_dir if base_dir is not None else Path.cwd()).absolute()
    top = _Section(
        data,
        "",
        (
            "roles",
            "log_level",
            "log_format",
            "shutdown_timeout",
            "etcd",
            "control_plane",
            "regional",
        ),
    )
    roles = _roles(top.get("roles", [ROLE_REGIONAL]), "roles")
    log_level = _choice(top.get("log_level", "info"), "log_level", LOG_LEVELS)
    log_format = _choice(top.get("log_format", "json"), "log_format", LOG_FORMATS)
    shutdown_timeout = _number(
        top.get("shutdown_timeout", 10.0), "shutdown_timeout", 0, 3600, lo_open=True
    )
    etcd = _parse_etcd(top.get("etcd", {}), "etcd", base)
    # A role's section is required iff the role is on; otherwise it is not even validated, so
    # switching roles off does not force the operator to clean up the other section.
    control_plane = None
    if ROLE_CONTROL_PLANE in roles:
        control_plane = _parse_control_plane(
            top.require("control_plane", f"section required by role {ROLE_CONTROL_PLANE!r}"),
            "control_plane",
            base,
        )
    regional = None
    if ROLE_REGIONAL in roles:
        regional = _parse_regional(
            top.require("regional", f"section required by role {ROLE_REGIONAL!r}"),
            "regional",
            base,
        )
    config = Config(
        roles=roles,
        log_level=log_level,
        log_format=log_format,
        shutdown_timeout=shutdown_timeout,
        etcd=etcd,
        control_plane=control_plane,
        regional=regional,
    )
    _check_port_clash(config)
    return config


def dev_config(
    *,
    etcd_endpoints: Sequence[str],
    idc: str = "dc1",
    control_plane_port: int = 8080,
    regional_port: int = 8081,
) -> Config:
    """Configuration for ``lpmosd dev``: both roles on loopback, demo plan with quick steps."""
    endpoints = _endpoints(list(etcd_endpoints), "etcd.endpoints")
    demo = Plan(
        os_type=DEMO_PLAN.os_type,
        steps=tuple(dataclasses.replace(step, simulate=1.5) for step in DEMO_PLAN.steps),
    )
    config = Config(
        roles=ROLES,
        log_level="info",
        log_format="text",  # a developer reads these in a terminal
        shutdown_timeout=5.0,
        etcd=EtcdConfig(endpoints=endpoints),
        # Loopback only: dev mode has no TLS, so it must not face a network.
        control_plane=ControlPlaneConfig(
            listen="127.0.0.1",
            port=_integer(control_plane_port, "control_plane.port", 1, 65535),
        ),
        regional=RegionalConfig(
            idc=_idc(idc, "regional.idc"),
            listen="127.0.0.1",
            port=_integer(regional_port, "regional.port", 1, 65535),
            plans=types.MappingProxyType({demo.os_type: demo}),
        ),
    )
    _check_port_clash(config)
    return config


# --------------------------------------------------------------------------- sections


def _parse_etcd(value: object, path: str, base: Path) -> EtcdConfig:
    sec = _Section(
        value,
        path,
        ("endpoints", "dial_timeout", "request_timeout", "keepalive_interval", "tls", "auth"),
    )
    endpoints = _endpoints(sec.get("endpoints", list(_DEFAULT_ENDPOINTS)), sec.key("endpoints"))
    dial_timeout = _number(
        sec.get("dial_timeout", 5.0), sec.key("dial_timeout"), 0, 300, lo_open=True
    )
    request_timeout = _number(
        sec.get("request_timeout", 10.0), sec.key("request_timeout"), 0, 3600, lo_open=True
    )
    # etcd's gRPC server refuses (GOAWAY "too_many_pings") pings more often than every 5 s.
    keepalive_interval = _number(
        sec.get("keepalive_interval", 10.0), sec.key("keepalive_interval"), 5, 3600
    )
    tls = None
    if "tls" in sec:
        tls_sec = _Section(sec.get("tls"), sec.key("tls"), ("ca_file", "cert_file", "key_file"))
        tls = EtcdTLS(
            ca_file=tls_sec.readable_file("ca_file", base),
            cert_file=tls_sec.readable_file("cert_file", base),
            key_file=tls_sec.readable_file("key_file", base, secret=True),
        )
        _check_pair(tls_sec, "cert_file", tls.cert_file, "key_file", tls.key_file)
    _check_etcd_tls_scheme(endpoints, tls)
    auth = None
    if "auth" in sec:
        auth_sec = _Section(sec.get("auth"), sec.key("auth"), ("username", "password_file"))
        username = _string(auth_sec.require("username"), auth_sec.key("username"))
        if not username:
            raise ConfigError(auth_sec.key("username"), "must not be empty")
        password_file = auth_sec.readable_file("password_file", base, secret=True, required=True)
        assert password_file is not None  # required=True
        # Fail at load time, not at the first reconnect, if the file is empty or unreadable.
        _read_password_file(password_file, auth_sec.key("password_file"))
        auth = EtcdAuth(username=username, password_file=password_file)
    return EtcdConfig(
        endpoints=endpoints,
        dial_timeout=dial_timeout,
        request_timeout=request_timeout,
        keepalive_interval=keepalive_interval,
        tls=tls,
        auth=auth,
    )


def _parse_control_plane(value: object, path: str, base: Path) -> ControlPlaneConfig:
    sec = _Section(
        value,
        path,
        (
            "listen",
            "port",
            "tls_cert_file",
            "tls_key_file",
            "max_body_bytes",
            "metrics_public",
            "disruption",
            "compaction_interval",
        ),
    )
    cert, key = _listener_tls(sec, base)
    disruption = DisruptionConfig()
    if "disruption" in sec:
        disruption = _parse_disruption(sec.get("disruption"), sec.key("disruption"))
    compaction = _number(
        sec.get("compaction_interval", 300.0), sec.key("compaction_interval"), 0, 86_400
    )
    if 0 < compaction < 1:
        raise ConfigError(sec.key("compaction_interval"), "must be 0 (off) or at least 1 second")
    return ControlPlaneConfig(
        compaction_interval=compaction,
        listen=_host(sec.get("listen", "0.0.0.0"), sec.key("listen")),
        port=_integer(sec.get("port", 8080), sec.key("port"), 1, 65535),
        tls_cert_file=cert,
        tls_key_file=key,
        max_body_bytes=_integer(
            sec.get("max_body_bytes", _DEFAULT_MAX_BODY),
            sec.key("max_body_bytes"),
            *_MAX_BODY_RANGE,
        ),
        metrics_public=_boolean(sec.get("metrics_public", True), sec.key("metrics_public")),
        disruption=disruption,
    )


def _parse_disruption(value: object, path: str) -> DisruptionConfig:
    names = (
        "enabled",
        "silent_share",
        "min_silent_agents",
        "silent_after",
        "sample_size",
        "decision_delay",
    )
    sec = _Section(value, path, names)
    d = DisruptionConfig()
    return DisruptionConfig(
        enabled=_boolean(sec.get("enabled", d.enabled), sec.key("enabled")),
        silent_share=_number(
            sec.get("silent_share", d.silent_share), sec.key("silent_share"), 0, 1, lo_open=True
        ),
        min_silent_agents=_integer(
            sec.get("min_silent_agents", d.min_silent_agents),
            sec.key("min_silent_agents"),
            1,
            1_000_000,
        ),
        silent_after=_number(
            sec.get("silent_after", d.silent_after), sec.key("silent_after"), 0, 1, lo_open=True
        ),
        sample_size=_integer(
            sec.get("sample_size", d.sample_size), sec.key("sample_size"), 1, 1000
        ),
        decision_delay=_number(
            sec.get("decision_delay", d.decision_delay), sec.key("decision_delay"), 0, 5
        ),
    )


def _parse_regional(value: object, path: str, base: Path) -> RegionalConfig:
    sec = _Section(
        value,
        path,
        (
            "idc",
            "listen",
            "port",
            "tls_cert_file",
            "tls_key_file",
            "agent_lease_ttl",
            "session_ttl",
            "heartbeat_interval",
            "max_body_bytes",
            "rate_limit_per_second",
            "rate_limit_burst",
            "metrics_public",
            "plans",
            "state_dir",
            "journal_max_entries",
            "journal_after",
            "http_server",
            "max_active_writes",
            "max_queued_writes",
            "boot",
        ),
    )
    idc = _idc(sec.get("idc", ""), sec.key("idc"))
    cert, key = _listener_tls(sec, base)
    agent_lease_ttl = _integer(sec.get("agent_lease_ttl", 30), sec.key("agent_lease_ttl"), 5, 600)
    session_ttl = _integer(sec.get("session_ttl", 10), sec.key("session_ttl"), 3, 120)
    heartbeat_interval = _integer(
        sec.get("heartbeat_interval", 10), sec.key("heartbeat_interval"), 1, 600
    )
    # At least two heartbeats must fit in one lease TTL, so one lost request does not kill it.
    if heartbeat_interval * 2 >= agent_lease_ttl:
        raise ConfigError(
            sec.key("heartbeat_interval"),
            f"must be less than half of {sec.key('agent_lease_ttl')} ({agent_lease_ttl})",
        )
    plans = _default_plans()
    if "plans" in sec:
        plans = _parse_plans(sec.get("plans"), sec.key("plans"))
    return RegionalConfig(
        idc=idc,
        listen=_host(sec.get("listen", "0.0.0.0"), sec.key("listen")),
        port=_integer(sec.get("port", 8081), sec.key("port"), 1, 65535),
        tls_cert_file=cert,
        tls_key_file=key,
        agent_lease_ttl=agent_lease_ttl,
        session_ttl=session_ttl,
        heartbeat_interval=heartbeat_interval,
        max_body_bytes=_integer(
            sec.get("max_body_bytes", _DEFAULT_MAX_BODY),
            sec.key("max_body_bytes"),
            *_MAX_BODY_RANGE,
        ),
        rate_limit_per_second=_number(
            sec.get("rate_limit_per_second", 50.0),
            sec.key("rate_limit_per_second"),
            0,
            1_000_000,
            lo_open=True,
        ),
        rate_limit_burst=_integer(
            sec.get("rate_limit_burst", 100), sec.key("rate_limit_burst"), 1, 1_000_000
        ),
        metrics_public=_boolean(sec.get("metrics_public", True), sec.key("metrics_public")),
        plans=plans,
        state_dir=_directory(sec.get("state_dir", "/var/lib/lpmosd"), sec.key("state_dir"), base),
        journal_max_entries=_integer(
            sec.get("journal_max_entries", 100_000), sec.key("journal_max_entries"), 1, 10_000_000
        ),
        journal_after=_number(
            sec.get("journal_after", 2.0), sec.key("journal_after"), 0, 60, lo_open=True
        ),
        http_server=_choice(
            sec.get("http_server", "lean"), sec.key("http_server"), ("lean", "hypercorn")
        ),
        max_active_writes=_integer(
            sec.get("max_active_writes", 64), sec.key("max_active_writes"), 1, 4096
        ),
        max_queued_writes=_integer(
            sec.get("max_queued_writes", 1000), sec.key("max_queued_writes"), 0, 1_000_000
        ),
        boot=_parse_boot(sec.get("boot", {}), sec.key("boot"), base),
    )


def _directory(value: object, path: str, base: Path) -> Path:
    text = _string(value, path)
    if not text:
        raise ConfigError(path, "must not be empty")
    directory = Path(text)
    return directory if directory.is_absolute() else base / directory


def _parse_boot(value: object, path: str, base: Path) -> BootConfig:
    sec = _Section(value, path, ("artifacts_dir", "public_url"))
    artifacts_dir = None
    if "artifacts_dir" in sec:
        artifacts_dir = _resolve(sec.get("artifacts_dir"), sec.key("artifacts_dir"), base)
    public_url = None
    if "public_url" in sec:
        raw = _string(sec.get("public_url"), sec.key("public_url"))
        try:
            public_url = check_base_url(raw)
        except ValidationError:
            message = "must be http(s)://host[:port][/path]"
            raise ConfigError(sec.key("public_url"), message) from None
    return BootConfig(artifacts_dir=artifacts_dir, public_url=public_url)


def _parse_plans(value: object, path: str) -> Mapping[str, Plan]:
    table = _table(value, path)
    plans = dict(_default_plans())  # "demo" always exists; the file may replace it
    for os_type, plan_value in table.items():
        plan_path = _join(path, os_type)
        sec = _Section(plan_value, plan_path, ("steps", "image"))
        steps_path = sec.key("steps")
        raw_steps = sec.require("steps")
        if not isinstance(raw_steps, list) or not all(isinstance(s, Mapping) for s in raw_steps):
            raise ConfigError(steps_path, "must be a list of tables")
        for i, raw in enumerate(raw_steps):
            _Section(raw, f"{steps_path}[{i}]", STEP_KEYS)  # unknown keys, with a hint
        try:
            check_os_type(os_type)
            steps = parse_steps(raw_steps)
        except PlanError as exc:
            where = f"{plan_path}.{exc.path}" if exc.path else plan_path
            raise ConfigError(where, exc.message) from None
        image = ""
        if "image" in sec:
            image = _artifact_path(sec.get("image"), sec.key("image"))
        plans[os_type] = Plan(os_type=os_type, steps=steps, image=image)
    return types.MappingProxyType(plans)


def _artifact_path(value: object, path: str) -> str:
    """A path relative to the artifacts directory: plain segments, no way out of it."""
    text = _string(value, path)
    try:
        return check_artifact_path(text)
    except ValidationError as exc:
        raise ConfigError(path, exc.message) from None


def _listener_tls(sec: _Section, base: Path) -> tuple[Path | None, Path | None]:
    cert = sec.readable_file("tls_cert_file", base)
    key = sec.readable_file("tls_key_file", base, secret=True)
    _check_pair(sec, "tls_cert_file", cert, "tls_key_file", key)
    return cert, key


# --------------------------------------------------------------------------- cross checks


def _check_pair(sec: _Section, a: str, a_val: object, b: str, b_val: object) -> None:
    if a_val is not None and b_val is None:
        raise ConfigError(sec.key(b), f"is required when {a} is set")
    if b_val is not None and a_val is None:
        raise ConfigError(sec.key(a), f"is required when {b} is set")


def _check_etcd_tls_scheme(endpoints: Sequence[str], tls: EtcdTLS | None) -> None:
    if tls is not None and not endpoints[0].startswith("https://"):
        raise ConfigError("etcd.tls", "is set, but etcd.endpoints use http://")


def _check_port_clash(config: Config) -> None:
    cp, rg = config.control_plane, config.regional
    if cp is None or rg is None or cp.port != rg.port:
        return
    if cp.listen == rg.listen or cp.listen in _WILDCARD_HOSTS or rg.listen in _WILDCARD_HOSTS:
        raise ConfigError("regional.port", f"conflicts with control_plane.port ({cp.port})")


# --------------------------------------------------------------------------- value checks


class _Section:
    """A TOML table at a dotted path, with its unknown keys already rejected."""

    def __init__(self, value: object, path: str, allowed: Collection[str]) -> None:
        self.path = path
        self.data = _table(value, path)
        for key in self.data:
            if key not in allowed:
                close = difflib.get_close_matches(key, list(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(self.key(key), f"unknown key{hint}")

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def key(self, name: str) -> str:
        return _join(self.path, name)

    def get(self, name: str, default: object = None) -> object:
        return self.data.get(name, default)

    def require(self, name: str, message: str = "is required") -> object:
        if name not in self.data:
            raise ConfigError(self.key(name), message)
        return self.data[name]

    def readable_file(
        self, name: str, base: Path, *, secret: bool = False, required: bool = False
    ) -> Path | None:
        if name not in self.data:
            if required:
                raise ConfigError(self.key(name), "is required")
            return None
        return _readable_file(self.data[name], self.key(name), base, secret=secret)


def _join(path: str, key: str) -> str:
    part = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{part}" if path else part


def _table(value: object, path: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, "must be a table")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, "must be a string")
    return value


def _str_list(value: object, path: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(path, "must be a list of strings")
    return value


def _choice(value: object, path: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(path, f"must be one of: {', '.join(choices)}")
    return value


def _boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, "must be true or false")
    return value


def _integer(value: object, path: str, lo: int, hi: int) -> int:
    # bool is an int subclass; `port = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, "must be an integer")
    if not lo <= value <= hi:
        raise ConfigError(path, f"must be {lo}..{hi}")
    return value


def _number(value: object, path: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    try:
        return bounded_number(value, lo, hi, lo_open=lo_open)
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None


def _roles(value: object, path: str) -> frozenset[str]:
    roles = _str_list(value, path)
    if not roles:
        raise ConfigError(path, f"must name at least one of: {', '.join(sorted(ROLES))}")
    for i, role in enumerate(roles):
        if role not in ROLES:
            raise ConfigError(
                f"{path}[{i}]", f"unknown role {role!r} (expected: {', '.join(sorted(ROLES))})"
            )
        if role in roles[:i]:
            raise ConfigError(f"{path}[{i}]", f"duplicate role {role!r}")
    return frozenset(roles)


def _idc(value: object, path: str) -> str:
    idc = _string(value, path)
    if not idc:
        raise ConfigError(path, "must be set (the IDC this host serves)")
    # The schema's rule: it becomes an etcd key segment.
    if not NAME_RE.fullmatch(idc):
        raise ConfigError(path, f"must match {NAME_RE.pattern}")
    return idc


def _host(value: object, path: str) -> str:
    host = _string(value, path)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.fullmatch(host):
            raise ConfigError(path, "must be an IP address or host name") from None
    return host


def _endpoints(value: object, path: str) -> tuple[str, ...]:
    raw = _str_list(value, path)
    if not raw:
        raise ConfigError(path, "must list at least one endpoint")
    endpoints: list[str] = []
    for i, url in enumerate(raw):
        item = f"{path}[{i}]"
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            port = None
            parts = None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or port is None
            or parts.username is not None
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            raise ConfigError(
                item, f"must be an http:// or https:// URL with host:port, got {url!r}"
            )
        normalized = f"{parts.scheme}://{parts.netloc}"
        if normalized in endpoints:
            raise ConfigError(item, f"duplicate endpoint {url!r}")
        endpoints.append(normalized)
    # One TLS setting applies to every member; a mix is a typo, not a topology.
    if len({e.split(":", 1)[0] for e in endpoints}) > 1:
        raise ConfigError(path, "must not mix http:// and https://")
    return tuple(endpoints)


def _resolve(value: object, path: str, base: Path) -> Path:
    text = _string(value, path)
    if not text:
        raise ConfigError(path, "must not be empty")
    return base / text  # an absolute `text` replaces `base`


def _readable_file(value: object, path: str, base: Path, *, secret: bool) -> Path:
    file = _resolve(value, path, base)
    try:
        st = file.stat()
    except OSError as exc:
        raise ConfigError(path, f"{file}: {exc.strerror or exc}") from exc
    # Checked before open(): opening a FIFO would block the load.
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(path, f"{file}: not a regular file")
    if secret and st.st_mode & 0o007:
        raise ConfigError(
            path,
            f"{file}: secret is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            "chmod o-rwx it",
        )
    try:
        with file.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(path, f"{file}: cannot read: {exc.strerror or exc}") from exc
    return file


def _read_password_file(file: Path, path: str) -> str:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(path, f"{file}: cannot read: {reason}") from exc
    # Strip exactly one line ending: anything else may be part of the password.
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise ConfigError(path, f"{file}: is empty")
    return text
