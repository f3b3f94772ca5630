"""The ``lpmosd migrate`` command line: output, exit codes, config handling, export/import."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from lpmosd import cli, opsutil
from lpmosd.etcd import EtcdClient, open_client
from lpmosd.etcd_process import EtcdProcess
from lpmosd.migrate import v2
from lpmosd.migrate.export import read_export
from lpmosd.migrate.v2 import V2Server, V2Writer

from .helpers import Counts, counts, load_fleet

T = TypeVar("T")


def with_client(etcd: EtcdProcess, fn: Callable[[EtcdClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with open_client(etcd.endpoints) as client:
            return await fn(client)

    return trio.run(main)


def run(
    capsys: pytest.CaptureFixture[str], etcd: EtcdProcess | None, *args: str
) -> tuple[int, str, str]:
    argv = list(args) + (["--etcd-endpoints", etcd.endpoint] if etcd else [])
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fleet(etcd: EtcdProcess) -> EtcdProcess:
    """The shared etcd with 12 v2 servers in dc1 and 8 in dc2."""
    with_client(etcd, lambda c: load_fleet(c, {"dc1": 12, "dc2": 8}))
    return etcd


def test_plan_apply_verify(fleet: EtcdProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, fleet, "migrate", "plan", "--idc", "dc1,dc2")
    assert code == 0
    assert "dc1: read at revision" in out and "v2 list /os/dc1/servers: 12 servers" in out
    assert "  migrate       12" in out and "  migrate        8" in out
    assert "the list key will be deleted after the last server" in out
    before = with_client(fleet, lambda c: c.get_prefix("/"))
    code, out, _ = run(capsys, fleet, "migrate", "plan", "--idc", "dc1", "--json")
    plan = json.loads(out)[0]
    assert plan["counts"] == {"migrate": 12, "done": 0, "skip": 0, "conflict": 0}
    assert plan["list_will_be_deleted"] is True
    assert with_client(fleet, lambda c: c.get_prefix("/")).kvs == before.kvs  # wrote nothing

    code, out, _ = run(capsys, fleet, "migrate", "apply", "--idc", "dc1", "--idc", "dc2")
    assert code == 0
    assert out.count("migrated  dc1/") == 12 and out.count("migrated  dc2/") == 8
    assert "dc1: 12 migrated, 0 already done, 0 skipped, 0 in conflict" in out
    assert "/os/dc1/servers deleted" in out

    code, out, _ = run(capsys, fleet, "migrate", "verify", "--all")
    assert code == 0
    assert "dc1: 12 servers checked at revision" in out and "12 match v2" in out
    assert out.count("PASSED") == 2

    # A re-run is quiet about what was done before.
    code, out, _ = run(capsys, fleet, "migrate", "apply", "--all")
    assert code == 0 and "migrated  " not in out
    assert "dc2: 0 migrated, 8 already done" in out


def test_problems_make_exit_status_1(
    fleet: EtcdProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    async def spoil(c: EtcdClient) -> None:
        w = V2Writer(c, "dc1")
        await w.create(V2Server("bad-json", b"{", None))
        await w.add_server("ghost")

    with_client(fleet, spoil)
    code, out, _ = run(capsys, fleet, "migrate", "plan", "--idc", "dc1")
    assert code == 1
    assert "  skip      bad-json: tasks: not valid JSON" in out
    assert "  skip      ghost: listed in /os/dc1/servers but has no tasks" in out
    assert "the list key will be kept: 2 listed servers cannot be migrated" in out
    code, out, _ = run(capsys, fleet, "migrate", "apply", "--idc", "dc1", "-q")
    assert code == 1
    assert "migrated  " not in out  # --quiet
    assert "skipped   dc1/bad-json: tasks: not valid JSON" in out
    assert "note      /os/dc1/servers kept: 2 listed servers are not in v3" in out
    code, out, _ = run(capsys, fleet, "migrate", "verify", "--idc", "dc1")
    assert code == 1 and "FAILED" in out
    assert "problem   -: the v2 server list /os/dc1/servers still exists" in out


def test_export_import_roundtrip(
    fleet: EtcdProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with_client(fleet, lambda c: c.put(v2.state_key("dc2", "raw"), b"\xff\x00binary"))
    v2_keys = with_client(fleet, lambda c: c.get_prefix("/os/")).kvs
    backup = tmp_path / "backup.json"
    code, out, _ = run(capsys, fleet, "migrate", "export", "--all", "-o", str(backup))
    assert code == 0
    assert "dc1: exported 25 v2 keys (12 machines, 12 listed)" in out
    assert backup.stat().st_mode & 0o777 == 0o600
    export = read_export(backup)
    assert {k.key: k.value for k in export.keys} == {kv.key: kv.value for kv in v2_keys}
    assert all(
        (k.mod_revision, k.create_revision, k.version)
        == (kv.mod_revision, kv.create_revision, kv.version)
        for k, kv in zip(sorted(export.keys, key=lambda k: k.key), v2_keys, strict=True)
    )

    # Migrate, check against the backup, then restore v2 into an empty etcd.
    assert run(capsys, fleet, "migrate", "apply", "--all")[0] == 1  # "raw" is state-only
    code, out, _ = run(capsys, fleet, "migrate", "verify", "--idc", "dc1", "--against", str(backup))
    assert code == 0, out
    fleet.wipe()
    code, out, _ = run(capsys, fleet, "migrate", "import", str(backup), "--dry-run")
    assert code == 0 and f"would restore {len(v2_keys)} keys" in out
    assert with_client(fleet, lambda c: c.get_prefix("/")).kvs == []
    code, out, _ = run(capsys, fleet, "migrate", "import", str(backup))
    assert code == 0 and f"restored {len(v2_keys)} keys" in out
    restored = with_client(fleet, lambda c: c.get_prefix("/os/")).kvs
    assert {kv.key: kv.value for kv in restored} == {kv.key: kv.value for kv in v2_keys}
    # Never overwrites: identical keys are "unchanged", different ones are conflicts.
    with_client(fleet, lambda c: c.put(v2.list_key("dc1"), b"[]"))
    code, out, _ = run(capsys, fleet, "migrate", "import", str(backup), "--idc", "dc1")
    assert code == 1
    assert "exists with other content (not overwritten) /os/dc1/servers" in out
    assert "restored 0 keys, 24 already present, 1 present with other content" in out


def test_verify_against_a_backup_names_what_is_missing(
    fleet: EtcdProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    backup = tmp_path / "b.json"
    assert run(capsys, fleet, "migrate", "export", "--idc", "dc1", "-o", str(backup))[0] == 0
    assert run(capsys, fleet, "migrate", "apply", "--idc", "dc1")[0] == 0
    # Somebody deletes a migrated server's keys and record: only the backup still knows it.
    with_client(fleet, lambda c: c.delete("/os/dc1/servers/sn-00003"))
    with_client(fleet, lambda c: c.delete("/os/dc1/machines/sn-00003/", prefix=True))
    with_client(fleet, lambda c: c.delete("/os/_migrate-v2/dc1/sn-00003"))
    code, out, _ = run(capsys, fleet, "migrate", "verify", "--idc", "dc1")
    assert code == 0  # nothing in etcd says it ever existed
    code, out, _ = run(capsys, fleet, "migrate", "verify", "--idc", "dc1", "--against", str(backup))
    assert code == 1 and "problem   sn-00003: in the backup but not in v3" in out


def test_purge_records(fleet: EtcdProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, fleet, "migrate", "apply", "--idc", "dc2")[0] == 0
    code, out, _ = run(capsys, fleet, "migrate", "purge-records", "--idc", "dc2")
    assert code == 0 and "dc2: deleted 8 migration records" in out
    c = with_client(fleet, lambda c: counts(c, "dc2"))
    assert c == Counts(0, 0, 0, 8, 8, 0, 0)
    code, out, _ = run(capsys, fleet, "migrate", "purge-records", "--idc", "dc1")
    assert code == 1 and "verify failed; records kept" in out


# ------------------------------------------------------------------------ etcd settings


def test_config_with_only_an_etcd_section(
    fleet: EtcdProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = tmp_path / "ops.toml"
    # roles names a role whose section is missing: `lpmosd run` would refuse this file.
    cfg.write_text(f'roles = ["regional"]\n[etcd]\nendpoints = ["{fleet.endpoint}"]\n')
    code, out, _ = run(capsys, None, "migrate", "plan", "--idc", "dc1", "--config", str(cfg))
    assert code == 0 and "v2 list /os/dc1/servers: 12 servers" in out
    # --etcd-endpoints overrides the file's endpoints.
    cfg.write_text('[etcd]\nendpoints = ["http://127.0.0.1:1"]\n')
    code, out, _ = run(capsys, fleet, "migrate", "plan", "--idc", "dc1", "--config", str(cfg))
    assert code == 0


def test_config_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[etcd]\nendpoints = ["ftp://x"]\n')
    code, _, err = run(capsys, None, "migrate", "plan", "--idc", "dc1", "-c", str(cfg))
    assert code == 2 and "etcd.endpoints[0]: must be an http:// or https:// URL" in err
    code, _, err = run(
        capsys, None, "inspect", "servers", "--idc", "dc1", "--etcd-endpoints", "nope"
    )
    assert code == 2 and "--etcd-endpoints[0]" in err


def test_missing_default_config_says_what_to_do(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(opsutil, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    code, _, err = run(capsys, None, "migrate", "plan", "--idc", "dc1")
    assert code == 2
    assert "does not exist (give --config FILE or --etcd-endpoints URL)" in err
    assert err.count("\n") == 1


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A TCP port that accepts connections and never answers (a hung etcd)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["migrate", "plan", "--idc", "dc1"],
        ["migrate", "apply", "--idc", "dc1"],
        ["inspect", "servers", "--idc", "dc1"],
        ["inspect", "task", "dc1", "sn-001"],
        ["inspect", "lease", "dc1", "sn-001"],
    ],
)
def test_unreachable_etcd_fails_fast_with_one_line(
    capsys: pytest.CaptureFixture[str], silent_endpoint: str, argv: list[str]
) -> None:
    started = time.monotonic()
    code = cli.main([*argv, "--etcd-endpoints", silent_endpoint, "--timeout", "0.5"])
    _, err = capsys.readouterr()
    assert code == 1
    assert time.monotonic() - started < 5
    assert err.startswith(f"lpmosd: etcd error: cannot reach etcd at {silent_endpoint}")
    assert err.count("\n") == 1


def test_refused_connection(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["migrate", "verify", "--idc", "dc1", "--etcd-endpoints", "http://127.0.0.1:1"])
    _, err = capsys.readouterr()
    assert code == 1 and "cannot reach etcd at http://127.0.0.1:1 (timeout 5s)" in err
