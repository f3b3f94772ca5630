"""Who is calling the control plane, and may they: bearer tokens, browser sessions, CSRF.

Two ways in, one :class:`Principal` out (kept in ``quart.g`` for the request):

- **API clients** send ``Authorization: Bearer lpm_…`` (an operator token, see
  :mod:`lpmosd.tokens`). No cookies, so no CSRF check.
- **Browsers** log in at ``/login`` with a token and get a session cookie (HttpOnly,
  SameSite=Strict, Secure and ``__Host-`` prefixed when served over TLS). Sessions are
  server-side: the cookie holds a random id into this process's memory, so sessions belong
  to one control-plane process (a restart or another replica means logging in again). A
  session lasts at most :data:`SESSION_LIFETIME` and never beyond its token's expiry; it
  dies the moment its token is revoked (every request re-checks the token record). Every
  state-changing request made with the cookie must carry the session's CSRF token (form
  field ``csrf_token`` or header ``X-CSRF-Token``).

Route decorators: :func:`require_role` (JSON API: 401/403 JSON errors) and
:func:`require_page_role` (HTML: redirect to the login page, 403 page). Both run the CSRF
check themselves for cookie-authenticated POST/PUT/PATCH/DELETE requests.
"""

from __future__ import annotations

import functools
import hmac
import html
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, ParamSpec, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

from jinja2 import TemplateNotFound
from prometheus_client import Counter
from quart import Response, current_app, g, render_template, request
from quart_trio import QuartTrio

from lpmosd.credentials import MAX_SECRET_CHARS
from lpmosd.errors import AuthenticationError, PermissionDeniedError
from lpmosd.metrics import REGISTRY
from lpmosd.tokens import Role, TokenRecord, TokenStore

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "SESSION_LIFETIME",
    "AuthState",
    "Principal",
    "Role",
    "check_csrf",
    "csrf_token",
    "current_principal",
    "install_auth",
    "require_page_role",
    "require_role",
]

log = logging.getLogger("lpmosd.auth")

AUTH_FAILURES = Counter(
    "lpmosd_auth_failures_total",
    "Refused control-plane requests by reason (unauthenticated, forbidden, csrf, login).",
    ["reason"],
    registry=REGISTRY,
)

CSRF_FIELD: Final = "csrf_token"
CSRF_HEADER: Final = "X-CSRF-Token"
SESSION_LIFETIME: Final = timedelta(hours=8)
#: Sessions kept per process; the oldest is dropped beyond this (a login flood with a valid
#: token must not exhaust memory).
MAX_SESSIONS: Final = 10_000
_MAX_LOGIN_BODY: Final = 4096
_UNSAFE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_EXT: Final = "lpmosd_auth"

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Principal:
    """Who made the request: the token's name (recorded as actor) and its role."""

    name: str
    role: Role


@dataclass(slots=True)
class _Session:
    token_name: str
    token_hash: str  # the session dies if the name is re-issued with another token
    csrf: str
    expires: float  # time.monotonic()


class _Sessions:
    """Server-side browser sessions of this process: random id -> session, with expiry."""

    def __init__(self, lifetime: timedelta = SESSION_LIFETIME, limit: int = MAX_SESSIONS) -> None:
        self.lifetime = lifetime.total_seconds()
        self.limit = limit
        self._items: OrderedDict[str, _Session] = OrderedDict()

    def create(self, record: TokenRecord, *, until_expiry: float | None) -> tuple[str, _Session]:
        lifetime = self.lifetime
        if until_expiry is not None:
            lifetime = min(lifetime, max(0.0, until_expiry))
        sid = secrets.token_urlsafe(32)
        session = _Session(
            record.name, record.token_hash, secrets.token_urlsafe(32), time.monotonic() + lifetime
        )
        self._items[sid] = session
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
        return sid, session

    def get(self, sid: str) -> _Session | None:
        session = self._items.get(sid)
        if session is None:
            return None
        if time.monotonic() >= session.expires:
            del self._items[sid]
            return None
        return session

    def drop(self, sid: str) -> None:
        self._items.pop(sid, None)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(eq=False)
class AuthState:
    """What :func:`install_auth` attaches to the app."""

    tokens: TokenStore
    secure_cookies: bool
    sessions: _Sessions

    @property
    def cookie_name(self) -> str:
        """``__Host-`` binds the cookie to this exact origin; browsers only allow it with
        Secure, so plain-HTTP deployments use the bare name."""
        return "__Host-lpmosd_session" if self.secure_cookies else "lpmosd_session"


def _state() -> AuthState:
    state: AuthState = current_app.extensions[_EXT]
    return state


# --------------------------------------------------------------------------- the request


def current_principal() -> Principal:
    """The authenticated caller; only inside a request that passed a ``require_*`` check."""
    principal: Principal | None = g.get("lpmosd_principal")
    if principal is None:
        raise RuntimeError("current_principal() outside an authenticated request")
    return principal


def csrf_token() -> str:
    """The CSRF token of the current browser session ("" for bearer-token requests)."""
    session: _Session | None = g.get("lpmosd_session")
    return session.csrf if session is not None else ""


def _bearer() -> str | None:
    """The bearer token of the request; None without an Authorization header."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > MAX_SECRET_CHARS:
        raise AuthenticationError("Authorization must be 'Bearer <token>'", field="authorization")
    return value


async def _session_principal() -> Principal | None:
    """The principal of the request's session cookie, or None (no, expired or dead session)."""
    state = _state()
    sid = request.cookies.get(state.cookie_name)
    if not sid or len(sid) > 128:
        return None
    session = state.sessions.get(sid)
    if session is None:
        return None
    record = await state.tokens.get(session.token_name)
    if (
        record is None
        or record.state(state.tokens.clock()) != "active"
        or not hmac.compare_digest(session.token_hash.encode(), record.token_hash.encode())
    ):
        state.sessions.drop(sid)  # the token was revoked, expired or re-issued
        return None
    g.lpmosd_session = session
    g.lpmosd_session_id = sid
    return Principal(record.name, record.role)


async def _authenticate() -> Principal | None:
    """The principal of the request: bearer token first, else the session cookie.

    Raises AuthenticationError for a bad bearer token; None when there are no credentials.
    """
    token = _bearer()
    if token is not None:
        record = await _state().tokens.authenticate(token)
        principal = Principal(record.name, record.role)
        g.lpmosd_via = "token"
    else:
        found = await _session_principal()
        if found is None:
            return None
        principal = found
        g.lpmosd_via = "session"
    g.lpmosd_principal = principal
    return principal


async def check_csrf() -> None:
    """Refuse (403) a cookie-authenticated request whose CSRF token does not match.

    The token comes from the ``X-CSRF-Token`` header or, for form posts, the ``csrf_token``
    field. Requests authenticated by a bearer token need no check (browsers never add that
    header on their own).
    """
    if g.get("lpmosd_via") == "token" or g.get("lpmosd_csrf_ok"):
        return
    session: _Session | None = g.get("lpmosd_session")
    if session is None:
        AUTH_FAILURES.labels("csrf").inc()
        raise PermissionDeniedError("no browser session to check a CSRF token against", "csrf")
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.mimetype in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        sent = (await request.form).get(CSRF_FIELD)
    if not sent or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        AUTH_FAILURES.labels("csrf").inc()
        log.warning("CSRF token missing or wrong", extra=_who())
        raise PermissionDeniedError("missing or wrong CSRF token", field="csrf_token")
    g.lpmosd_csrf_ok = True


def _who() -> dict[str, Any]:
    return {"path": request.path, "method": request.method, "remote": request.remote_addr}


# --------------------------------------------------------------------------- decorators


def require_role(
    role: Role,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Decorate a JSON API route: 401 without valid credentials, 403 below ``role``.

    Errors are the API's JSON errors (``{"error", "field"}``); 401 carries
    ``WWW-Authenticate: Bearer``. Cookie-authenticated unsafe methods are CSRF-checked.
    """

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                principal = await _authenticate()
            except AuthenticationError as exc:
                AUTH_FAILURES.labels("unauthenticated").inc()
                log.info("refused: %s", exc.message, extra=_who())
                raise
            if principal is None:
                AUTH_FAILURES.labels("unauthenticated").inc()
                raise AuthenticationError(
                    "authentication required: send 'Authorization: Bearer <token>'",
                    field="authorization",
                )
            _check_role(principal, role)
            if request.method in _UNSAFE_METHODS:
                await check_csrf()
            return await fn(*args, **kwargs)

        return wrapper

    return decorate


def require_page_role(
    role: Role,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R | Response]]]:
    """Decorate an HTML page: without a session, 303 to ``/login?next=<path>``; below
    ``role``, a 403 page. Cookie-authenticated unsafe methods are CSRF-checked (403)."""

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R | Response]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | Response:
            try:
                principal = await _authenticate()
            except AuthenticationError as exc:
                AUTH_FAILURES.labels("unauthenticated").inc()
                return _page(401, "Not signed in", exc.message)
            if principal is None:
                target = request.full_path if request.query_string else request.path
                return _redirect(f"/login?next={quote(target, safe='/')}", 303)
            if principal.role < role:
                AUTH_FAILURES.labels("forbidden").inc()
                return _page(
                    403,
                    "Forbidden",
                    f"{principal.name} ({principal.role.label}) may not do this; it needs the "
                    f"{role.label} role.",
                )
            if request.method in _UNSAFE_METHODS:
                try:
                    await check_csrf()
                except PermissionDeniedError as exc:
                    return _page(403, "Forbidden", exc.message)
            return await fn(*args, **kwargs)

        return wrapper

    return decorate


def _check_role(principal: Principal, role: Role) -> None:
    if principal.role < role:
        AUTH_FAILURES.labels("forbidden").inc()
        log.info(
            "forbidden",
            extra={**_who(), "principal": principal.name, "role": principal.role.label},
        )
        raise PermissionDeniedError(
            f"{principal.name} has role {principal.role.label}; this needs {role.label}",
            field="authorization",
        )


# --------------------------------------------------------------------------- pages


_STYLE: Final = (
    "body{font-family:system-ui,sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem}"
    "input{width:100%;padding:.5rem;margin:.5rem 0;box-sizing:border-box}"
    "button{padding:.5rem 1rem}.error{color:#b00020}"
)


def _page(status: int, title: str, message: str) -> Response:
    body = (
        f"<!doctype html><html lang=en><meta charset=utf-8><title>{html.escape(title)} · "
        f"lpmosd</title><style>{_STYLE}</style><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(message)}</p><p><a href=/login>Sign in</a></p></html>"
    )
    return _html(body, status)


def _html(body: str, status: int = 200) -> Response:
    response = Response(body, status=status, content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    return response


def _redirect(location: str, status: int = 303) -> Response:
    response = Response("", status=status)
    response.headers["Location"] = location
    return response


def _safe_next(value: str | None) -> str:
    """Only same-site paths: no scheme, no host, no ``//`` or backslash tricks."""
    if not value or len(value) > 2000 or not value.startswith("/"):
        return "/"
    if value.startswith(("//", "/\\")) or any(c in value for c in "\\\r\n\t\0"):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


async def _login_page(error: str = "", next_path: str = "/", status: int = 200) -> Response:
    try:
        # The dashboard may supply its own styled page; it gets ``error`` and ``next``.
        body = await render_template("login.html", error=error, next=next_path)
        response = Response(body, status=status, content_type="text/html; charset=utf-8")
        return response
    except TemplateNotFound:
        pass
    err = f"<p class=error role=alert>{html.escape(error)}</p>" if error else ""
    body = (
        "<!doctype html><html lang=en><meta charset=utf-8><title>Sign in · lpmosd</title>"
        f"<style>{_STYLE}</style><h1>Sign in to lpmosd</h1>{err}"
        "<form method=post action=/login>"
        f'<input type=hidden name=next value="{html.escape(next_path)}">'
        "<label for=token>API token</label>"
        "<input id=token name=token type=password autocomplete=current-password required "
        'autofocus placeholder="lpm_…">'
        "<button type=submit>Sign in</button></form>"
        "<p>Get a token from an administrator (<code>lpmosd token create</code>).</p></html>"
    )
    return _html(body, status)


async def _read_small_form() -> dict[str, str]:
    """A urlencoded form of at most 4 KiB; the first value of each field."""
    if request.content_length is not None and request.content_length > _MAX_LOGIN_BODY:
        return {}
    data = bytearray()
    async for chunk in request.body:
        data += chunk
        if len(data) > _MAX_LOGIN_BODY:
            return {}
    try:
        text = bytes(data).decode("utf-8")
        parsed = parse_qs(text, max_num_fields=8, strict_parsing=False)
    except ValueError:
        return {}
    return {k: v[0] for k, v in parsed.items() if v}


def _same_origin() -> bool:
    """A login POST from another site's page is refused (login CSRF): when the browser says
    where the form came from, it must be us."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        referer = request.headers.get("Referer")
        if referer is None:
            return origin is None  # non-browser clients send neither
        origin = referer
    parts = urlsplit(origin)
    return parts.netloc == request.host


# --------------------------------------------------------------------------- install


def install_auth(app: QuartTrio, tokens: TokenStore, *, secure_cookies: bool) -> None:
    """Attach authentication to ``app``: ``/login`` (GET form, POST token -> session cookie,
    redirect to ``next``), ``/logout`` (POST, CSRF-checked) and security headers."""
    state = AuthState(tokens=tokens, secure_cookies=secure_cookies, sessions=_Sessions())
    app.extensions[_EXT] = state

    @app.get("/login")
    async def login_form() -> Response:
        return await _login_page(next_path=_safe_next(request.args.get("next")))

    @app.post("/login")
    async def login() -> Response:
        form = await _read_small_form()
        next_path = _safe_next(form.get("next") or request.args.get("next"))
        if not _same_origin():
            AUTH_FAILURES.labels("login").inc()
            return await _login_page("This sign-in form came from another site.", next_path, 403)
        token = form.get("token", "").strip()
        try:
            record = await tokens.authenticate(token)
        except AuthenticationError as exc:
            AUTH_FAILURES.labels("login").inc()
            log.info("login refused", extra={**_who(), "reason": exc.message})
            return await _login_page(f"Sign-in failed: {exc.message}.", next_path, 401)
        to_expiry = None
        if record.expires_at is not None:
            to_expiry = (record.expires_at - tokens.clock()).total_seconds()
        sid, session = state.sessions.create(record, until_expiry=to_expiry)
        log.info("login", extra={**_who(), "principal": record.name, "role": record.role.label})
        response = _redirect(next_path, 303)
        response.set_cookie(
            state.cookie_name,
            sid,
            max_age=int(max(1.0, session.expires - time.monotonic())),
            path="/",
            secure=secure_cookies,
            httponly=True,
            samesite="Strict",
        )
        return response

    @app.post("/logout")
    async def logout() -> Response:
        principal = await _session_principal()
        if principal is not None:
            g.lpmosd_via = "session"
            g.lpmosd_principal = principal
            try:
                await check_csrf()
            except PermissionDeniedError as exc:
                return _page(403, "Forbidden", exc.message)
            state.sessions.drop(g.lpmosd_session_id)
            log.info("logout", extra={**_who(), "principal": principal.name})
        response = _redirect("/login", 303)
        response.delete_cookie(
            state.cookie_name, path="/", secure=secure_cookies, httponly=True, samesite="Strict"
        )
        return response

    @app.after_request
    async def _headers(response: Response) -> Response:
        headers = response.headers
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Referrer-Policy", "same-origin")
        if request.path not in ("/metrics", "/healthz", "/readyz") and not request.path.startswith(
            "/static/"
        ):
            # Task data and pages are per-principal and change constantly: never cache.
            headers.setdefault("Cache-Control", "no-store")
        if secure_cookies:
            headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        if (
            response.status_code == 401
            and "WWW-Authenticate" not in headers
            and response.mimetype == "application/json"
        ):
            headers["WWW-Authenticate"] = 'Bearer realm="lpmosd"'
        return response
