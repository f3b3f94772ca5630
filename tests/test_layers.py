"""The module layers of README "Architecture": what may import what (read from the source)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lpmosd"

#: lpmosd's plain modules (the standard library, trio at most): the agent and everything
#: else may use them.
PLAIN = {
    "lpmosd.boot.artifacts",
    "lpmosd.boot.scripts",
    "lpmosd.errors",
    "lpmosd.schema",
    "lpmosd.timestamps",
    "lpmosd.fields",
    "lpmosd.documents",
    "lpmosd.api_requests",
    "lpmosd.lifecycle",
    "lpmosd.plan",
    "lpmosd.credentials",
    "lpmosd.config",
    "lpmosd.logs",
    "lpmosd.hooks",
}
AGENT_THIRD_PARTY = {"trio", "httpx"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


SOURCES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "_pb" not in p.parts}


def ours(names: set[str]) -> set[str]:
    """The lpmosd modules among ``names`` (``from lpmosd import x`` counts as lpmosd.x)."""
    return {n for n in names if n in SOURCES and n != "lpmosd"}


def in_agent(name: str) -> bool:
    return name == "lpmosd.agent" or name.startswith("lpmosd.agent.")


@pytest.mark.parametrize("name", sorted(n for n in SOURCES if n.startswith("lpmosd.roles")))
def test_roles_do_not_import_web(name: str) -> None:
    assert not any(i.startswith("lpmosd.web") for i in imports(SOURCES[name]))


@pytest.mark.parametrize("name", sorted(n for n in SOURCES if n in PLAIN or in_agent(n)))
def test_plain_and_agent_modules_import_only_plain_things(name: str) -> None:
    found = imports(SOURCES[name])
    third_party = {
        i.split(".")[0]
        for i in found
        if i.split(".")[0] not in sys.stdlib_module_names and i.split(".")[0] != "lpmosd"
    }
    allowed = AGENT_THIRD_PARTY if in_agent(name) else {"trio"}
    assert third_party <= allowed
    lpmosd_imports = ours(found)
    allowed_ours = PLAIN | {n for n in SOURCES if in_agent(n)}
    allowed_ours |= {"lpmosd._trio_util"} if in_agent(name) else set()
    assert lpmosd_imports <= allowed_ours, lpmosd_imports - allowed_ours
