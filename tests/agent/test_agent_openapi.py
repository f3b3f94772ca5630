"""lpmosd/web/openapi/agent.yaml: it parses, is consistent, and matches what the agent sends.

PyYAML is not a dependency, so the file is written in a small YAML subset (see its header)
and read here by :func:`load_yaml_subset`, which refuses anything outside that subset. When
PyYAML happens to be installed, both parsers must agree.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import lpmosd
from lpmosd.agent.client import RetryPolicy
from lpmosd.agent.facts import collect_facts
from lpmosd.agent.main import EXIT_OK, AgentOptions, run_agent

from .agent_fakes import FakeRegional

SPEC_PATH = Path(lpmosd.__file__).parent / "web/openapi/agent.yaml"

# ------------------------------------------------------------------ the YAML subset

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_$][A-Za-z0-9_$./+-]*")
_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"-?(0|[1-9][0-9]*)\.[0-9]+([eE][-+]?[0-9]+)?")
_DECODER = json.JSONDecoder()


class SubsetError(ValueError):
    """The text uses YAML outside the subset we parse."""


def _scalar(text: str, lineno: int) -> Any:
    if text.startswith('"'):
        value, end = _DECODER.raw_decode(text)
        if end != len(text):
            raise SubsetError(f"line {lineno}: text after a quoted string")
        return value
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            pass
        if not text.endswith("]"):
            raise SubsetError(f"line {lineno}: unterminated flow sequence")
        inner = text[1:-1].strip()
        return [_scalar(item.strip(), lineno) for item in inner.split(",")] if inner else []
    if text == "{}":
        return {}
    if text[0] in "{'&*!|>%@`#?:-," or ": " in text or " #" in text:
        raise SubsetError(f"line {lineno}: unsupported scalar {text!r}")
    if text in ("null", "~"):
        return None
    if text in ("true", "false"):
        return text == "true"
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def _split_key(text: str, lineno: int) -> tuple[str, str] | None:
    """``key: rest`` → (key, rest); None if ``text`` is not a mapping entry."""
    if text.startswith('"'):
        key, end = _DECODER.raw_decode(text)
        rest = text[end:]
    else:
        m = _PLAIN_KEY.match(text)
        if m is None:
            return None
        key, rest = m.group(), text[m.end() :]
    if rest == ":":
        return key, ""
    if rest.startswith(": "):
        return key, rest[2:].strip()
    return None


class _Parser:
    def __init__(self, text: str) -> None:
        self.lines: list[tuple[int, str, int]] = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            if "\t" in raw:
                raise SubsetError(f"line {lineno}: tab")
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                continue
            self.lines.append((len(raw) - len(raw.lstrip(" ")), stripped, lineno))
        self.i = 0

    def parse(self) -> Any:
        value = self._block(0)
        if self.i != len(self.lines):
            raise SubsetError(f"line {self.lines[self.i][2]}: unexpected indentation")
        return value

    def _block(self, indent: int) -> Any:
        if self.lines[self.i][1].startswith("-"):
            return self._seq(indent)
        return self._map(indent)

    def _map(self, indent: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while self.i < len(self.lines):
            ind, text, lineno = self.lines[self.i]
            if ind != indent or text.startswith("- "):
                break
            entry = _split_key(text, lineno)
            if entry is None:
                raise SubsetError(f"line {lineno}: expected 'key: value'")
            key, rest = entry
            if key in out:
                raise SubsetError(f"line {lineno}: duplicate key {key!r}")
            self.i += 1
            if rest:
                out[key] = _scalar(rest, lineno)
            elif self.i < len(self.lines) and self.lines[self.i][0] > indent:
                out[key] = self._block(self.lines[self.i][0])
            elif self.i < len(self.lines) and self.lines[self.i][1].startswith("- "):
                out[key] = self._seq(indent)  # a sequence may sit at its key's indent
            else:
                out[key] = None
        if self.i < len(self.lines) and self.lines[self.i][0] > indent:
            raise SubsetError(f"line {self.lines[self.i][2]}: unexpected indentation")
        return out

    def _seq(self, indent: int) -> list[Any]:
        out: list[Any] = []
        while self.i < len(self.lines):
            ind, text, lineno = self.lines[self.i]
            if ind != indent or not text.startswith("- "):
                break
            rest = text[2:].strip()
            if _split_key(rest, lineno) is not None:
                # "- key: value": a mapping whose entries sit at the column of "key".
                self.lines[self.i] = (indent + len(text) - len(rest), rest, lineno)
                out.append(self._map(self.lines[self.i][0]))
            else:
                out.append(_scalar(rest, lineno))
                self.i += 1
        return out


def load_yaml_subset(text: str) -> Any:
    """Parse the YAML subset described in agent.yaml's header."""
    return _Parser(text).parse()


def test_subset_parser() -> None:
    text = """
# comment
a: 1
b:
  - x
  - "y: z"
  - k: v
    l: [1, "two", three]
c: {}
d:
- 1.5
e: null
"f/{g}":
  h: true
"""
    assert load_yaml_subset(text) == {
        "a": 1,
        "b": ["x", "y: z", {"k": "v", "l": [1, "two", "three"]}],
        "c": {},
        "d": [1.5],
        "e": None,
        "f/{g}": {"h": True},
    }
    for bad in ("a: &x 1", "a: b: c", "a: 1\na: 2", "a:\n    b: 1\n  c: 2", "a: |", "a: x # y"):
        with pytest.raises(SubsetError):
            load_yaml_subset(bad)


# --------------------------------------------------------------------- the document


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    doc = load_yaml_subset(SPEC_PATH.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def test_pyyaml_agrees(spec: dict[str, Any]) -> None:
    try:
        yaml: Any = importlib.import_module("yaml")
    except ImportError:
        return  # not installed: our subset parser is the only reader
    assert yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8")) == spec


OPERATIONS = {
    ("/api/v1/agent/register", "post"): "RegisterRequest",
    ("/api/v1/agent/{sn}/task", "get"): None,
    ("/api/v1/agent/{sn}/heartbeat", "post"): "Empty",
    ("/api/v1/agent/{sn}/progress", "post"): "ProgressRequest",
    ("/api/v1/agent/{sn}/logs", "post"): "LogsRequest",
    ("/api/v1/agent/{sn}/complete", "post"): "Empty",
    ("/api/v1/agent/{sn}/fail", "post"): "FailRequest",
    ("/api/v1/agent/{sn}/first-boot-credential", "post"): "Empty",
    ("/api/v1/agent/{sn}/first-boot", "post"): "FirstBootRequest",
}


def _resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = spec
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node


def _walk(node: Any, path: str = "$") -> list[tuple[str, Any]]:
    found = [(path, node)]
    if isinstance(node, dict):
        for k, v in node.items():
            found += _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _walk(v, f"{path}[{i}]")
    return found


def test_structure(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.0.")
    assert spec["info"]["title"] and spec["info"]["version"]
    paths = spec["paths"]
    assert {(p, m) for p in paths for m in paths[p]} == set(OPERATIONS)
    operation_ids = set()
    for (path, method), body_schema in OPERATIONS.items():
        op = paths[path][method]
        operation_ids.add(op["operationId"])
        assert all(isinstance(code, str) for code in op["responses"])
        assert {"200", "503"} <= set(op["responses"])
        if "{sn}" in path:
            assert op["parameters"] == [{"$ref": "#/components/parameters/Sn"}]
            assert {"401", "404"} <= set(op["responses"])
        if body_schema is None:
            assert "requestBody" not in op
        else:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{body_schema}"}
    assert len(operation_ids) == len(OPERATIONS)
    assert paths["/api/v1/agent/register"]["post"]["security"] == []
    for where, node in _walk(spec):
        if isinstance(node, dict) and "$ref" in node:
            assert set(node) == {"$ref"}, f"{where}: siblings of $ref are ignored in 3.0"
            _resolve(spec, node["$ref"])
        if isinstance(node, dict) and isinstance(node.get("required"), list):
            assert set(node["required"]) <= set(node.get("properties", {})), where


# -------------------------------------------------------- a validator for the subset


def validate(spec: dict[str, Any], schema: dict[str, Any], value: Any, at: str = "$") -> list[str]:
    """Check ``value`` against an OpenAPI 3.0 schema (the keywords agent.yaml uses)."""
    if "$ref" in schema:
        return validate(spec, _resolve(spec, schema["$ref"]), value, at)
    if value is None:
        return [] if schema.get("nullable") else [f"{at}: null"]
    errors: list[str] = []
    for sub in schema.get("allOf", []):
        errors += validate(spec, sub, value, at)
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if kind is not None and not checks[kind](value):
        return [*errors, f"{at}: expected {kind}, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{at}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{at}: too long")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{at}: too short")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{at}: {value!r} does not match {schema['pattern']}")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        errors.append(f"{at}: {value} out of range")
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            errors.append(f"{at}: wrong number of items")
        for i, item in enumerate(value):
            errors += validate(spec, schema.get("items", {}), item, f"{at}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{at}: missing {k}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{at}: unknown {k}" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                errors += validate(spec, props[k], v, f"{at}.{k}")
    return errors


def test_examples_match_their_schemas(spec: dict[str, Any]) -> None:
    checked = 0
    for where, node in _walk(spec):
        if isinstance(node, dict) and "schema" in node and "example" in node:
            assert validate(spec, node["schema"], node["example"]) == [], where
            checked += 1
        elif isinstance(node, dict) and "example" in node and "type" in node:
            example_schema = {k: v for k, v in node.items() if k != "example"}
            assert validate(spec, example_schema, node["example"]) == [], where
            checked += 1
    assert checked >= 20


def test_validator_catches_mistakes(spec: dict[str, Any]) -> None:
    progress = {"$ref": "#/components/schemas/ProgressRequest"}
    assert validate(spec, progress, {"step": "a", "percent": 50}) == []
    assert validate(spec, progress, {"step": "A b", "percent": 101, "x": 1}) == [
        "$: unknown x",
        "$.step: 'A b' does not match ^[a-z0-9][a-z0-9_.-]{0,63}$",
        "$.percent: 101 out of range",
    ]


def _operation(method: str, path: str) -> tuple[str, str]:
    for template, op_method in OPERATIONS:
        pattern = re.escape(template).replace(r"\{sn\}", "[^/]+")
        if op_method == method.lower() and re.fullmatch(pattern, path):
            return template, op_method
    raise AssertionError(f"agent called an undocumented endpoint: {method} {path}")


async def _run_recorded(
    spec: dict[str, Any], plan: dict[str, Any], expected_exit: int
) -> set[tuple[str, str]]:
    """Run a real agent (real facts of this machine) against the fake regional, validating
    every request body and every answer against the document; returns the operations used."""
    regional = FakeRegional(plan=plan, issue_tokens=True)
    facts = collect_facts("/")
    mac = facts.default_mac or "00:1a:2b:3c:4d:5e"
    task = regional.add_task(mac=mac)  # pending: the agent polls GET /task
    answers: list[tuple[str, str, int, Any]] = []

    async def recording(request: httpx.Request) -> httpx.Response:
        response = await regional.handle(request)
        answers.append((request.method, request.url.path, response.status_code, response.json()))
        return response

    opts = AgentOptions(
        regional_url="http://regional:8081",
        sn="sn-001",
        mac=mac,
        enrollment_secret="lpe_secret-from-the-boot-parameters",
        facts=facts,
        transport=httpx.MockTransport(recording),
        poll_interval=0.02,
        retry=RetryPolicy(initial=0.01, maximum=0.02, total=5),
        log_flush_interval=0.02,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_agent, opts)
            await trio.sleep(0.1)
            task.status = "approved"
        assert task.status in ("completed", "failed")
    assert (task.status == "completed") == (expected_exit == EXIT_OK)
    seen = set()
    for method, path, body in regional.calls:
        template, op_method = _operation(method, path)
        seen.add((template, op_method))
        op = spec["paths"][template][op_method]
        if "requestBody" in op:
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            assert validate(spec, schema, body) == [], (path, body)
    for method, path, status, body in answers:
        template, op_method = _operation(method, path)
        response = spec["paths"][template][op_method]["responses"][str(status)]
        if "$ref" in response:
            response = _resolve(spec, response["$ref"])
        schema = response["content"]["application/json"]["schema"]
        assert validate(spec, schema, body) == [], (path, status, body)
    return seen


async def test_what_the_agent_sends_matches_the_spec(spec: dict[str, Any]) -> None:
    ok_plan = {
        "name": "mixed",
        "steps": [
            {"name": "a", "command": ["/bin/sh", "-c", "echo out; echo err >&2"], "timeout": 5,
             "simulate": None},
            {"name": "b", "command": [], "timeout": 5, "simulate": 0.02},
        ],
    }  # fmt: skip
    failing_plan = {
        "name": "bad",
        "steps": [{"name": "c", "command": ["/bin/false"], "timeout": 5}],
    }
    seen = await _run_recorded(spec, ok_plan, EXIT_OK)
    seen |= await _run_recorded(spec, failing_plan, 1)
    # The first-boot calls come from the built-in plans' post_install and from the installed
    # system (tests/web/test_first_boot.py, and the VM test), not from a command plan.
    first_boot = {
        ("/api/v1/agent/{sn}/first-boot-credential", "post"),
        ("/api/v1/agent/{sn}/first-boot", "post"),
    }
    assert seen == set(OPERATIONS) - first_boot
