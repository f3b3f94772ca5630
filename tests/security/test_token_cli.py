"""``lpmosd token create | list | revoke`` against a real etcd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lpmosd.cli import main
from lpmosd.credentials import hash_secret
from lpmosd.etcd_process import EtcdProcess
from lpmosd.tokens import TOKENS_PREFIX


@pytest.fixture
def aio_loop() -> None:
    """No trio-asyncio loop: the CLI runs its own (overrides the package's fixture)."""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_create_list_revoke(etcd: EtcdProcess, capsys: pytest.CaptureFixture[str]) -> None:
    ep = f"--etcd-endpoints={etcd.endpoint}"
    code, out, err = run(capsys, "token", "create", "--name", "alice", "--role", "operator", ep)
    assert code == 0, err
    token = out.strip()
    assert out == token + "\n", "stdout carries the token alone (for > file)"
    assert token.startswith("lpm_") and len(token) == 47
    assert "alice (operator, expires never)" in err and token not in err
    # Stored hashed.
    stored = json.loads(etcd.etcdctl("get", TOKENS_PREFIX + "alice", "--print-value-only"))
    assert stored["token_hash"] == hash_secret(token) and token not in json.dumps(stored)
    assert stored["created_by"].startswith("cli:")

    code, out, err = run(
        capsys, "token", "create", "--name", "bob@example.com", "--role", "viewer",
        "--expires", "12h", ep,
    )  # fmt: skip
    assert code == 0, err
    # An active name is not taken over.
    code, out, err = run(capsys, "token", "create", "--name", "alice", "--role", "admin", ep)
    assert code == 1 and "exists and is active" in err and out == ""

    code, out, err = run(capsys, "token", "list", ep)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "ROLE", "STATE"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["alice", "operator", "active"],
        ["bob@example.com", "viewer", "active"],
    ]
    assert "sha256" not in out and token not in out

    code, out, err = run(capsys, "token", "revoke", "alice", ep)
    assert code == 0 and "revoked" in err
    code, out, _ = run(capsys, "token", "list", "--json", ep)
    states = {t["name"]: t["state"] for t in json.loads(out)["tokens"]}
    assert states == {"alice": "revoked", "bob@example.com": "active"}
    # A revoked name may be issued again.
    code, out, err = run(capsys, "token", "create", "--name", "alice", "--role", "admin", ep)
    assert code == 0 and out.strip() != token


@pytest.mark.parametrize(
    "argv",
    [
        ["token", "create", "--name", "a/b", "--role", "viewer"],
        ["token", "create", "--name", "../x", "--role", "viewer"],
        ["token", "create", "--name", "ok", "--role", "root"],
        ["token", "create", "--name", "ok", "--role", "viewer", "--expires", "0d"],
        ["token", "create", "--name", "ok", "--role", "viewer", "--expires", "1y"],
        ["token", "revoke", "a/b"],
    ],
)
def test_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--etcd-endpoints=http://127.0.0.1:1"])
    assert info.value.code == 2


def test_revoke_unknown(etcd: EtcdProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "token", "revoke", "nobody", f"--etcd-endpoints={etcd.endpoint}")
    assert code == 1 and "no token named nobody" in err


def test_config_etcd_section(
    etcd: EtcdProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The config file's [etcd] section is enough (no role sections needed)."""
    cfg = tmp_path / "lpmosd.toml"
    cfg.write_text(f'[etcd]\nendpoints = ["{etcd.endpoint}"]\n')
    code, out, err = run(capsys, "token", "list", "--config", str(cfg))
    assert code == 0, err
    assert "no tokens" in out
