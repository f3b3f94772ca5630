"""Tests for lpmosd.config: defaults, every error's key path, files, overrides, dev config."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path

import pytest

from lpmosd.config import (
    ROLES,
    Config,
    ControlPlaneConfig,
    DisruptionConfig,
    EtcdAuth,
    EtcdConfig,
    EtcdTLS,
    RegionalConfig,
    dev_config,
    load_config,
    parse_config,
)
from lpmosd.errors import ConfigError
from lpmosd.plan import DEBIAN_12_PLAN, DEMO_PLAN, PLAN_PLACEHOLDERS, Plan, PlanStep, render_command

SHIPPED = Path(__file__).resolve().parent.parent / "packaging" / "lpmosd.toml"
REGIONAL = '[regional]\nidc = "dc1"\n'
CONTROL_PLANE = 'roles = ["control-plane"]\n[control_plane]\n'
BOTH = 'roles = ["control-plane", "regional"]\n[control_plane]\n[regional]\nidc = "dc1"\n'


def parse(text: str, base_dir: Path | None = None) -> Config:
    return parse_config(tomllib.loads(text), base_dir=base_dir)


def error(text: str, base_dir: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, base_dir)
    return str(info.value)


def secret_file(path: Path, content: str = "s3cret\n", mode: int = 0o640) -> Path:
    path.write_text(content)
    path.chmod(mode)
    return path


# --------------------------------------------------------------------------- defaults


def test_regional_defaults() -> None:
    config = parse(REGIONAL)
    assert config.roles == frozenset({"regional"})
    assert (config.log_level, config.log_format, config.shutdown_timeout) == ("info", "json", 10.0)
    assert config.control_plane is None
    assert config.etcd == EtcdConfig(
        endpoints=("http://127.0.0.1:2379",),
        dial_timeout=5.0,
        request_timeout=10.0,
        keepalive_interval=10.0,
        tls=None,
        auth=None,
    )
    assert config.etcd.read_password() is None
    rg = config.regional
    assert rg is not None
    assert rg == RegionalConfig(idc="dc1")
    assert (rg.listen, rg.port, rg.tls_cert_file, rg.tls_key_file) == ("0.0.0.0", 8081, None, None)
    assert (rg.agent_lease_ttl, rg.session_ttl, rg.heartbeat_interval) == (30, 10, 10)
    assert (rg.max_body_bytes, rg.rate_limit_per_second, rg.rate_limit_burst) == (
        1048576,
        50.0,
        100,
    )
    assert dict(rg.plans) == {"demo": DEMO_PLAN, "debian-12": DEBIAN_12_PLAN}


def test_empty_file_means_regional_role_and_needs_its_section() -> None:
    assert error("") == "regional: section required by role 'regional'"


def test_disruption_thresholds() -> None:
    config = parse(
        CONTROL_PLANE + "[control_plane.disruption]\nsilent_share = 0.4\nmin_silent_agents = 5\n"
    )
    assert config.control_plane is not None
    d = config.control_plane.disruption
    assert (d.enabled, d.silent_share, d.min_silent_agents) == (True, 0.4, 5)
    assert d == dataclasses.replace(DisruptionConfig(), silent_share=0.4, min_silent_agents=5)
    bad = CONTROL_PLANE + "[control_plane.disruption]\n"
    assert error(bad + "silent_share = 0") == (
        "control_plane.disruption.silent_share: must be > 0 and ≤ 1"
    )
    assert error(bad + "silent_after = 2") == (
        "control_plane.disruption.silent_after: must be > 0 and ≤ 1"
    )
    assert error(bad + "min_silent_agents = 0") == (
        "control_plane.disruption.min_silent_agents: must be 1..1000000"
    )
    assert error(bad + "enable = false") == (
        "control_plane.disruption.enable: unknown key (did you mean 'enabled'?)"
    )


def test_control_plane_defaults() -> None:
    config = parse(CONTROL_PLANE)
    assert config.roles == frozenset({"control-plane"})
    assert config.regional is None
    assert config.control_plane == ControlPlaneConfig(
        listen="0.0.0.0",
        port=8080,
        tls_cert_file=None,
        tls_key_file=None,
        max_body_bytes=1048576,
        metrics_public=True,
    )
    assert error('roles = ["control-plane"]') == (
        "control_plane: section required by role 'control-plane'"
    )


def test_both_roles_and_ignored_section() -> None:
    config = parse(BOTH)
    assert config.roles == ROLES
    assert config.control_plane is not None and config.regional is not None
    # A section whose role is off is not validated (here: idc left empty, unknown key).
    config = parse(CONTROL_PLANE + '[regional]\nidc = ""\nbogus = 1\n')
    assert config.regional is None


def test_full_example_values() -> None:
    config = parse(
        """
        roles = ["regional", "control-plane"]
        log_level = "debug"
        log_format = "text"
        shutdown_timeout = 2
        [etcd]
        endpoints = ["http://10.0.0.1:2379/", "http://[::1]:2380"]
        dial_timeout = 1.5
        request_timeout = 3
        keepalive_interval = 5
        [control_plane]
        listen = "127.0.0.1"
        port = 9000
        max_body_bytes = 2048
        metrics_public = false
        [regional]
        idc = "DC-1.a_b"
        listen = "::"
        port = 9001
        agent_lease_ttl = 600
        session_ttl = 120
        heartbeat_interval = 299
        max_body_bytes = 4096
        rate_limit_per_second = 0.5
        rate_limit_burst = 1
        metrics_public = false
        """
    )
    assert config.log_level == "debug" and config.log_format == "text"
    assert config.shutdown_timeout == 2.0 and isinstance(config.shutdown_timeout, float)
    assert config.etcd.endpoints == ("http://10.0.0.1:2379", "http://[::1]:2380")
    assert (config.etcd.dial_timeout, config.etcd.request_timeout) == (1.5, 3.0)
    assert config.etcd.keepalive_interval == 5.0
    assert config.control_plane == ControlPlaneConfig(
        listen="127.0.0.1", port=9000, max_body_bytes=2048, metrics_public=False
    )
    rg = config.regional
    assert rg is not None
    assert (rg.idc, rg.listen, rg.port) == ("DC-1.a_b", "::", 9001)
    assert (rg.agent_lease_ttl, rg.session_ttl, rg.heartbeat_interval) == (600, 120, 299)
    assert (rg.rate_limit_per_second, rg.rate_limit_burst, rg.max_body_bytes) == (0.5, 1, 4096)
    assert rg.metrics_public is False


def test_config_is_frozen() -> None:
    config = parse(REGIONAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.log_level = "debug"  # type: ignore[misc]
    assert config.regional is not None
    with pytest.raises(TypeError):
        config.regional.plans["x"] = DEMO_PLAN  # type: ignore[index]


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('roles = "regional"\n' + REGIONAL, "roles: must be a list of strings"),
        ("roles = []\n" + REGIONAL, "roles: must name at least one of: control-plane, regional"),
        (
            'roles = ["regional", "web"]\n' + REGIONAL,
            "roles[1]: unknown role 'web' (expected: control-plane, regional)",
        ),
        ('roles = ["regional", "regional"]\n' + REGIONAL, "roles[1]: duplicate role 'regional'"),
        (
            'log_level = "verbose"\n' + REGIONAL,
            "log_level: must be one of: debug, info, warning, error",
        ),
        (
            'log_level = "INFO"\n' + REGIONAL,
            "log_level: must be one of: debug, info, warning, error",
        ),
        ('log_format = "xml"\n' + REGIONAL, "log_format: must be one of: json, text"),
        ("shutdown_timeout = 0\n" + REGIONAL, "shutdown_timeout: must be > 0 and ≤ 3600"),
        ('shutdown_timeout = "5"\n' + REGIONAL, "shutdown_timeout: must be a number"),
        ("shutdown_timeout = true\n" + REGIONAL, "shutdown_timeout: must be a number"),
        ("shutdown_timeout = nan\n" + REGIONAL, "shutdown_timeout: must be > 0 and ≤ 3600"),
        ("shutdown_timeout = inf\n" + REGIONAL, "shutdown_timeout: must be > 0 and ≤ 3600"),
        ('etcd = "x"\n' + REGIONAL, "etcd: must be a table"),
        (
            '[etcd]\nendpoints = "http://a:1"\n' + REGIONAL,
            "etcd.endpoints: must be a list of strings",
        ),
        ("[etcd]\nendpoints = [1]\n" + REGIONAL, "etcd.endpoints: must be a list of strings"),
        ("[etcd]\nendpoints = []\n" + REGIONAL, "etcd.endpoints: must list at least one endpoint"),
        (
            '[etcd]\nendpoints = ["http://a:1", "127.0.0.1:2379"]\n' + REGIONAL,
            "etcd.endpoints[1]: must be an http:// or https:// URL with host:port, "
            "got '127.0.0.1:2379'",
        ),
        (
            '[etcd]\nendpoints = ["http://localhost"]\n' + REGIONAL,
            "etcd.endpoints[0]: must be an http:// or https:// URL with host:port, "
            "got 'http://localhost'",
        ),
        (
            '[etcd]\nendpoints = ["unix:///run/etcd.sock"]\n' + REGIONAL,
            "etcd.endpoints[0]: must be an http:// or https:// URL with host:port, "
            "got 'unix:///run/etcd.sock'",
        ),
        (
            '[etcd]\nendpoints = ["http://a:99999"]\n' + REGIONAL,
            "etcd.endpoints[0]: must be an http:// or https:// URL with host:port, "
            "got 'http://a:99999'",
        ),
        (
            '[etcd]\nendpoints = ["http://u:p@a:1"]\n' + REGIONAL,
            "etcd.endpoints[0]: must be an http:// or https:// URL with host:port, "
            "got 'http://u:p@a:1'",
        ),
        (
            '[etcd]\nendpoints = ["http://a:1/v3"]\n' + REGIONAL,
            "etcd.endpoints[0]: must be an http:// or https:// URL with host:port, "
            "got 'http://a:1/v3'",
        ),
        (
            '[etcd]\nendpoints = ["http://a:1", "http://a:1/"]\n' + REGIONAL,
            "etcd.endpoints[1]: duplicate endpoint 'http://a:1/'",
        ),
        (
            '[etcd]\nendpoints = ["http://a:1", "https://b:1"]\n' + REGIONAL,
            "etcd.endpoints: must not mix http:// and https://",
        ),
        ("[etcd]\ndial_timeout = 0\n" + REGIONAL, "etcd.dial_timeout: must be > 0 and ≤ 300"),
        (
            "[etcd]\nrequest_timeout = -1\n" + REGIONAL,
            "etcd.request_timeout: must be > 0 and ≤ 3600",
        ),
        (
            "[etcd]\nkeepalive_interval = 4.9\n" + REGIONAL,
            "etcd.keepalive_interval: must be 5..3600",
        ),
        ("[etcd.tls]\n" + REGIONAL, "etcd.tls: is set, but etcd.endpoints use http://"),
        ('[etcd.auth]\npassword_file = "/x"\n' + REGIONAL, "etcd.auth.username: is required"),
        ('[etcd.auth]\nusername = ""\n' + REGIONAL, "etcd.auth.username: must not be empty"),
        ("[etcd.auth]\nusername = 3\n" + REGIONAL, "etcd.auth.username: must be a string"),
        ('[etcd.auth]\nusername = "u"\n' + REGIONAL, "etcd.auth.password_file: is required"),
        (
            '[etcd.auth]\nusername = "u"\npassword_file = ""\n' + REGIONAL,
            "etcd.auth.password_file: must not be empty",
        ),
        (
            '[etcd.auth]\nusername = "u"\npassword_file = 1\n' + REGIONAL,
            "etcd.auth.password_file: must be a string",
        ),
        ("[regional]\n", "regional.idc: must be set (the IDC this host serves)"),
        ('[regional]\nidc = ""\n', "regional.idc: must be set (the IDC this host serves)"),
        ("[regional]\nidc = 1\n", "regional.idc: must be a string"),
        ('[regional]\nidc = "-dc"\n', "regional.idc: must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}"),
        ('[regional]\nidc = "dc/1"\n', "regional.idc: must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}"),
        (
            f'[regional]\nidc = "{"a" * 65}"\n',
            "regional.idc: must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}",
        ),
        (REGIONAL + "port = 0\n", "regional.port: must be 1..65535"),
        (REGIONAL + "port = 65536\n", "regional.port: must be 1..65535"),
        (REGIONAL + 'port = "8081"\n', "regional.port: must be an integer"),
        (REGIONAL + "port = 8081.0\n", "regional.port: must be an integer"),
        (REGIONAL + "port = true\n", "regional.port: must be an integer"),
        (
            REGIONAL + 'listen = "not a host"\n',
            "regional.listen: must be an IP address or host name",
        ),
        (REGIONAL + 'listen = ""\n', "regional.listen: must be an IP address or host name"),
        (REGIONAL + "listen = 0\n", "regional.listen: must be a string"),
        (REGIONAL + "agent_lease_ttl = 4\n", "regional.agent_lease_ttl: must be 5..600"),
        (REGIONAL + "agent_lease_ttl = 601\n", "regional.agent_lease_ttl: must be 5..600"),
        (REGIONAL + "session_ttl = 2\n", "regional.session_ttl: must be 3..120"),
        (REGIONAL + "session_ttl = 121\n", "regional.session_ttl: must be 3..120"),
        (REGIONAL + "heartbeat_interval = 0\n", "regional.heartbeat_interval: must be 1..600"),
        (REGIONAL + "max_body_bytes = 10\n", "regional.max_body_bytes: must be 1024..67108864"),
        (
            REGIONAL + "rate_limit_per_second = 0\n",
            "regional.rate_limit_per_second: must be > 0 and ≤ 1e+06",
        ),
        (REGIONAL + "rate_limit_burst = 0\n", "regional.rate_limit_burst: must be 1..1000000"),
        (REGIONAL + "plans = []\n", "regional.plans: must be a table"),
        (CONTROL_PLANE + "port = 70000\n", "control_plane.port: must be 1..65535"),
        (
            CONTROL_PLANE + 'listen = "a..b"\n',
            "control_plane.listen: must be an IP address or host name",
        ),
        (
            CONTROL_PLANE + "max_body_bytes = 0\n",
            "control_plane.max_body_bytes: must be 1024..67108864",
        ),
        (
            CONTROL_PLANE + "metrics_public = 1\n",
            "control_plane.metrics_public: must be true or false",
        ),
        (REGIONAL + 'metrics_public = "no"\n', "regional.metrics_public: must be true or false"),
        ('roles = ["control-plane"]\ncontrol_plane = 1\n', "control_plane: must be a table"),
    ],
)
def test_bad_value_names_key_path(text: str, message: str) -> None:
    assert error(text) == message


def test_error_carries_path_and_message() -> None:
    with pytest.raises(ConfigError) as info:
        parse(REGIONAL + "port = 0\n")
    assert (info.value.path, info.value.message) == ("regional.port", "must be 1..65535")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1\n" + REGIONAL, "colour: unknown key"),
        ("log_levle = 'info'\n" + REGIONAL, "log_levle: unknown key (did you mean 'log_level'?)"),
        (
            "[control-plane]\n" + REGIONAL,
            "control-plane: unknown key (did you mean 'control_plane'?)",
        ),
        (
            "[etcd]\nendpoint = []\n" + REGIONAL,
            "etcd.endpoint: unknown key (did you mean 'endpoints'?)",
        ),
        ("[etcd.tls]\nca = 1\n" + REGIONAL, "etcd.tls.ca: unknown key"),
        (
            "[etcd.auth]\npassword = 'x'\n" + REGIONAL,
            "etcd.auth.password: unknown key (did you mean 'password_file'?)",
        ),
        (
            CONTROL_PLANE + "metric_public = 1\n",
            "control_plane.metric_public: unknown key (did you mean 'metrics_public'?)",
        ),
        (REGIONAL + "api_port = 1\n", "regional.api_port: unknown key (did you mean 'port'?)"),
        (
            REGIONAL + '[regional.plans."Ubuntu 22.04"]\nsteps = []\nos = 1\n',
            'regional.plans."Ubuntu 22.04".os: unknown key',
        ),
        (
            REGIONAL + '[[regional.plans.x.steps]]\nname = "a"\ncommand = ["/a"]\nshell = true\n',
            "regional.plans.x.steps[0].shell: unknown key",
        ),
    ],
)
def test_unknown_keys_rejected_everywhere(text: str, message: str) -> None:
    assert error(text) == message


# --------------------------------------------------------------------------- files and TLS


def test_tls_pairs_required(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("cert")
    key = secret_file(tmp_path / "k.pem")
    https = '[etcd]\nendpoints = ["https://e:2379"]\n'
    assert error(https + f'[etcd.tls]\ncert_file = "{cert}"\n' + REGIONAL) == (
        "etcd.tls.key_file: is required when cert_file is set"
    )
    assert error(https + f'[etcd.tls]\nkey_file = "{key}"\n' + REGIONAL) == (
        "etcd.tls.cert_file: is required when key_file is set"
    )
    assert error(REGIONAL + f'tls_cert_file = "{cert}"\n') == (
        "regional.tls_key_file: is required when tls_cert_file is set"
    )
    assert error(CONTROL_PLANE + f'tls_key_file = "{key}"\n') == (
        "control_plane.tls_cert_file: is required when tls_key_file is set"
    )
    config = parse(
        https
        + f'[etcd.tls]\nca_file = "{cert}"\ncert_file = "{cert}"\nkey_file = "{key}"\n'
        + REGIONAL
        + f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
    )
    assert config.etcd.tls == EtcdTLS(ca_file=cert, cert_file=cert, key_file=key)
    assert config.regional is not None
    assert (config.regional.tls_cert_file, config.regional.tls_key_file) == (cert, key)
    # An empty [etcd.tls] means https with the system CA store.
    assert parse(https + "[etcd.tls]\n" + REGIONAL).etcd.tls == EtcdTLS()


def test_files_must_exist_and_be_regular(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    assert error(REGIONAL + f'tls_cert_file = "{missing}"\ntls_key_file = "{missing}"\n') == (
        f"regional.tls_cert_file: {missing}: No such file or directory"
    )
    assert error(
        '[etcd]\nendpoints = ["https://e:1"]\n' + f'[etcd.tls]\nca_file = "{tmp_path}"\n' + REGIONAL
    ) == (f"etcd.tls.ca_file: {tmp_path}: not a regular file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert error(
        '[etcd]\nendpoints = ["https://e:1"]\n' + f'[etcd.tls]\nca_file = "{fifo}"\n' + REGIONAL
    ) == (f"etcd.tls.ca_file: {fifo}: not a regular file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files")
def test_unreadable_file(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    ca.chmod(0)
    assert error(
        '[etcd]\nendpoints = ["https://e:1"]\n' + f'[etcd.tls]\nca_file = "{ca}"\n' + REGIONAL
    ) == (f"etcd.tls.ca_file: {ca}: cannot read: Permission denied")


def test_secret_files_must_not_be_world_accessible(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("cert")
    cert.chmod(0o644)  # certificates are public
    key = secret_file(tmp_path / "k.pem", mode=0o644)
    assert error(REGIONAL + f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n') == (
        f"regional.tls_key_file: {key}: secret is accessible by other users (mode 0644); "
        "chmod o-rwx it"
    )
    pw = secret_file(tmp_path / "pw", mode=0o604)
    assert error(f'[etcd.auth]\nusername = "u"\npassword_file = "{pw}"\n' + REGIONAL).startswith(
        "etcd.auth.password_file: "
    )


def test_relative_paths_resolved_against_config_dir(tmp_path: Path) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "tls").mkdir(parents=True)
    (conf_dir / "tls" / "ca.pem").write_text("ca")
    (conf_dir / "tls" / "cp.pem").write_text("cert")
    secret_file(conf_dir / "tls" / "cp-key.pem")
    secret_file(conf_dir / "pw")
    (conf_dir / "lpmosd.toml").write_text(
        'roles = ["control-plane"]\n'
        '[etcd]\nendpoints = ["https://e:2379"]\n'
        '[etcd.tls]\nca_file = "tls/ca.pem"\n'
        '[etcd.auth]\nusername = "lpmosd"\npassword_file = "pw"\n'
        '[control_plane]\ntls_cert_file = "tls/cp.pem"\ntls_key_file = "tls/cp-key.pem"\n'
    )
    config = load_config(conf_dir / "lpmosd.toml")
    assert config.etcd.tls == EtcdTLS(ca_file=conf_dir / "tls" / "ca.pem")
    assert config.etcd.auth == EtcdAuth(username="lpmosd", password_file=conf_dir / "pw")
    assert config.control_plane is not None
    assert config.control_plane.tls_cert_file == conf_dir / "tls" / "cp.pem"
    assert config.control_plane.tls_key_file == conf_dir / "tls" / "cp-key.pem"
    # parse_config: relative to base_dir.
    data = tomllib.loads(
        'roles = ["control-plane"]\n[control_plane]\n'
        'tls_cert_file = "etc/tls/cp.pem"\ntls_key_file = "etc/tls/cp-key.pem"\n'
    )
    config = parse_config(data, base_dir=tmp_path)
    assert config.control_plane is not None
    assert config.control_plane.tls_cert_file == conf_dir / "tls" / "cp.pem"


def test_relative_path_without_base_dir_uses_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.pem").write_text("cert")
    secret_file(tmp_path / "k.pem")
    config = parse(CONTROL_PLANE + 'tls_cert_file = "c.pem"\ntls_key_file = "k.pem"\n')
    assert config.control_plane is not None
    assert config.control_plane.tls_cert_file == tmp_path / "c.pem"


def test_password_file_checked_at_load(tmp_path: Path) -> None:
    pw = secret_file(tmp_path / "pw", "\n")
    assert error(f'[etcd.auth]\nusername = "u"\npassword_file = "{pw}"\n' + REGIONAL) == (
        f"etcd.auth.password_file: {pw}: is empty"
    )
    pw.write_bytes(b"\xff\xfe")
    assert error(f'[etcd.auth]\nusername = "u"\npassword_file = "{pw}"\n' + REGIONAL).startswith(
        f"etcd.auth.password_file: {pw}: cannot read: "
    )
    assert error(
        f'[etcd.auth]\nusername = "u"\npassword_file = "{tmp_path / "no"}"\n' + REGIONAL
    ) == (f"etcd.auth.password_file: {tmp_path / 'no'}: No such file or directory")


# --------------------------------------------------------------------------- regional rules


@pytest.mark.parametrize(
    ("ttl", "interval", "ok"), [(30, 14, True), (30, 15, False), (5, 2, True), (5, 3, False)]
)
def test_heartbeat_must_be_under_half_the_lease_ttl(ttl: int, interval: int, ok: bool) -> None:
    text = REGIONAL + f"agent_lease_ttl = {ttl}\nheartbeat_interval = {interval}\n"
    if ok:
        rg = parse(text).regional
        assert rg is not None and rg.heartbeat_interval == interval
    else:
        assert error(text) == (
            "regional.heartbeat_interval: must be less than half of "
            f"regional.agent_lease_ttl ({ttl})"
        )
    # The default interval (10) does not fit a short TTL either.
    assert error(REGIONAL + "agent_lease_ttl = 20\n").startswith("regional.heartbeat_interval:")


def test_port_clash_between_roles() -> None:
    assert (
        error(BOTH + "port = 8080\n") == "regional.port: conflicts with control_plane.port (8080)"
    )
    both_listen = (
        'roles = ["control-plane", "regional"]\n[control_plane]\nlisten = "10.0.0.1"\n'
        '[regional]\nidc = "dc1"\nlisten = "10.0.0.2"\nport = 8080\n'
    )
    assert parse(both_listen).roles == ROLES  # different addresses may share a port


# --------------------------------------------------------------------------- plans


PLAN = (
    REGIONAL
    + """
[regional.plans."Ubuntu 22.04"]
steps = [
  { name = "partitioning", timeout = 600, command = [
      "/usr/lib/lpmosd/steps/partition", "--layout", "{disk_layout}"] },
  { name = "base_system", command = ["/bin/install", "{os_type} {os_version}", "{{literal}}"] },
]
[regional.plans.demo]
steps = [{ name = "only", simulate = 0.1 }]
"""
)


def test_plans_parsed_and_demo_overridable() -> None:
    rg = parse(PLAN).regional
    assert rg is not None
    plan = rg.plan_for("Ubuntu 22.04")
    assert plan == Plan(
        os_type="Ubuntu 22.04",
        steps=(
            PlanStep(
                name="partitioning",
                command=("/usr/lib/lpmosd/steps/partition", "--layout", "{disk_layout}"),
                timeout=600.0,
            ),
            PlanStep(
                name="base_system",
                command=("/bin/install", "{os_type} {os_version}", "{{literal}}"),
                timeout=3600.0,
            ),
        ),
    )
    assert plan.step_names == ("partitioning", "base_system")
    assert render_command(
        plan.steps[1].command,
        {"os_type": "Ubuntu 22.04", "os_version": "22.04", "disk_layout": "auto"},
    ) == ("/bin/install", "Ubuntu 22.04 22.04", "{literal}")
    assert rg.plan_for("demo") == Plan(
        os_type="demo", steps=(PlanStep(name="only", timeout=3600.0, simulate=0.1),)
    )
    assert rg.plan_for("Debian 12") is None
    assert rg.plan_for("demo-2") is None


def test_builtin_demo_plan() -> None:
    assert DEMO_PLAN.step_names == (
        "partitioning",
        "base_system",
        "packages",
        "bootloader",
        "network",
        "post_install",
    )
    assert all(s.command == () and s.simulate == 1.0 for s in DEMO_PLAN.steps)
    rg = parse(
        REGIONAL + '[[regional.plans."CentOS 7".steps]]\nname = "a"\ncommand = ["/a"]\n'
    ).regional
    assert rg is not None
    assert set(rg.plans) == {"demo", "debian-12", "CentOS 7"}
    assert rg.plan_for("demo") is DEMO_PLAN


OS_TYPE_RULE = "os_type must be 1..128 printable characters, no surrounding spaces"
ABSOLUTE = "must be an absolute program path without placeholders"
NO_SPEC = "placeholder {sn} takes no conversion or format spec"
KNOWN = (
    "(known: {disk_layout}, {idc}, {mac}, {network_config}, {os_type}, {os_version}, {sn}, "
    "{task_id}; write {{ }} for braces)"
)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ("[regional.plans.x]\n", "regional.plans.x.steps: is required"),
        ("[regional.plans.x]\nsteps = []\n", "regional.plans.x.steps: must have 1..64 steps"),
        ("[regional.plans.x]\nsteps = [1]\n", "regional.plans.x.steps: must be a list of tables"),
        ("[regional.plans.x]\nsteps = 'a'\n", "regional.plans.x.steps: must be a list of tables"),
        ("[regional.plans]\nx = 1\n", "regional.plans.x: must be a table"),
        (
            '[regional.plans." x"]\nsteps = []\n',
            'regional.plans." x": ' + OS_TYPE_RULE,
        ),
        (
            '[regional.plans.""]\nsteps = []\n',
            'regional.plans."": ' + OS_TYPE_RULE,
        ),
        (
            "[[regional.plans.x.steps]]\ncommand = ['/a']\n",
            "regional.plans.x.steps[0].name: is required",
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'Part'\ncommand = ['/a']\n",
            "regional.plans.x.steps[0].name: must match [a-z0-9][a-z0-9_.-]{0,63}",
        ),
        (
            "[[regional.plans.x.steps]]\nname = 1\ncommand = ['/a']\n",
            "regional.plans.x.steps[0].name: must be a string",
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = ['/a']\n"
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = ['/b']\n",
            "regional.plans.x.steps[1].name: duplicate step name 'a'",
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\n",
            "regional.plans.x.steps[0].command: is required (an argv list) unless simulate is set",
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = []\n",
            "regional.plans.x.steps[0].command: must not be empty",
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = '/bin/sh -c x'\n",
            "regional.plans.x.steps[0].command: must be a list of strings",
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = ['/a', 1]\n",
            "regional.plans.x.steps[0].command: must be a list of strings",
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = ['partition']\n",
            "regional.plans.x.steps[0].command[0]: " + ABSOLUTE,
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = ['/{sn}']\n",
            "regional.plans.x.steps[0].command[0]: " + ABSOLUTE,
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = ['/a', '{disk}']\n",
            "regional.plans.x.steps[0].command[1]: unknown placeholder {disk} " + KNOWN,
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = ['/a', '{sn.x}']\n",
            "regional.plans.x.steps[0].command[1]: unknown placeholder {sn.x} " + KNOWN,
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = ['/a', '{sn!r}']\n",
            "regional.plans.x.steps[0].command[1]: " + NO_SPEC,
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = ['/a', '{sn:>5}']\n",
            "regional.plans.x.steps[0].command[1]: " + NO_SPEC,
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = ['/a', '{']\n",
            "regional.plans.x.steps[0].command[1]: bad placeholder syntax: "
            "Single '{' encountered in format string",
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = ['/a']\ntimeout = 0\n",
            "regional.plans.x.steps[0].timeout: must be 1..86400",
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\ncommand = ['/a']\ntimeout = 86401\n",
            "regional.plans.x.steps[0].timeout: must be 1..86400",
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\nsimulate = 0\n",
            "regional.plans.x.steps[0].simulate: must be > 0 and ≤ 3600",
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\nsimulate = 5\ntimeout = 2\n",
            "regional.plans.x.steps[0].simulate: must be > 0 and ≤ 2",
        ),
        (
            "[[regional.plans.x.steps]]\nname = 'a'\nsimulate = 1\ncommand = ['/a']\n",
            "regional.plans.x.steps[0]: set either command or simulate, not both",
        ),
    ],
)
def test_bad_plans(plan: str, message: str) -> None:
    assert error(REGIONAL + plan) == message


def test_placeholders_constant_matches_task_fields() -> None:
    assert {"sn", "mac", "idc", "os_type", "os_version", "disk_layout"} <= PLAN_PLACEHOLDERS


# --------------------------------------------------------------------------- load_config


def test_load_config_toml_syntax_error(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text('roles = ["regional"]\n[regional\nidc = "dc1"\n')
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert info.value.path == str(file)
    assert str(info.value).startswith(f"{file}: invalid TOML: ")
    assert "line 2" in str(info.value) and "column" in str(info.value)


def test_load_config_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    assert str(info.value) == f"{tmp_path / 'absent.toml'}: cannot read: No such file or directory"
    (tmp_path / "latin1.toml").write_bytes(b'# caf\xe9\n[regional]\nidc = "dc1"\n')
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(tmp_path / "latin1.toml")


def test_load_config_accepts_str_path(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(REGIONAL)
    assert load_config(str(tmp_path / "c.toml")) == parse(REGIONAL)


# --------------------------------------------------------------------------- overrides


def test_with_overrides() -> None:
    config = parse(BOTH)
    new = config.with_overrides(
        idc="dc2",
        api_port=9081,
        control_plane_port=9080,
        etcd_endpoints=["http://10.1.1.1:2379", "http://10.1.1.2:2379"],
        log_level="debug",
    )
    assert new.regional is not None and new.control_plane is not None
    assert (new.regional.idc, new.regional.port, new.control_plane.port) == ("dc2", 9081, 9080)
    assert new.etcd.endpoints == ("http://10.1.1.1:2379", "http://10.1.1.2:2379")
    assert new.log_level == "debug"
    assert config.regional is not None and config.regional.idc == "dc1"  # original untouched
    assert config.with_overrides() == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"idc": ""}, "regional.idc: must be set (the IDC this host serves)"),
        ({"idc": "a b"}, "regional.idc: must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}"),
        ({"api_port": 0}, "regional.port: must be 1..65535"),
        ({"control_plane_port": 65536}, "control_plane.port: must be 1..65535"),
        ({"api_port": 8080}, "regional.port: conflicts with control_plane.port (8080)"),
        ({"etcd_endpoints": []}, "etcd.endpoints: must list at least one endpoint"),
        (
            {"etcd_endpoints": ["localhost:2379"]},
            "etcd.endpoints[0]: must be an http:// or https:// URL with host:port, "
            "got 'localhost:2379'",
        ),
        ({"log_level": "trace"}, "log_level: must be one of: debug, info, warning, error"),
    ],
)
def test_with_overrides_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(BOTH).with_overrides(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_overrides_for_disabled_role_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^regional\.idc: cannot override: role not enabled$"):
        parse(CONTROL_PLANE).with_overrides(idc="dc1")
    with pytest.raises(ConfigError, match=r"^regional\.port: cannot override: role not enabled$"):
        parse(CONTROL_PLANE).with_overrides(api_port=1)
    with pytest.raises(ConfigError, match=r"^control_plane\.port: cannot override"):
        parse(REGIONAL).with_overrides(control_plane_port=1)
    tls = '[etcd]\nendpoints = ["https://e:1"]\n[etcd.tls]\n' + REGIONAL
    with pytest.raises(ConfigError, match=r"^etcd\.tls: is set, but etcd\.endpoints use http://$"):
        parse(tls).with_overrides(etcd_endpoints=["http://e:1"])


# --------------------------------------------------------------------------- dev_config


def test_dev_config() -> None:
    config = dev_config(etcd_endpoints=["http://127.0.0.1:23790"])
    assert config.roles == ROLES
    assert config.etcd.endpoints == ("http://127.0.0.1:23790",)
    assert config.etcd.tls is None and config.etcd.auth is None
    cp, rg = config.control_plane, config.regional
    assert cp is not None and rg is not None
    assert (cp.listen, cp.port, cp.metrics_public) == ("127.0.0.1", 8080, True)
    assert (rg.listen, rg.port, rg.idc) == ("127.0.0.1", 8081, "dc1")
    demo = rg.plan_for("demo")
    assert demo is not None
    assert demo.step_names == DEMO_PLAN.step_names
    assert all(step.simulate == 1.5 and step.command == () for step in demo.steps)
    other = dev_config(
        etcd_endpoints=["http://a:1"], idc="lab", control_plane_port=18080, regional_port=18081
    )
    assert other.regional is not None and other.control_plane is not None
    assert (other.regional.idc, other.regional.port, other.control_plane.port) == (
        "lab",
        18081,
        18080,
    )
    assert other.with_overrides(idc="lab2").regional == dataclasses.replace(
        other.regional, idc="lab2"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"etcd_endpoints": []}, "etcd.endpoints: must list at least one endpoint"),
        (
            {"etcd_endpoints": ["http://a:1"], "idc": "a/b"},
            "regional.idc: must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}",
        ),
        (
            {"etcd_endpoints": ["http://a:1"], "regional_port": 8080},
            "regional.port: conflicts with control_plane.port (8080)",
        ),
        (
            {"etcd_endpoints": ["http://a:1"], "control_plane_port": 0},
            "control_plane.port: must be 1..65535",
        ),
    ],
)
def test_dev_config_validated(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        dev_config(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


# --------------------------------------------------------------------------- shipped file


def test_shipped_config_fails_until_idc_is_set() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SHIPPED)
    assert str(info.value) == "regional.idc: must be set (the IDC this host serves)"


def test_shipped_config_loads_once_idc_is_set(tmp_path: Path) -> None:
    text = SHIPPED.read_text()
    assert text.count('idc = ""') == 1
    (tmp_path / "lpmosd.toml").write_text(text.replace('idc = ""', 'idc = "dc1"'))
    config = load_config(tmp_path / "lpmosd.toml")
    assert config.roles == frozenset({"regional"})
    assert config.regional == RegionalConfig(idc="dc1")
    assert config.etcd.endpoints[0].startswith("https://")
    assert config.etcd.tls is None and config.etcd.auth is None and config.control_plane is None


def test_shipped_config_commented_settings_are_valid(tmp_path: Path) -> None:
    """Enable every commented-out ``#key``/``#[section]`` line: the result must load too."""
    text = SHIPPED.read_text()
    # Settings are written "#key = ..." / "#[table]"; prose is "# ...".
    text = re.sub(r"(?m)^#(?=[\[a-z])", "", text)
    text = text.replace('idc = ""', 'idc = "dc1"')
    text = text.replace('roles = ["regional"]', 'roles = ["control-plane", "regional"]')
    text = text.replace('"/etc/lpmosd/', f'"{tmp_path}/')
    for name in re.findall(rf'"{re.escape(str(tmp_path))}/([^"]+)"', text):
        secret_file(tmp_path / name, "pem-or-password\n")
    (tmp_path / "lpmosd.toml").write_text(text)
    config = load_config(tmp_path / "lpmosd.toml")
    assert config.roles == ROLES
    assert config.etcd.tls is not None and config.etcd.tls.key_file is not None
    assert config.etcd.read_password() == "pem-or-password"
    assert config.control_plane is not None
    assert config.control_plane.tls_cert_file == tmp_path / "control-plane.pem"
    assert config.control_plane.metrics_public is True
    assert config.regional is not None
    plan = config.regional.plan_for("Ubuntu 22.04")
    assert plan is not None and plan.steps[0].name == "partitioning"
    # The commented defaults are the real defaults.
    assert dataclasses.replace(
        config.regional, tls_cert_file=None, tls_key_file=None, plans=RegionalConfig(idc="x").plans
    ) == RegionalConfig(idc="dc1")
