"""Who may do what on the control plane: tokens, roles, browser sessions, CSRF.

The matrix: every API route × {no credentials, malformed header, unknown token, expired
token, revoked token, a role too weak} must answer 401/403 and write nothing (the whole
keyspace, every key with value, revision and lease, is compared before and after); the role
it needs must get past authentication. A route added without a role check fails
:func:`test_every_route_is_in_the_matrix`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from provisioning_kit import (
    GUIDE_TASK,
    TEST_PLANS,
    bearer,
    create_token,
    keyspace,
    make_config,
    open_daemon,
    publish_os_types,
    wait_for,
)

from lpmosd.api_requests import CreateTaskRequest
from lpmosd.config import ROLE_CONTROL_PLANE
from lpmosd.credentials import hash_secret
from lpmosd.daemon import Daemon
from lpmosd.documents import TaskStatus
from lpmosd.etcd import EtcdClient
from lpmosd.etcd_process import EtcdProcess
from lpmosd.roles.control_plane import ControlPlane
from lpmosd.store import Store
from lpmosd.timestamps import utcnow
from lpmosd.tokens import TOKENS_PREFIX, Role, TokenStore
from lpmosd.web.control_app import create_control_app

CP_ONLY = frozenset({ROLE_CONTROL_PLANE})


@dataclass(frozen=True)
class Route:
    """One API route with a request that would succeed for ``role``."""

    method: str
    path: str
    role: Role
    body: Any = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


#: Every API route of the control plane and the role it needs.
ROUTES = [
    Route("GET", "/api/v1/whoami", Role.VIEWER),
    Route("GET", "/api/v1/tasks", Role.VIEWER),
    Route("GET", "/api/v1/tasks/dc1/sn-001", Role.VIEWER),
    Route("GET", "/api/v1/servers?idc=dc1", Role.VIEWER),
    Route("POST", "/api/v1/tasks", Role.OPERATOR, {**GUIDE_TASK, "sn": "sn-new"}),
    Route("POST", "/api/v1/tasks/dc1/sn-001/approve", Role.OPERATOR, {}),
    Route("POST", "/api/v1/tasks/dc1/sn-001/cancel", Role.OPERATOR, {"reason": "x"}),
    Route("POST", "/api/v1/tasks/dc1/sn-002/retry", Role.OPERATOR, {}),
    Route("POST", "/api/v1/tasks/dc1/sn-001/enrollment", Role.OPERATOR, {}),
    Route("DELETE", "/api/v1/tasks/dc1/sn-003", Role.ADMIN),
    Route("GET", "/api/v1/tokens", Role.ADMIN),
    Route("POST", "/api/v1/tokens", Role.ADMIN, {"name": "mallory", "role": "admin"}),
    Route("DELETE", "/api/v1/tokens/test-viewer", Role.ADMIN),
]

#: Routes that are open on purpose (liveness, readiness, metrics on an ops network, login).
OPEN_RULES = {"/healthz", "/readyz", "/metrics", "/login", "/logout"}


@dataclass
class World:
    daemon: Daemon
    client: EtcdClient
    http: httpx.AsyncClient  # no credentials
    tokens: dict[Role, str]


@pytest.fixture
async def world(etcd: EtcdProcess, client: EtcdClient, store: Store) -> AsyncIterator[World]:
    """A control plane with: sn-001 pending, sn-002 failed, sn-003 cancelled; one token
    per role (``test-viewer``, ``test-operator``, ``test-admin``)."""
    async with open_daemon(make_config(etcd.endpoints, roles=CP_ONLY)) as daemon:
        await publish_os_types(daemon, "dc1", tuple(TEST_PLANS))
        for sn in ("sn-001", "sn-002", "sn-003"):
            await store.create_task(CreateTaskRequest.from_obj({**GUIDE_TASK, "sn": sn}), actor="t")
        await store.approve("dc1", "sn-002", approved_by="op")
        await store.fail("dc1", "sn-002", "disk on fire", actor="t")
        await store.cancel("dc1", "sn-003", actor="t")
        tokens = {role: await create_token(client, role) for role in Role}
        async with httpx.AsyncClient(base_url=daemon.urls["control-plane"]) as http:
            yield World(daemon, client, http, tokens)


async def call(http: httpx.AsyncClient, route: Route, headers: dict[str, str]) -> httpx.Response:
    return await http.request(route.method, route.path, json=route.body, headers=headers)


async def refused_everywhere(
    world: World, headers: dict[str, str], status: int, *, routes: list[Route] = ROUTES
) -> None:
    """Every route answers ``status`` with a JSON error, and nothing is written."""
    before = await keyspace(world.client)
    problems = []
    for route in routes:
        r = await call(world.http, route, headers)
        if r.status_code != status:
            problems.append(f"{route}: {r.status_code} {r.text[:200]}")
            continue
        body = r.json()
        if not isinstance(body.get("error"), str):
            problems.append(f"{route}: not a JSON error: {body}")
        if status == 401 and "bearer" not in r.headers.get("www-authenticate", "").lower():
            problems.append(f"{route}: 401 without WWW-Authenticate")
    assert not problems, "\n".join(problems)
    assert await keyspace(world.client) == before, "a refused request wrote something"


async def test_no_credentials(world: World) -> None:
    await refused_everywhere(world, {}, 401)


@pytest.mark.parametrize(
    "header",
    [
        "Bearer lpm_" + "A" * 43,  # well-formed, unknown
        "Bearer not-a-token",
        "Basic dGVzdDp0ZXN0",
        "bearer",
        "Bearer " + "x" * 300,
        "Token lpm_abc",
    ],
)
async def test_wrong_token(world: World, header: str) -> None:
    await refused_everywhere(world, {"Authorization": header}, 401)


async def test_another_tokens_hash_is_not_a_token(world: World) -> None:
    """Someone who can read etcd sees hashes; a hash does not authenticate."""
    stolen = hash_secret(world.tokens[Role.ADMIN])
    await refused_everywhere(world, bearer(stolen), 401)


async def test_expired_token(world: World) -> None:
    past = utcnow() - timedelta(hours=2)
    _, token = await TokenStore(world.client, clock=lambda: past).create(
        "expired-admin", Role.ADMIN, actor="t", expires_in=timedelta(hours=1)
    )
    r = await world.http.get("/api/v1/whoami", headers=bearer(token))
    assert r.status_code == 401 and r.json()["error"] == "token expired"
    await refused_everywhere(world, bearer(token), 401)


async def test_revoked_token(world: World) -> None:
    token = world.tokens[Role.ADMIN]
    assert (await world.http.get("/api/v1/whoami", headers=bearer(token))).status_code == 200
    await TokenStore(world.client).revoke("test-admin", actor="t")

    async def refused() -> bool:
        r = await world.http.get("/api/v1/whoami", headers=bearer(token))
        return r.status_code == 401

    # The control plane's cache follows etcd's watch: revocation lands within moments.
    took = await wait_for(refused, timeout=2, interval=0.005, what="revocation")
    assert took is not None
    r = await world.http.get("/api/v1/whoami", headers=bearer(token))
    assert r.json()["error"] == "token revoked"
    await refused_everywhere(world, bearer(token), 401)


@pytest.mark.parametrize("role", [Role.VIEWER, Role.OPERATOR])
async def test_insufficient_role(world: World, role: Role) -> None:
    weaker = [r for r in ROUTES if r.role > role]
    await refused_everywhere(world, bearer(world.tokens[role]), 403, routes=weaker)


@pytest.mark.parametrize("route", ROUTES, ids=str)
async def test_the_needed_role_gets_through(world: World, route: Route) -> None:
    r = await call(world.http, route, bearer(world.tokens[route.role]))
    assert r.status_code < 400, r.text


async def test_every_route_is_in_the_matrix(etcd: EtcdProcess, client: EtcdClient) -> None:
    """Each rule of the app is either in ROUTES, deliberately open, or a dashboard page
    (which redirects to the login page without a session)."""
    config = make_config(etcd.endpoints, roles=CP_ONLY).control_plane
    assert config is not None
    app = create_control_app(ControlPlane(config, client, Store(client)))
    known = {re.sub(r"\?.*", "", r.path) for r in ROUTES}
    async with (
        open_daemon(make_config(etcd.endpoints, roles=CP_ONLY)) as daemon,
        httpx.AsyncClient(base_url=daemon.urls["control-plane"]) as http,
    ):
        for rule in app.url_map.iter_rules():
            if rule.rule in OPEN_RULES or rule.rule.startswith("/static/"):
                continue
            path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: SAMPLE[m.group(1)], rule.rule)
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                r = await http.request(method, path)
                if rule.rule.startswith("/api/"):
                    assert path in known or _matches(path, known), f"{method} {rule.rule}"
                    assert r.status_code == 401, (method, rule.rule, r.status_code)
                else:
                    # A page: to the login page, or a 401/403, never content.
                    assert r.status_code in (303, 401, 403), (method, rule.rule, r.text)
                    if r.status_code == 303:
                        assert r.headers["location"].startswith("/login?next="), rule.rule


SAMPLE = {"idc": "dc1", "sn": "sn-001", "name": "test-viewer", "action": "approve"}


def _matches(path: str, known: set[str]) -> bool:
    return any(re.fullmatch(re.sub(r"dc1|sn-00\d|test-viewer", "[^/]+", k), path) for k in known)


# ----------------------------------------------------------------- who is recorded


async def test_actor_and_approver_come_from_the_token(world: World, store: Store) -> None:
    op = bearer(world.tokens[Role.OPERATOR])
    r = await world.http.post("/api/v1/tasks", json={**GUIDE_TASK, "sn": "sn-9"}, headers=op)
    assert r.status_code == 201
    assert r.json()["created_by"] == "test-operator"
    # approved_by in the body is ignored: nobody approves in someone else's name.
    r = await world.http.post(
        "/api/v1/tasks/dc1/sn-9/approve",
        json={"approved_by": "admin@example.com", "notes": "ok"},
        headers=op,
    )
    assert r.status_code == 200
    task = (await store.get_task("dc1", "sn-9")).task
    assert task.approval is not None and task.approval.approved_by == "test-operator"
    assert task.status_history[-1].actor == "test-operator"
    r = await world.http.post("/api/v1/tasks/dc1/sn-9/cancel", json={}, headers=op)
    assert (await store.get_task("dc1", "sn-9")).task.status_history[-1].actor == "test-operator"


# ----------------------------------------------------------------- the tokens API


async def test_tokens_api(world: World) -> None:
    admin = bearer(world.tokens[Role.ADMIN])
    r = await world.http.post(
        "/api/v1/tokens", json={"name": "alice@example.com", "role": "operator"}, headers=admin
    )
    assert r.status_code == 201, r.text
    created = r.json()
    token = created.pop("token")
    assert token.startswith("lpm_") and created["role"] == "operator"
    assert created["created_by"] == "test-admin" and created["expires_at"] is None
    # Stored hashed: the token itself is nowhere in etcd.
    snapshot = await keyspace(world.client)
    assert not any(token.encode() in v for v, _, _ in snapshot.values())
    record = snapshot[(TOKENS_PREFIX + "alice@example.com").encode()][0]
    assert hash_secret(token).encode() in record
    # It works at once, as an operator.
    r = await world.http.get("/api/v1/whoami", headers=bearer(token))
    assert r.json() == {"name": "alice@example.com", "role": "operator"}
    # Listing shows no token and no hash.
    r = await world.http.get("/api/v1/tokens", headers=admin)
    listed = {t["name"]: t for t in r.json()["tokens"]}
    assert listed["alice@example.com"]["state"] == "active"
    assert "token" not in r.text.replace('"tokens"', "") and "sha256" not in r.text
    # An active name cannot be taken over.
    r = await world.http.post(
        "/api/v1/tokens", json={"name": "alice@example.com", "role": "admin"}, headers=admin
    )
    assert r.status_code == 409
    # Revoke: it stops working.
    r = await world.http.delete("/api/v1/tokens/alice@example.com", headers=admin)
    assert r.status_code == 200 and r.json()["state"] == "revoked"

    async def refused() -> bool:
        return await _status(world.http, token) == 401

    await wait_for(refused, timeout=2, what="revocation of alice")
    # With an expiry.
    r = await world.http.post(
        "/api/v1/tokens", json={"name": "bob", "role": "viewer", "expires": "30d"}, headers=admin
    )
    assert r.status_code == 201 and r.json()["expires_at"] is not None


async def _status(http: httpx.AsyncClient, token: str) -> int:
    return (await http.get("/api/v1/whoami", headers=bearer(token))).status_code


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "a/b", "role": "viewer"}, "name"),
        ({"name": "../x", "role": "viewer"}, "name"),
        ({"name": "", "role": "viewer"}, "name"),
        ({"name": "x" * 65, "role": "viewer"}, "name"),
        ({"name": "ok", "role": "root"}, "role"),
        ({"name": "ok", "role": 3}, "role"),
        ({"name": "ok"}, "role"),
        ({"role": "viewer"}, "name"),
        ({"name": "ok", "role": "viewer", "expires": "0d"}, "expires"),
        ({"name": "ok", "role": "viewer", "expires": "99999d"}, "expires"),
        ({"name": "ok", "role": "viewer", "expires": 30}, "expires"),
        ({"name": "ok", "role": "viewer", "admin": True}, "admin"),
    ],
)
async def test_tokens_api_bad_input(world: World, body: dict[str, Any], field: str) -> None:
    before = await keyspace(world.client)
    r = await world.http.post("/api/v1/tokens", json=body, headers=bearer(world.tokens[Role.ADMIN]))
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field
    assert await keyspace(world.client) == before


# ----------------------------------------------------------------- browser sessions


async def login(world: World, token: str, next_path: str = "/") -> httpx.Response:
    return await world.http.post(
        "/login", data={"token": token, "next": next_path}, follow_redirects=False
    )


async def test_login_page(world: World) -> None:
    r = await world.http.get("/login?next=/api/v1/tasks")
    assert (
        r.status_code == 200
        and "<form" in r.text
        and 'name="token"' in r.text.replace("name=token", 'name="token"')
    )
    assert r.headers["x-frame-options"] == "DENY"


async def test_session_cookie_and_csrf(world: World) -> None:
    r = await login(world, world.tokens[Role.OPERATOR], "/api/v1/whoami")
    assert r.status_code == 303 and r.headers["location"] == "/api/v1/whoami"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP here; see test_tls.py for HTTPS
    assert world.tokens[Role.OPERATOR] not in cookie
    r = await world.http.get("/api/v1/whoami")
    assert r.status_code == 200, r.text
    me = r.json()
    assert (me["name"], me["role"]) == ("test-operator", "operator")
    csrf = me["csrf_token"]

    before = await keyspace(world.client)
    body = {**GUIDE_TASK, "sn": "sn-web"}
    for headers in ({}, {"X-CSRF-Token": "forged"}, {"X-CSRF-Token": ""}):
        r = await world.http.post("/api/v1/tasks", json=body, headers=headers)
        assert r.status_code == 403, r.text
        assert r.json()["field"] == "csrf_token"
    assert await keyspace(world.client) == before
    r = await world.http.post("/api/v1/tasks", json=body, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text
    # Reads need no CSRF token; the role still counts.
    assert (await world.http.get("/api/v1/tasks")).status_code == 200
    r = await world.http.get("/api/v1/tokens")
    assert r.status_code == 403


async def test_revoking_the_token_ends_its_sessions(world: World) -> None:
    await login(world, world.tokens[Role.VIEWER])
    assert (await world.http.get("/api/v1/whoami")).status_code == 200
    await TokenStore(world.client).revoke("test-viewer", actor="t")

    async def out() -> bool:
        return (await world.http.get("/api/v1/whoami")).status_code == 401

    await wait_for(out, timeout=2, what="the session to end")


async def test_logout(world: World) -> None:
    await login(world, world.tokens[Role.VIEWER])
    csrf = (await world.http.get("/api/v1/whoami")).json()["csrf_token"]
    r = await world.http.post("/logout", follow_redirects=False)
    assert r.status_code == 403  # no CSRF token: a cross-site logout is refused
    r = await world.http.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    # The cookie is cleared and the server forgot the session anyway.
    assert (await world.http.get("/api/v1/whoami")).status_code == 401


async def test_login_refusals(world: World) -> None:
    before = await keyspace(world.client)
    for token in ("", "lpm_" + "B" * 43, hash_secret(world.tokens[Role.ADMIN]), "x" * 5000):
        r = await login(world, token)
        assert r.status_code in (401, 413), r.status_code
        assert "set-cookie" not in r.headers
    # Login CSRF: a form posted from another site does not log the victim in.
    r = await world.http.post(
        "/login",
        data={"token": world.tokens[Role.ADMIN]},
        headers={"Origin": "http://evil.example"},
        follow_redirects=False,
    )
    assert r.status_code == 403 and "set-cookie" not in r.headers
    assert await keyspace(world.client) == before


@pytest.mark.parametrize(
    ("next_path", "location"),
    [
        ("/tasks/dc1/sn-001", "/tasks/dc1/sn-001"),
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("/ok\r\nSet-Cookie: x=y", "/"),
        ("", "/"),
    ],
)
async def test_login_redirects_only_to_this_site(
    world: World, next_path: str, location: str
) -> None:
    r = await login(world, world.tokens[Role.VIEWER], next_path)
    assert r.status_code == 303 and r.headers["location"] == location


async def test_bearer_wins_over_cookie(world: World) -> None:
    """A bad Authorization header is refused even with a good session cookie."""
    await login(world, world.tokens[Role.ADMIN])
    r = await world.http.get("/api/v1/whoami", headers=bearer("lpm_" + "C" * 43))
    assert r.status_code == 401


async def test_retry_and_reissue_return_a_new_secret(world: World, store: Store) -> None:
    op = bearer(world.tokens[Role.OPERATOR])
    r = await world.http.post("/api/v1/tasks/dc1/sn-002/retry", json={}, headers=op)
    assert r.status_code == 200
    first = r.json()["enrollment_secret"]
    r = await world.http.post("/api/v1/tasks/dc1/sn-002/enrollment", json={}, headers=op)
    assert r.status_code == 200
    second = r.json()["enrollment_secret"]
    assert first != second and second.startswith("lpe_")
    # Shown once: nowhere in what a viewer reads, nowhere in etcd.
    r = await world.http.get("/api/v1/tasks/dc1/sn-002", headers=bearer(world.tokens[Role.VIEWER]))
    assert second not in r.text and "enrol" not in r.text
    snapshot = await keyspace(world.client)
    assert not any(second.encode() in v for v, _, _ in snapshot.values())
    # Finished tasks get no new secret.
    r = await world.http.post("/api/v1/tasks/dc1/sn-003/enrollment", json={}, headers=op)
    assert r.status_code == 409
    assert (await store.get_task("dc1", "sn-003")).task.status is TaskStatus.CANCELLED


# ----------------------------------------------------------------- ops endpoints


async def test_ops_endpoints_open_and_metrics_switch(etcd: EtcdProcess, client: EtcdClient) -> None:
    """/healthz and /readyz are open (they say only whether a role is up); /metrics is open
    by default (an ops network scrapes it) and behind a viewer token, or not served on the
    agent port, with metrics_public = false."""
    viewer = await create_token(client, Role.VIEWER)
    config = make_config(etcd.endpoints)
    async with open_daemon(config) as daemon, httpx.AsyncClient() as http:
        for url in daemon.urls.values():
            for path in ("/healthz", "/readyz", "/metrics"):
                assert (await http.get(url + path)).status_code == 200, (url, path)
    assert config.control_plane is not None and config.regional is not None
    closed = dataclasses.replace(
        config,
        control_plane=dataclasses.replace(config.control_plane, metrics_public=False),
        regional=dataclasses.replace(config.regional, metrics_public=False),
    )
    async with open_daemon(closed) as daemon, httpx.AsyncClient() as http:
        cp, rg = daemon.urls["control-plane"], daemon.urls["regional"]
        assert (await http.get(cp + "/metrics")).status_code == 401
        r = await http.get(cp + "/metrics", headers=bearer(viewer))
        assert r.status_code == 200 and "lpmosd_auth_failures_total" in r.text
        assert (await http.get(rg + "/metrics")).status_code == 404
        assert (await http.get(cp + "/healthz")).status_code == 200
