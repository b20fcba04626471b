"""HTTP errors as RFC 9457 ``application/problem+json`` bodies: {type, title, status, detail, request_id}.

Every failure the gateway reports goes through :class:`ApiError` or one of the handlers below, so a client
always gets a message naming the problem and the request id to quote; unexpected exceptions become a 500
whose detail hides internals (they are logged with the request id instead).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
LOG = logging.getLogger("service.errors")


class ApiError(Exception):
    """An error with an HTTP status and a message for the client."""

    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None, title: str | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.title = title or HTTPStatus(status).phrase


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None) or request.headers.get("x-request-id")


def problem_body(status: int, detail: str, request_id: str | None, title: str | None = None, **extra: Any) -> dict:
    title = title or HTTPStatus(status).phrase
    slug = title.lower().replace(" ", "-").replace("'", "")
    return {"type": f"urn:ponder:problem:{slug}", "title": title, "status": status, "detail": detail,
            "request_id": request_id, **extra}


def problem_response(status: int, detail: str, request_id: str | None, *, headers: dict[str, str] | None = None,
                     title: str | None = None, **extra: Any) -> JSONResponse:
    headers = dict(headers or {})
    if request_id:
        headers["X-Request-ID"] = request_id
    return JSONResponse(problem_body(status, detail, request_id, title, **extra), status_code=status,
                        headers=headers, media_type=PROBLEM_JSON)


def _describe_validation(errors: list[dict]) -> str:
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Route every error class to a problem+json answer."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return problem_response(exc.status, exc.detail, request_id_of(request), headers=exc.headers, title=exc.title)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return problem_response(422, _describe_validation(errors), request_id_of(request), errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /docs for the API"
        return problem_response(exc.status_code, detail, request_id_of(request), headers=dict(exc.headers or {}))

    @app.exception_handler(ClientDisconnect)
    async def _left(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # the client closed its connection mid-upload: nobody reads this answer, but the access log and the
        # metrics say 499 rather than 500
        return problem_response(499, "the client disconnected during the upload", request_id_of(request),
                                title="Client Closed Request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        LOG.exception("unhandled error: %s", exc)
        return problem_response(500, "internal error; quote the request id when reporting it",
                                request_id_of(request))
