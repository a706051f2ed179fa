"""Every failure as OpenAI's JSON error, `{"error": {"message", "type", "param", "code"}}`, never a traceback.

Handlers for FastAPI's validation errors, Starlette's HTTP errors (404, 405) and anything unexpected (500, logged
to stderr with its traceback, answered with one line).
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "unavailable_error",
}


class ApiError(Exception):
    """A request that gets an error response: `status` and OpenAI's fields. `headers` go with it (Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, object]:
        return error_body(self.message, self.status, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param, "code": code}}


def _field(loc: Sequence[object]) -> str | None:
    """A validation error's place as a field path (`messages.0.role`), without FastAPI's leading "body"."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def validation_message(err: RequestValidationError) -> ApiError:
    first = err.errors()[0]
    param = _field(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return ApiError(
            400, "the request body must be a JSON object (with Content-Type: application/json)", code="invalid_json"
        )
    what = first.get("msg", "invalid value").removeprefix("Value error, ")
    what = what[:1].lower() + what[1:]
    return ApiError(400, f"{param}: {what}" if param else what, param=param, code="invalid_value")


def install(app: FastAPI) -> None:
    """Route every error through OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_message(err).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
        else:
            message = str(err.detail)
        code = "request_too_large" if err.status_code == 413 else None
        return ApiError(err.status_code, message, code=code, headers=getattr(err, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        """Starlette raises the error on after this answer, and uvicorn logs it with its traceback."""
        return ApiError(500, f"internal error ({type(err).__name__}); the server's log has the details").response()
