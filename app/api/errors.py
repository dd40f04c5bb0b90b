"""Every error is JSON ``{"error": {"code", "message", ...}}`` with a message a person can act
on; bad input never gets a 500 or a traceback, and an unreachable database is a 503 with
``Retry-After`` and one log line."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.schemas import ErrorBody

log = logging.getLogger(__name__)

#: seconds a client should wait before retrying after a 503.
RETRY_AFTER_S = 5
#: at most one "database unreachable" log line per this many seconds.
_LOG_EVERY_S = 10.0


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra
        self.headers = headers


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def describe_validation(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    problems = []
    for err in errors:
        where = _location(tuple(err.get("loc", ())))
        if err.get("type") == "extra_forbidden":
            message = f"unknown field '{where}'"
        elif err.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
        else:
            message = f"{where}: {err['msg'].removeprefix('Value error, ')}"
        problems.append({"field": where, "message": message})
    return problems


class BodyTooLarge(HTTPException):
    """Raised while a body is read, as soon as it passes the limit (FastAPI re-raises
    HTTPExceptions from body parsing instead of turning them into a 400)."""

    def __init__(self, limit: int, setting: str = "GPUFLEET_MAX_BODY_BYTES") -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes ({setting})")


class BodyLimit:
    """413 for bodies over ``limit`` bytes: at once from Content-Length, else while the body
    streams in, before it is held whole in memory."""

    def __init__(
        self, app: ASGIApp, limit: int, overrides: dict[str, tuple[int, str]] | None = None
    ) -> None:
        self.app, self.default = app, (limit, "GPUFLEET_MAX_BODY_BYTES")
        #: path -> its own limit and the setting that sets it (uploads).
        self.overrides = overrides or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.overrides.get(scope.get("path", ""), self.default)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_large = int(value) > limit
                except ValueError:
                    too_large = False
                if too_large:
                    exc = BodyTooLarge(limit, setting)
                    response = JSONResponse(
                        error_body("too_large", str(exc.detail)), status_code=413
                    )
                    await response(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        await self.app(scope, limited, send)


def install(app: FastAPI) -> None:
    last_logged = [0.0]

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.code, exc.message, **exc.extra),
            status_code=exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = describe_validation(list(exc.errors()))
        message = "; ".join(p["message"] for p in problems)
        return JSONResponse(
            error_body("invalid_request", message, problems=problems), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # A body that is not UTF-8 JSON: an invalid request like any other (422).
            return JSONResponse(
                error_body("invalid_request", "the body is not valid UTF-8 JSON"), status_code=422
            )
        code = {
            404: "not_found",
            405: "method_not_allowed",
            401: "unauthorized",
            413: "too_large",
        }.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        now = time.monotonic()
        if now - last_logged[0] >= _LOG_EVERY_S:
            last_logged[0] = now
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning(
                "database unreachable (%s %s answered 503): %s",
                request.method,
                request.url.path,
                first[:300],
            )
        return JSONResponse(
            error_body(
                "unavailable",
                f"the database is unreachable; retry in {RETRY_AFTER_S} s",
            ),
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    for kind in (OperationalError, InterfaceError, PoolTimeout):
        app.add_exception_handler(kind, _unavailable)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("internal", "internal error; it has been logged"), status_code=500
        )


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of an operation, for the OpenAPI document."""
    described = {
        400: "Ambiguous job id prefix (the candidates are listed).",
        401: "Missing or unknown bearer token.",
        403: "The token may not use this operation.",
        404: "No such job for this tenant (another tenant's job is a 404 too).",
        409: "Conflict: the job already finished, or an Idempotency-Key reused with another body.",
        413: "The request body is over the limit (GPUFLEET_MAX_BODY_BYTES).",
        422: "Invalid request: each problem is listed.",
        503: "The database is unreachable: retry after Retry-After seconds.",
    }
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": described[status]}
        if status == 503:
            entry["headers"] = {
                "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
            }
        if status == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        out[status] = entry
    return out
