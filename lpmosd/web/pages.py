"""What every lpmosd HTML page shares: security headers and template filters."""

from __future__ import annotations

from typing import Final

from quart import Response

#: No 'unsafe-inline' anywhere: scripts and styles are static files, and progress bars are
#: <progress> elements, so pages need no style attributes either.
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def page_headers(resp: Response) -> Response:
    """Add the security headers; HTML pages (inventory, CSRF tokens) are never cached."""
    for name, value in SECURITY_HEADERS.items():
        resp.headers.setdefault(name, value)
    if resp.mimetype == "text/html":
        resp.headers["Cache-Control"] = "no-store"
    return resp


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units with one decimal (``256.0 GiB``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"
