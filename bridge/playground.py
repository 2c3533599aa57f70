"""The playground page: a chat in the browser over the public OpenAI REST API (`GET /v1/models`,
`POST /v1/chat/completions` with `stream: true`), served by the bridge at `GET /playground` (`GET /` redirects
to it). Envoy routes both paths to the bridge untranscoded.

The page is package data (static/playground.{html,css,js}); the CSS and JS are inlined into one HTML document
when served, so the page is a single response behind a single route. Its Content-Security-Policy allows exactly
those inline hashes and requests to its own origin: nothing from a CDN or any other host can load.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

PATH = "/playground"
_STATIC = files("genrpc.bridge") / "static"


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@functools.cache
def page() -> tuple[bytes, str]:
    """The HTML document with its CSS and JS inlined, and the Content-Security-Policy that admits only them."""
    html = (_STATIC / "playground.html").read_text(encoding="utf-8")
    css = (_STATIC / "playground.css").read_text(encoding="utf-8")
    js = (_STATIC / "playground.js").read_text(encoding="utf-8")
    html = html.replace('<link rel="stylesheet" href="playground.css">', f"<style>{css}</style>")
    html = html.replace('<script src="playground.js"></script>', f"<script>{js}</script>")
    csp = (f"default-src 'none'; script-src {_csp_hash(js)}; style-src {_csp_hash(css)}; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), csp


async def _playground(request: Request) -> Response:
    body, csp = page()
    return Response(body, media_type="text/html; charset=utf-8",
                    headers={"content-security-policy": csp, "cache-control": "no-cache",
                             "x-content-type-options": "nosniff"})


async def _root(request: Request) -> Response:
    # relative, so the redirect also works when the stack is mounted under a path prefix
    return RedirectResponse(PATH.lstrip("/"), status_code=302)


def routes() -> list[Route]:
    return [Route(PATH, _playground, methods=["GET"]), Route("/", _root, methods=["GET"])]
