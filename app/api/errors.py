"""Every error is JSON ``{"error": {"code", "message", ...}}`` with a message a person can act
on; bad input never gets a 500 or a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


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


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, **exc.extra), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = describe_validation(list(exc.errors()))
        message = "; ".join(p["message"] for p in problems)
        return JSONResponse(
            error_body("invalid_request", message, problems=problems), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            error_body(code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("internal", "internal error; it has been logged"), status_code=500
        )
