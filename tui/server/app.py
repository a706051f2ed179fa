"""The FastAPI routes: OpenAI's `/v1/models`, `/v1/completions` and `/v1/chat/completions`, llama.cpp's `/infill`
and `/completion` (for llama.vim and Tabby), `/tokenize`, `/health` and `/metrics`.

Each generating route checks its request at the door (the fields, then the exact prompt ids against the context),
opens a generation on the bridge, and answers with a whole body or a stream. A client that goes away cancels its
request, streaming or not: the engine frees its slot within one decode step.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from engine.errors import EngineError
from engine.events import ModelInfo
from engine.requests import ChatMessage, SamplingParams
from engine.requests import Request as EngineRequest
from tui.conversation import Conversation
from tui.server import errors
from tui.server.bridge import Bridge, Generation, ShuttingDown
from tui.server.errors import ApiError
from tui.server.guard import Guard
from tui.server.metrics import CONTENT_TYPE
from tui.server.prompts import ROLES, chat_requests, completion_requests, infill_request
from tui.server.responses import (
    Tally,
    chat_body,
    chat_stream,
    collect,
    completion_body,
    completion_stream,
    llama_body,
    llama_stream,
)
from tui.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EngineInfo,
    InfillRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)

log = logging.getLogger("codellama_tui.server")
MAX_BODY = 8 << 20  # bytes: far more than any context holds as text
ROUTES = frozenset(
    {
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/infill",
        "/completion",
        "/tokenize",
    }
)
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
GONE = 499  # the status logged for a client that left before its answer (nginx's "client closed request")


def create_app(bridge: Bridge, *, api_key: str | None = None, max_body: int = MAX_BODY) -> FastAPI:
    """The server's app around `bridge`, whose client starts with the app and stops with it."""
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bridge.start()
        yield
        await bridge.aclose()

    app = FastAPI(title="codellama-tui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app)
    app.add_middleware(Guard, metrics=bridge.metrics, routes=ROUTES, api_key=api_key, max_body=max_body)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not bridge.ready:
            try:
                bridge.check_ready()
            except ApiError as err:
                return err.response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(bridge.metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        info = bridge.check_ready()
        card = ModelCard(
            id=info.name, created=started, max_model_len=info.context, codellama_tui=EngineInfo(**asdict(info))
        )
        return ModelList(data=[card])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        info = bridge.check_ready()
        requests = completion_requests(body, info)
        await _check(bridge, requests, info)
        generation = bridge.open(requests)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _streaming(
                bridge,
                generation,
                completion_stream(bridge, generation, rid, created, info.name, body.include_usage, body.engine_events),
            )
        if (tally := await _answer(bridge, request, generation)) is None:
            return Response(status_code=GONE)
        return JSONResponse(completion_body(tally, rid, created, info.name).model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        info = bridge.check_ready()
        requests = chat_requests(body, info)
        await _check(bridge, requests, info)
        generation = bridge.open(requests)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _streaming(
                bridge,
                generation,
                chat_stream(bridge, generation, rid, created, info.name, body.include_usage, body.engine_events),
            )
        if (tally := await _answer(bridge, request, generation)) is None:
            return Response(status_code=GONE)
        return JSONResponse(chat_body(tally, rid, created, info.name).model_dump())

    async def llama(body: InfillRequest, request: Request, infilling: bool) -> Response:
        info = bridge.check_ready()
        engine_request = infill_request(body, info, infilling=infilling)
        if body.n_predict == 0:  # llama.vim warms the server's cache this way; ours fills as requests come
            return JSONResponse({"content": "", "stop": True, "model": info.name, "tokens_predicted": 0})
        await _check(bridge, [engine_request], info)
        generation = bridge.open([engine_request])
        if body.stream:
            return _streaming(bridge, generation, llama_stream(bridge, generation, info.name))
        if (tally := await _answer(bridge, request, generation)) is None:
            return Response(status_code=GONE)
        return JSONResponse(llama_body(tally, info.name, body.response_fields))

    @app.post("/infill")
    async def infill(body: InfillRequest, request: Request) -> Response:
        return await llama(body, request, infilling=True)

    @app.post("/completion")
    async def llama_completion(body: InfillRequest, request: Request) -> Response:
        return await llama(body, request, infilling=False)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        bridge.check_ready()
        text = body.text if body.text is not None else body.content or ""
        if body.cap == "chat" and body.messages:
            roles = [ROLES.get(m.role, m.role) for m in body.messages]
            messages = tuple(ChatMessage(r, m.text()) for r, m in zip(roles, body.messages, strict=True))  # type: ignore[arg-type]
            engine_request = EngineRequest("chat", messages=messages)
        elif body.cap == "chat":
            engine_request = Conversation(body.system).request(text, SamplingParams())
        elif body.cap == "infilling" and body.prefix is not None and body.suffix is not None:
            engine_request = EngineRequest("infilling", prefix=body.prefix, suffix=body.suffix, suffix_first=body.spm)
        else:
            engine_request = EngineRequest(body.cap, text=text, suffix_first=body.spm)
        return JSONResponse({"tokens": await _prompt_ids(bridge, engine_request)})

    return app


def _streaming(bridge: Bridge, generation: Generation, events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events; the background task closes the generation even if the client left before the stream
    began (the stream's own `finally` would then never run)."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers=STREAM_HEADERS,
        background=BackgroundTask(bridge.close, generation),
    )


async def _prompt_ids(bridge: Bridge, request: EngineRequest) -> list[int]:
    """The exact prompt ids (built off the loop's thread: a long prompt takes a while), or a 400 saying why not."""
    assert bridge.client is not None
    texts = [request.text, request.prefix or "", request.suffix or "", *(m.content for m in request.messages)]
    try:
        for text in [*texts, *request.sampling.stop]:
            text.encode()
    except UnicodeError:
        raise ApiError(400, "the text is not valid Unicode (it holds a lone surrogate)", code="invalid_text") from None
    try:
        request.sampling.check()
        return await asyncio.get_running_loop().run_in_executor(None, bridge.client.tokenize, request)
    except (EngineError, ValueError) as err:
        raise ApiError(400, str(err), code="invalid_prompt") from None


async def _check(bridge: Bridge, requests: list[EngineRequest], info: ModelInfo) -> None:
    """Refuse a request whose sampling is out of range (each choice has its own seed), or whose prompt cannot be
    built or (unless the request asks to `fit` it) leaves no room in the context, before it queues."""
    for request in requests[1:]:
        try:
            request.sampling.check()
        except ValueError as err:
            raise ApiError(400, str(err), code="invalid_value") from None
    ids = await _prompt_ids(bridge, requests[0])
    if info.context is not None and len(ids) >= info.context and not requests[0].fit:
        raise ApiError(
            400,
            f"the prompt is {len(ids)} tokens but the context holds {info.context}: "
            f"{len(ids) - info.context + 1} tokens too many",
            code="context_length_exceeded",
        )


async def _answer(bridge: Bridge, request: Request, generation: Generation) -> Tally | None:
    """Wait for a whole generation, or for its client to go away (then cancel it and return None)."""
    done = asyncio.ensure_future(collect(generation))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not done.done():
            done.cancel()
        bridge.close(generation)
    if not done.done() or done.cancelled():
        log.info("%s: the client went away; its request is cancelled", request.url.path)
        return None
    try:
        return done.result()
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down") from None


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is read: the next message can only be the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
