"""What every lpmosd HTTP app shares: JSON errors, strict bodies, ops endpoints, metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from lpmosd.errors import (
    NOSPACE_HELP,
    EtcdError,
    EtcdNoSpaceError,
    EtcdUnavailableError,
    InputError,
    NotLeaderError,
    PayloadTooLargeError,
    UnavailableError,
    ValidationError,
)
from lpmosd.metrics import REGISTRY
from lpmosd.web.server import MAX_HEADER_BYTES

log = logging.getLogger("lpmosd.http")

HTTP_REQUESTS = Counter(
    "lpmosd_http_requests_total",
    "HTTP requests by app, route and status code.",
    ["app", "route", "code"],
    registry=REGISTRY,
)

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


def error_response(status: int, message: str, field: str | None = None) -> Response:
    """The JSON error shape of every API: ``{"error": ..., "field": ...}``.

    A 413 closes the connection: the rest of the oversized body is never read, and a
    client that sends the whole body before reading (httpx, most libraries without
    ``Expect: 100-continue``) would otherwise block on a full socket until it timed out
    instead of seeing the answer.
    """
    response = Response(error_body(message, field), status=status, content_type="application/json")
    if status == 413:
        response.headers["Connection"] = "close"
    return response


def error_body(message: str, field: str | None = None) -> bytes:
    """The body of :func:`error_response` (the lean agent path sends the same bytes)."""
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return json.dumps(body).encode()


def json_body(obj: Any) -> bytes:
    """The body of :func:`json_response`: compact JSON."""
    return json.dumps(obj, separators=(",", ":")).encode()


def json_response(obj: Any, status: int = 200) -> Response:
    """Compact JSON."""
    return Response(json_body(obj), status=status, content_type="application/json")


def map_error(exc: Exception, *, path: str = "") -> tuple[int, str, str | None]:
    """``(status, message, field)`` of the JSON error answering ``exc`` (logged as needed):
    the one mapping of errors to HTTP, shared by the Quart apps and the lean agent path."""
    if isinstance(exc, InputError):
        return exc.status, exc.message, exc.field
    if isinstance(exc, UnavailableError):
        return 503, str(exc), None
    if isinstance(exc, EtcdUnavailableError):
        log.warning("etcd unavailable", extra={"error": str(exc)})
        return 503, "etcd is unavailable; try again", None
    if isinstance(exc, EtcdNoSpaceError):
        log.error("etcd is out of space", extra={"error": str(exc)})
        return 503, NOSPACE_HELP, None
    if isinstance(exc, NotLeaderError):
        log.warning("write refused: not the leader", extra={"error": str(exc)})
        return 503, f"{exc}; retry (another instance leads)", None
    if isinstance(exc, EtcdError):
        log.error("etcd error", extra={"error": str(exc)})
        return 503, "storage error; try again", None
    log.exception("unhandled error", extra={"path": path}, exc_info=exc)
    return 500, "internal error", None


def _reject_constant(name: str) -> Any:
    raise ValidationError(f"invalid JSON number {name}", field="body")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValidationError(f"duplicate JSON key {k!r}", field=k)
        out[k] = v
    return out


def parse_json(data: bytes) -> object:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys; errors name ``body``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("body is not UTF-8", field="body") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"malformed JSON: {exc.msg} at {exc.pos}", field="body") from None
    except RecursionError:
        raise ValidationError("JSON nested too deeply", field="body") from None


async def read_json(max_bytes: int, *, empty_ok: bool = False) -> dict[str, Any]:
    """The request body: a strict JSON object, refusing bodies over ``max_bytes`` (413).

    Every body of our APIs is an object; anything else (``[]``, ``null``, a number) is a
    400 naming ``body`` — never silently taken for "no body".
    """
    length = request.content_length
    if length is not None and length > max_bytes:
        raise PayloadTooLargeError(f"body over {max_bytes} bytes", field="body")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.body:
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLargeError(f"body over {max_bytes} bytes", field="body")
        chunks.append(chunk)
    return parse_body(b"".join(chunks), empty_ok=empty_ok)


def parse_body(data: bytes, *, empty_ok: bool = False) -> dict[str, Any]:
    """A request body that must be a JSON object (or empty, with ``empty_ok``); 400 naming
    ``body`` otherwise."""
    if not data.strip():
        if empty_ok:
            return {}
        raise ValidationError("a JSON body is required", field="body")
    body = parse_json(data)
    if not isinstance(body, dict):
        raise ValidationError("body must be a JSON object", field="body")
    return body


def no_fields(body: dict[str, Any]) -> None:
    """For endpoints that take no parameters: refuse any field rather than ignore it."""
    for key in body:
        raise ValidationError(f"unknown field {key!r}", field=str(key))


def install_common(
    app: QuartTrio, *, name: str, readiness: Readiness, max_body: int, metrics: bool = True
) -> None:
    """Error mapping, body limit, request metrics and /healthz, /readyz, /metrics.

    ``metrics=False`` leaves ``/metrics`` out (the app guards its own, or serves none).
    /healthz and /readyz are always open: they say only whether the role is up.
    """
    app.config["MAX_CONTENT_LENGTH"] = max_body
    # "//" in a path is a 404 like any other unknown path, not a redirect to a merged path.
    app.url_map.merge_slashes = False

    @app.before_request
    async def _header_limit() -> Response | None:
        # hypercorn caps a header block only while it is incomplete; one that arrives in a
        # single read (up to 64 KiB) gets through, so check the total here as well.
        scope = request.scope
        size = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
        size += sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
        if size > MAX_HEADER_BYTES:
            return error_response(431, f"request line and headers over {MAX_HEADER_BYTES} bytes")
        return None

    @app.errorhandler(InputError)
    @app.errorhandler(UnavailableError)
    @app.errorhandler(EtcdError)
    async def _mapped(exc: Exception) -> Response:
        return error_response(*map_error(exc))

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        return error_response(code, exc.description or exc.name)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        return error_response(*map_error(exc, path=request.path))

    @app.after_request
    async def _count(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        HTTP_REQUESTS.labels(name, rule, str(response.status_code)).inc()
        return response

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        ready, detail = await readiness()
        etcd = detail.get("etcd")
        if not ready and isinstance(etcd, dict) and "reason" in etcd:
            detail = {"reason": etcd["reason"], **detail}  # NOSPACE: say what to do
        return json_response({"ready": ready, **detail}, 200 if ready else 503)

    if metrics:
        app.add_url_rule("/metrics", "metrics", metrics_response, methods=["GET"])


async def metrics_response() -> Response:
    """The process's Prometheus metrics."""
    from lpmosd.web.ops import refresh_probes

    await refresh_probes()  # etcd's database size, at most one Status call a second
    return Response(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
