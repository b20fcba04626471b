"""The API docs pages, /docs (Swagger UI) and /redoc (ReDoc), with their scripts, styles and icon served by the
gateway itself from ``service/static/vendor`` (pinned versions, see its README): FastAPI's defaults load them
from a CDN, which leaves both pages blank on a machine without internet.

FastAPI's own page builders are used with local URLs (rather than the ``fastapi-offline`` package): no extra
dependency, and the asset versions are ours to pin. The app is created with ``docs_url=None, redoc_url=None``
and includes this router instead."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.responses import HTMLResponse

router = APIRouter(include_in_schema=False)

DOCS_URL, REDOC_URL, OAUTH2_REDIRECT_URL = "/docs", "/redoc", "/docs/oauth2-redirect"
SWAGGER = "/static/vendor/swagger-ui"
REDOC = "/static/vendor/redoc"
# The online validator badge would call validator.swagger.io; the docs must not reach outside.
SWAGGER_PARAMETERS = {"validatorUrl": None}


def _root(request: Request) -> str:
    """The path prefix the app is served under (behind a proxy), so every URL stays right there too."""
    return request.scope.get("root_path", "").rstrip("/")


@router.get(DOCS_URL)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(openapi_url=root + request.app.openapi_url, title=f"{request.app.title} - Swagger UI",
                               swagger_js_url=f"{root}{SWAGGER}/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}{SWAGGER}/swagger-ui.css",
                               swagger_favicon_url=f"{root}{SWAGGER}/favicon-32x32.png",
                               oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
                               swagger_ui_parameters=SWAGGER_PARAMETERS)


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(REDOC_URL)
async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_redoc_html(openapi_url=root + request.app.openapi_url, title=f"{request.app.title} - ReDoc",
                          redoc_js_url=f"{root}{REDOC}/redoc.standalone.js",
                          redoc_favicon_url=f"{root}{SWAGGER}/favicon-32x32.png", with_google_fonts=False)
