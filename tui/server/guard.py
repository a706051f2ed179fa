"""The door of every request: the API key (compared in constant time), the body's size, and the count of
answers by route and status for `/metrics`. A plain ASGI middleware, so that streams pass through untouched."""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tui.server.errors import ApiError
from tui.server.metrics import Metrics

OPEN_PATHS = frozenset({"/health"})  # answered without a key: load balancers and health checks carry none


class TooLarge(HTTPException):
    """A chunked body that outgrew the limit while being read (FastAPI passes HTTP errors from reading on)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large(limit).message)


class Guard:
    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str], api_key: str | None, max_body: int):
        self.app, self.metrics, self.routes = app, metrics, routes
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http.labels(route, str(message["status"])).inc()
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal.response()(scope, receive, counting_send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise TooLarge(self.max_body)
            return message

        await self.app(scope, limited_receive, counting_send)

    def _refusal(self, scope: Scope) -> ApiError | None:
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not given:
                return ApiError(401, "an API key is needed: send 'Authorization: Bearer KEY'", code="invalid_api_key")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return ApiError(401, "the API key is wrong", code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return _too_large(self.max_body)
        return None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the server takes ({limit} bytes)", code="request_too_large")
