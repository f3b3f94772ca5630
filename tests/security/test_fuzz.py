"""Property-based fuzzing of both HTTP APIs against a real daemon on a real etcd.

Hypothesis generates requests from the OpenAPI documents (``lpmosd/web/openapi/control.yaml``
and ``agent.yaml``): every operation, with valid, mutated and random path parameters,
queries, bodies and credentials (none, garbage, each role's token, expired and revoked
tokens, agent tokens of this and another server), plus wrong methods and unknown paths.
For every answer: no 5xx; a JSON error document for every 4xx of the APIs; a documented
status, and for documented statuses a body that matches the document's schema. After the
run: no ERROR log record (no unhandled exception) and no key written outside the prefixes
the API may write (the whole keyspace is compared before and after).

The default run is short and derandomized (a fixed seed): ``FUZZ_EXAMPLES`` requests per API.
The long run, at least 10,000 requests per API::

    scripts/test -m slow tests/security/test_fuzz.py        # 10,000 per API
    LPMOSD_FUZZ_EXAMPLES=50000 scripts/test -m slow tests/security/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import string
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
from agent.test_agent_openapi import load_yaml_subset, validate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from provisioning_kit import (
    GUIDE_TASK,
    bearer,
    create_token,
    keyspace,
    make_config,
    open_daemon,
    register_agent,
)

import lpmosd
from lpmosd import schema
from lpmosd.api_requests import CreateTaskRequest
from lpmosd.daemon import Daemon
from lpmosd.errors import InputError
from lpmosd.etcd import EtcdClient
from lpmosd.etcd_process import EtcdProcess
from lpmosd.store import Store
from lpmosd.timestamps import utcnow
from lpmosd.tokens import TOKEN_NAME_RE, TOKENS_PREFIX, Role, TokenStore

FUZZ_EXAMPLES = 300
LONG_EXAMPLES = int(os.environ.get("LPMOSD_FUZZ_EXAMPLES", "10000"))
SPECS = Path(lpmosd.__file__).parent / "web" / "openapi"

Json = Any
Strategy = st.SearchStrategy[Any]

# Strings that have broken parsers and key builders before.
NASTY = [
    "",
    ".",
    "..",
    "../..",
    "/",
    "a/b",
    "%2F",
    "%2e%2e",
    "\x00",
    "a\x00b",
    "sn-001\n",
    "\u202e",
    "ѕn-001",
    "ｓｎ",
    "x" * 65,
    "x" * 5000,
    "/os/dc1/machines/sn-001/task",
    "\\",
    "*",
    "'; DROP TABLE",
    "{{7*7}}",
    "<script>",
    "lpm_" + "A" * 43,
    "lpe_" + "A" * 43,
]


def load(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = load_yaml_subset((SPECS / name).read_text())
    return spec


def resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        cur: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            cur = cur[part]
        node = cur
    return node


# ----------------------------------------------------------------- strategies


def json_values() -> Strategy:
    """Any JSON value (small)."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    )


def from_schema(spec: dict[str, Any], node: dict[str, Any], depth: int = 0) -> Strategy:
    """Values valid for the schema (mostly), for the keywords our documents use."""
    node = resolve(spec, node)
    if "allOf" in node:
        parts = [from_schema(spec, s, depth + 1) for s in node["allOf"]]
        merged = st.tuples(*parts).map(
            lambda ds: {k: v for d in ds if isinstance(d, dict) for k, v in d.items()}
        )
        return (st.none() | merged) if node.get("nullable") else merged
    kind = node.get("type")
    out: Strategy
    if "enum" in node:
        out = st.sampled_from(node["enum"])
    elif kind == "string":
        if "pattern" in node:
            out = st.from_regex(node["pattern"], fullmatch=True)
        else:
            out = st.text(min_size=node.get("minLength", 0), max_size=node.get("maxLength", 40))
    elif kind == "integer":
        out = st.integers(node.get("minimum", -(2**31)), node.get("maximum", 2**31))
    elif kind == "number":
        out = st.floats(node.get("minimum"), node.get("maximum"), allow_nan=False)
    elif kind == "boolean":
        out = st.booleans()
    elif kind == "array":
        items = from_schema(spec, node.get("items", {}), depth + 1) if depth < 4 else st.none()
        out = st.lists(items, max_size=3)
    elif kind == "object" and depth < 5:
        props = node.get("properties", {})
        required = set(node.get("required", []))
        fixed = {k: from_schema(spec, v, depth + 1) for k, v in props.items() if k in required}
        optional = {
            k: from_schema(spec, v, depth + 1) for k, v in props.items() if k not in required
        }
        out = st.fixed_dictionaries(fixed, optional=optional)
    else:
        out = json_values()
    return (st.none() | out) if node.get("nullable") else out


def mutated(valid: Strategy) -> Strategy:
    """A valid body with one thing wrong: a field dropped, added, retyped or made nasty."""

    def mutate(data: st.DataObject, body: Json) -> Json:
        if not isinstance(body, dict) or not body:
            return body
        key = data.draw(st.sampled_from(sorted(body)))
        how = data.draw(st.sampled_from(["drop", "add", "retype", "nasty", "huge", "deep"]))
        body = dict(body)
        if how == "drop":
            del body[key]
        elif how == "add":
            body[data.draw(st.text(max_size=10))] = data.draw(json_values())
        elif how == "retype":
            body[key] = data.draw(json_values())
        elif how == "nasty":
            body[key] = data.draw(st.sampled_from(NASTY))
        elif how == "huge":
            body[key] = "x" * data.draw(st.sampled_from([129, 2001, 70_000]))
        else:
            body[key] = json.loads("[" * 200 + "]" * 200)
        return body

    return st.tuples(st.data(), valid).map(lambda t: mutate(*t))


def raw_bodies() -> Strategy:
    return st.sampled_from(
        [
            b"{",
            b'{"a":1,}',
            b"\xff\xfe",
            b'{"a": NaN}',
            b'{"a": 1, "a": 2}',
            b"[" * 50_000,
            b"null",
            b"x" * 70_000,
        ]
    ) | st.binary(max_size=200)


def name_params(pool: list[str]) -> Strategy:
    """Mostly names that exist (to get past validation), else nasty or random text."""
    return st.integers(0, 9).flatmap(
        lambda n: (
            st.sampled_from(pool)
            if n < 6
            else st.sampled_from(NASTY)
            if n < 8
            else st.text(max_size=70)
        )
    )


#: A header value standing for the live agent token of a server (see :class:`Live`).
AGENT_TOKEN_OF = "@agent-token-of:"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None
    operation: tuple[str, str] | None  # (template, method) when it targets a documented op
    #: Put the live enrolment secret of the body's sn into a register body.
    real_secret: bool = False

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        # How Hypothesis prints a failing example: bodies can be 70 kB, show their start.
        p.text(f"Request({self.describe()!r}, {self.operation}, real_secret={self.real_secret})")

    def describe(self) -> str:
        return f"{self.method} {self.path[:200]} {self.headers} {(self.body or b'')[:200]!r}"


HEADER_SAFE = string.ascii_letters + string.digits + string.punctuation + " "


def requests(
    spec: dict[str, Any], auth: dict[str, Strategy], names: dict[str, list[str]]
) -> Strategy:
    """Requests against the operations of ``spec``; ``auth`` maps a label to header dicts."""
    ops = [
        (template, method, op)
        for template, item in spec["paths"].items()
        for method, op in item.items()
    ]

    @st.composite
    def one(draw: Callable[[Strategy], Any]) -> Request:
        kind = draw(st.sampled_from(["op"] * 9 + ["junk"]))
        # The first credentials are the likeliest: the live ones, to reach the handlers.
        headers: dict[str, str] = dict(
            draw(st.sampled_from(list(auth.values())).flatmap(lambda s: s))
        )
        ctype = draw(
            st.sampled_from(
                ["application/json"] * 6
                + ["text/plain", "application/x-www-form-urlencoded", "", "application/json; x"]
            )
        )
        if ctype:
            headers["Content-Type"] = ctype
        # (Hypothesis leans to small draws: the common case is the small one.)
        if draw(st.integers(0, 9)) == 9:
            headers["X-CSRF-Token"] = draw(st.text(HEADER_SAFE, max_size=40)).strip() or "x"
            headers["Cookie"] = "lpmosd_session=" + draw(st.text(string.ascii_letters, max_size=40))
        if kind == "junk":
            path = "/" + quote(draw(st.text(max_size=60)), safe="/%")
            method = draw(st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]))
            junk: bytes | None = draw(st.none() | raw_bodies())
            return Request(method, path, headers, junk, None)
        real_secret = draw(st.integers(0, 2)) == 0
        template, method, op = draw(st.sampled_from(ops))
        path = template
        for param in re.findall(r"\{(\w+)\}", template):
            value = draw(name_params(names.get(param, ["x"])))
            raw = draw(st.integers(0, 9)) == 9
            encoded = quote(value, safe="/") if raw else quote(value, safe="")
            path = path.replace("{" + param + "}", encoded)
        query = []
        for p in op.get("parameters", []):
            p = resolve(spec, p)
            if p.get("in") == "query" and draw(st.booleans()):
                value = draw(name_params(names.get(p["name"], ["pending"])))
                query.append(f"{p['name']}={quote(value, safe='')}")
        if query:
            path += "?" + "&".join(query)
        body: bytes | None = None
        if "requestBody" in op:
            content = op["requestBody"]["content"]["application/json"]
            valid = from_schema(spec, content["schema"])
            choice = draw(st.sampled_from(["valid"] * 4 + ["mutated"] * 4 + ["json", "raw"]))
            if choice == "raw":
                body = draw(raw_bodies())
            else:
                value = draw(
                    valid
                    if choice == "valid"
                    else mutated(valid)
                    if choice == "mutated"
                    else json_values()
                )
                body = json.dumps(value).encode()
        elif draw(st.integers(0, 4)) == 4:
            body = json.dumps(draw(json_values())).encode()
        real_method = method.upper()
        if draw(st.integers(0, 19)) == 19:
            real_method = draw(st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]))
        documented = (template, method) if real_method == method.upper() else None
        return Request(real_method, path, headers, body, documented, real_secret)

    return one()


# ----------------------------------------------------------------- the world


@dataclass
class Live:
    """The agent credentials in play. The fuzzer completes and fails tasks; each time the
    task is made afresh (new secret, new agent token), so the run keeps reaching past
    authentication to the handlers."""

    store: Store
    regional_url: str
    secrets: dict[str, str] = field(default_factory=dict)  # sn -> current enrolment secret
    tokens: dict[str, str] = field(default_factory=dict)  # sn -> current agent token
    respawned: int = 0

    async def respawn(self, http: httpx.AsyncClient, sn: str) -> None:
        """A fresh task for ``sn`` (dc1): registered, and for sn-001 installing."""
        # Live (re-created by the fuzzer) or gone: then create_task decides below.
        with contextlib.suppress(InputError):
            await self.store.delete_task("dc1", sn)
        req = CreateTaskRequest.from_obj({**GUIDE_TASK, "sn": sn})
        try:
            _, self.secrets[sn] = await self.store.create_enrolled_task(req, actor="fuzz")
        except InputError:
            _, self.secrets[sn] = await self.store.reissue_enrolment("dc1", sn, actor="fuzz")
        if sn == "sn-001":
            r, _ = await register_agent(http, sn=sn, mac=GUIDE_TASK["mac"], secret=self.secrets[sn])
            if r.status_code == 200:
                self.tokens[sn] = r.json()["agent_token"]
            with contextlib.suppress(InputError):
                await self.store.approve("dc1", sn, approved_by="fuzz")
        self.respawned += 1

    def fill(self, req: Request) -> tuple[dict[str, str], bytes | None]:
        """The request's headers and body with the live credentials put in."""
        headers = dict(req.headers)
        auth = headers.get("Authorization", "")
        if auth.startswith(AGENT_TOKEN_OF):
            headers["Authorization"] = "Bearer " + self.tokens.get(
                auth.removeprefix(AGENT_TOKEN_OF), "lpa_gone"
            )
        body = req.body
        if req.real_secret and body is not None and req.path == "/api/v1/agent/register":
            try:
                obj = json.loads(body)
            except (ValueError, RecursionError):
                obj = None
            if (
                isinstance(obj, dict)
                and isinstance(obj.get("sn"), str)
                and obj["sn"] in self.secrets
            ):
                obj["enrollment_secret"] = self.secrets[obj["sn"]]
                obj["mac"] = GUIDE_TASK["mac"]
                body = json.dumps(obj).encode()
        return headers, body

    async def after(self, http: httpx.AsyncClient, req: Request, r: httpx.Response) -> None:
        """Follow what the request did to the credentials."""
        m = re.fullmatch(r"/api/v1/agent/([^/]+)/(complete|fail)", req.path)
        if m and r.status_code == 200 and m.group(1) in ("sn-001", "sn-002"):
            await self.respawn(http, m.group(1))
        if req.path == "/api/v1/agent/register" and r.status_code == 200:
            body = r.json()
            self.tokens[body["task"]["sn"]] = body["agent_token"]


@dataclass
class World:
    daemon: Daemon
    client: EtcdClient
    live: Live
    control: dict[str, Strategy] = field(default_factory=dict)
    agent: dict[str, Strategy] = field(default_factory=dict)


@pytest.fixture
async def world(etcd: EtcdProcess, client: EtcdClient, store: Store) -> AsyncIterator[World]:
    """Both roles for dc1. Tasks: sn-001 installing (its agent registered: a token),
    sn-002 pending (its secret unused), sn-003 failed, sn-004 cancelled, dc2/sn-777.
    Tokens: one per role, an expired one, a revoked one."""
    config = make_config(etcd.endpoints, agent_lease_ttl=60, heartbeat_interval=10)
    async with open_daemon(config) as daemon:
        secrets: dict[tuple[str, str], str] = {}
        for idc, sn in (
            ("dc1", "sn-001"),
            ("dc1", "sn-002"),
            ("dc1", "sn-003"),
            ("dc1", "sn-004"),
            ("dc2", "sn-777"),
        ):
            req = CreateTaskRequest.from_obj({**GUIDE_TASK, "idc": idc, "sn": sn})
            _, secrets[idc, sn] = await store.create_enrolled_task(req, actor="t")
        async with httpx.AsyncClient(base_url=daemon.urls["regional"]) as http:
            r, agent_auth = await register_agent(
                http, sn="sn-001", mac=GUIDE_TASK["mac"], secret=secrets["dc1", "sn-001"]
            )
            assert r.status_code == 200, r.text
        await store.approve("dc1", "sn-001", approved_by="t")
        await store.record_progress("dc1", "sn-001", step="partitioning", percent=5, message="")
        await store.approve("dc1", "sn-003", approved_by="t")
        await store.fail("dc1", "sn-003", "x", actor="t")
        await store.cancel("dc1", "sn-004", actor="t")
        tokens = {role: await create_token(client, role) for role in Role}
        past = utcnow() - timedelta(days=2)
        _, expired = await TokenStore(client, clock=lambda: past).create(
            "expired", Role.ADMIN, actor="t", expires_in=timedelta(days=1)
        )
        revoked = await create_token(client, Role.ADMIN, "revoked")
        await TokenStore(client).revoke("revoked", actor="t")
        garbage = st.text(HEADER_SAFE, max_size=60).map(
            lambda t: {"Authorization": t.strip()} if t.strip() else {}
        )
        # Valid tokens first and twice: they are the likeliest (see requests()).
        control: dict[str, Strategy] = {}
        for copy in ("", "2"):
            for role in (Role.ADMIN, Role.OPERATOR, Role.VIEWER):
                control[role.label + copy] = st.just(bearer(tokens[role]))
        control |= {
            "none": st.just({}),
            "garbage": garbage,
            "expired": st.just(bearer(expired)),
            "revoked": st.just(bearer(revoked)),
            "agent": st.just(agent_auth),
        }
        live_001 = st.just({"Authorization": AGENT_TOKEN_OF + "sn-001"})
        agent_auths: dict[str, Strategy] = {
            **{f"agent-001-{i}": live_001 for i in range(6)},
            "agent-002": st.just({"Authorization": AGENT_TOKEN_OF + "sn-002"}),
            "none": st.just({}),
            "garbage": garbage,
            "operator": st.just(bearer(tokens[Role.ADMIN])),
            "stale": st.just(agent_auth),  # sn-001's first token, dead once it re-enrols
        }
        live = Live(store, daemon.urls["regional"])
        live.secrets = {sn: secret for (idc, sn), secret in secrets.items() if idc == "dc1"}
        live.tokens["sn-001"] = agent_auth["Authorization"].removeprefix("Bearer ")
        yield World(daemon, client, live, control, agent_auths)


# ----------------------------------------------------------------- the run


@dataclass
class Outcome:
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class ErrorLogs(logging.Handler):
    """Every ERROR (or worse) record of lpmosd and hypercorn during the run."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def operation_sent(spec: dict[str, Any], req: Request) -> tuple[str, str] | None:
    """The operation ``req`` reaches. A "." or ".." path segment (a name drawn from NASTY)
    is resolved by the client before sending (RFC 3986 5.2.4, as browsers and curl do):
    ``GET /api/v1/tasks/./.`` *is* ``GET /api/v1/tasks``, and is answered as such."""
    if req.operation is None:
        return None
    segments = req.path.partition("?")[0].split("/")
    if not any(seg in (".", "..") for seg in segments):
        return req.operation
    sent = httpx.URL("http://fuzz" + req.path).path
    method = req.operation[1]
    for template, item in spec["paths"].items():
        parts = re.split(r"\{[^}]+\}", template)
        if re.fullmatch("[^/]+".join(map(re.escape, parts)), sent) and method in item:
            return template, method
    return None


def check_answer(spec: dict[str, Any], req: Request, r: httpx.Response) -> str | None:
    """What is wrong with the answer to ``req`` (None: nothing)."""
    if r.status_code >= 500:
        return f"{r.status_code}: {r.text[:300]}"
    if not req.path.startswith("/api/"):
        return None
    try:
        body = r.json()
    except ValueError:
        return f"{r.status_code} non-JSON: {r.text[:200]!r}"
    if r.status_code >= 400 and not (isinstance(body, dict) and isinstance(body.get("error"), str)):
        return f"{r.status_code} is not an error document: {body!r:.200}"
    operation = operation_sent(spec, req)
    if operation is None:
        return None
    template, method = operation
    responses = spec["paths"][template][method]["responses"]
    documented = responses.get(str(r.status_code))
    if documented is None:
        if r.status_code in (404, 405, 413, 429):
            return None  # routing, method and size limits apply to every path
        return f"undocumented status {r.status_code} for {method.upper()} {template}: {body!r:.200}"
    documented = resolve(spec, documented)
    schema_node = documented.get("content", {}).get("application/json", {}).get("schema")
    if schema_node is not None:
        errors = validate(spec, schema_node, body)
        if errors:
            return f"{r.status_code} body does not match the document: {errors[:3]}"
    return None


async def fuzz(
    world: World,
    *,
    base_url: str,
    spec: dict[str, Any],
    auth: dict[str, Strategy],
    names: dict[str, list[str]],
    examples: int,
    allowed_key: Callable[[str], bool],
) -> Outcome:
    """Send ``examples`` generated requests; check the answers, the logs and the keyspace."""
    outcome = Outcome()
    handler = ErrorLogs()
    logging.getLogger().addHandler(handler)
    before = await keyspace(world.client)
    strategy = requests(spec, auth, names)
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:

            async def send(req: Request) -> None:
                headers, body = world.live.fill(req)
                r = await http.request(req.method, req.path, content=body, headers=headers)
                outcome.sent += 1
                outcome.statuses[r.status_code] = outcome.statuses.get(r.status_code, 0) + 1
                problem = check_answer(spec, req, r)
                if problem is not None:
                    outcome.problems.append(f"{req.describe()}\n    -> {problem}")
                await world.live.after(http, req, r)

            @settings(
                max_examples=examples,
                derandomize=True,  # a fixed seed: the default run is the same every time
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(strategy)
            def run(req: Request) -> None:
                trio.from_thread.run(send, req)

            await trio.to_thread.run_sync(run)
    finally:
        logging.getLogger().removeHandler(handler)
    after = await keyspace(world.client)
    changed = sorted(
        k.decode(errors="replace")
        for k in set(before) | set(after)
        if before.get(k) != after.get(k)
    )
    outside = [k for k in changed if not allowed_key(k)]
    assert not outside, f"keys written outside the expected prefixes: {outside[:20]}"
    errors = [f"{r.name}: {r.getMessage()} {r.exc_text or ''}" for r in handler.records]
    assert not errors, "ERROR log records (unhandled exceptions?):\n" + "\n".join(errors[:10])
    assert not outcome.problems, f"{len(outcome.problems)} bad answers, e.g.:\n" + "\n".join(
        outcome.problems[:10]
    )
    assert outcome.sent >= examples, outcome.sent
    return outcome


def control_key_allowed(key: str) -> bool:
    """The control plane writes the v3 layout of any IDC, and operator tokens."""
    if key.startswith(TOKENS_PREFIX):
        return TOKEN_NAME_RE.fullmatch(key[len(TOKENS_PREFIX) :]) is not None
    return schema.parse_key(key) is not None or key.startswith("/os/_control-plane/")


def agent_key_allowed(key: str) -> bool:
    """The agent API writes only its own IDC's machines and servers."""
    parsed = schema.parse_key(key)
    return (parsed is not None and parsed.idc == "dc1") or key.startswith(
        schema.regional_election_prefix("dc1")
    )


CONTROL_NAMES = {
    "idc": ["dc1", "dc2", "dc9"],
    "sn": ["sn-001", "sn-002", "sn-003", "sn-004", "sn-777", "sn-new"],
    "name": ["test-viewer", "test-operator", "expired", "revoked", "nobody"],
    "status": ["pending", "failed", "cancelled", "bogus"],
}
AGENT_NAMES = {"sn": ["sn-001"] * 4 + ["sn-002", "sn-003", "sn-777", "sn-404"]}


async def run_control(world: World, examples: int) -> Outcome:
    return await fuzz(
        world,
        base_url=world.daemon.urls["control-plane"],
        spec=load("control.yaml"),
        auth=world.control,
        names=CONTROL_NAMES,
        examples=examples,
        allowed_key=control_key_allowed,
    )


async def run_agent_api(world: World, examples: int) -> Outcome:
    spec = load("agent.yaml")
    return await fuzz(
        world,
        base_url=world.daemon.urls["regional"],
        spec=spec,
        auth=world.agent,
        names=AGENT_NAMES,
        examples=examples,
        allowed_key=agent_key_allowed,
    )


async def test_fuzz_control_plane(world: World) -> None:
    outcome = await run_control(world, FUZZ_EXAMPLES)
    print(f"control plane: {outcome.sent} requests, statuses {sorted(outcome.statuses.items())}")
    # The run reached past authentication, not only 401s.
    assert sum(n for code, n in outcome.statuses.items() if code < 400) > 10, outcome.statuses


async def test_fuzz_agent_api(world: World) -> None:
    outcome = await run_agent_api(world, FUZZ_EXAMPLES)
    print(f"agent API: {outcome.sent} requests, statuses {sorted(outcome.statuses.items())}")
    assert sum(n for code, n in outcome.statuses.items() if code < 400) > 10, outcome.statuses


@pytest.mark.slow
async def test_fuzz_control_plane_long(world: World) -> None:
    outcome = await run_control(world, LONG_EXAMPLES)
    print(f"control plane: {outcome.sent} requests, statuses {sorted(outcome.statuses.items())}")


@pytest.mark.slow
async def test_fuzz_agent_api_long(world: World) -> None:
    outcome = await run_agent_api(world, LONG_EXAMPLES)
    print(f"agent API: {outcome.sent} requests, statuses {sorted(outcome.statuses.items())}")
