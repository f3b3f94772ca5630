"""The committed betterproto2 stubs are exactly what ``scripts/gen-proto`` generates from proto/."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "lpmosd" / "etcd" / "_pb"


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_match_proto(tmp_path: Path) -> None:
    for module in ("grpc_tools", "betterproto2_compiler"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is missing: install the dev extras (pip install -e '.[dev]')")
    out = tmp_path / "pb"
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(
        [str(ROOT / "scripts" / "gen-proto"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, f"gen-proto failed:\n{res.stdout}\n{res.stderr}"

    fresh, committed = _files(out), _files(COMMITTED)
    assert fresh, "gen-proto produced no files"
    missing = sorted(committed.keys() - fresh.keys())
    extra = sorted(fresh.keys() - committed.keys())
    changed = sorted(k for k in fresh.keys() & committed.keys() if fresh[k] != committed[k])
    assert not (missing or extra or changed), (
        "lpmosd/etcd/_pb is out of date with proto/; run scripts/gen-proto and commit.\n"
        f"only committed: {missing}\nonly generated: {extra}\ndiffering: {changed}"
    )
