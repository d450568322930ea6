"""The HTTP side of `qmoe serve`: Starlette routes on uvicorn.

    POST /v1/chat/completions   messages -> the model's chat template -> generation
    POST /v1/completions        a prompt (text or token ids) -> generation
    GET  /v1/models             the one model this server runs
    GET  /health                200 while serving, 503 while shutting down
    GET  /metrics               Prometheus text (metrics.py)

A request is read (at most `max_body` bytes), checked (protocol.py), tokenized,
and queued for the model thread (scheduler.py), which sends its text back
through an asyncio queue; the answer is one JSON object or, with `stream`,
server-sent events ending with `data: [DONE]`. Everything a client can get
wrong is a 4xx with OpenAI's error object; a client that goes away frees its
slot at once. SIGTERM (or Ctrl-C) stops taking requests, gives those in flight
`shutdown_grace` seconds to finish, ends the rest with an error event, and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from qmoe.chat import render_chat
from qmoe.engine import Model
from qmoe.errors import QmoeError
from qmoe.serve import metrics
from qmoe.serve.protocol import (
    APIError,
    Defaults,
    GenerationRequest,
    Reply,
    check_model,
    parse_chat,
    parse_completion,
)
from qmoe.serve.scheduler import Done, Event, Failed, Job, Piece, Scheduler

log = logging.getLogger("qmoe.serve")

MAX_BODY = 4 << 20  # bytes: a full 128k-token context as JSON text fits with room to spare


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 1
    queue: int = 64
    api_key: str | None = None
    shutdown_grace: float = 10.0
    max_body: int = MAX_BODY


class Routes:
    """The routes, over one model and its scheduler."""

    def __init__(self, model: Model, scheduler: Scheduler, defaults: Defaults, options: ServeOptions):
        self.model, self.scheduler, self.defaults, self.options = model, scheduler, defaults, options
        self.model_id = model.path.name.removesuffix(".gguf")

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        handlers = {APIError: self._api_error, HTTPException: self._http_error, Exception: self._server_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # -- errors, in OpenAI's shape

    async def _api_error(self, request: Request, e: APIError) -> Response:
        return JSONResponse(e.body(), status_code=e.status)

    async def _http_error(self, request: Request, e: HTTPException) -> Response:  # unknown route, method
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    async def _server_error(self, request: Request, e: Exception) -> Response:
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {e}").body(), status_code=500)

    # -- routes

    async def health(self, request: Request) -> Response:
        if self.scheduler.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": int(self.model.path.stat().st_mtime),
             "owned_by": "qmoe"},
        ]})

    async def metrics(self, request: Request) -> Response:
        self._authorize(request)
        store = self.model.offload.snapshot() if self.model.offload is not None else None
        return PlainTextResponse(metrics.render(self.scheduler.snapshot(), store),
                                 media_type="text/plain; version=0.0.4")

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._json(request)
        check_model(body, self.model_id)
        req = parse_completion(body, self.defaults, self.model.n_ctx, self.model.n_vocab)
        ids = req.prompt if isinstance(req.prompt, list) else self.model.tokenize(req.prompt)
        return await self._generate(request, req, ids)

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._json(request)
        check_model(body, self.model_id)
        req, messages = parse_chat(body, self.defaults, self.model.n_ctx)
        try:
            text = render_chat(self.model, messages)
        except QmoeError as e:
            raise APIError(400, str(e), param="messages") from None
        return await self._generate(request, req, self.model.tokenize(text, add_bos=False))

    # -- the parts

    def _authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def _json(self, request: Request) -> dict:
        """The body as a JSON object, refused past `max_body` bytes before it is all read."""
        limit = self.options.max_body
        too_big = APIError(413, f"The request body exceeds {limit} bytes", code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise too_big
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"The body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "The body must be a JSON object", code="invalid_json")
        return body

    def _max_tokens(self, req: GenerationRequest, n_prompt: int) -> int:
        """The request's max_tokens, checked against the context; left out: the default, cut to fit."""
        n_ctx = self.model.n_ctx
        if n_prompt == 0:
            raise APIError(400, "The prompt is empty", param="prompt")
        if n_prompt > n_ctx:
            raise APIError(400, f"The prompt has {n_prompt} tokens, more than the context of {n_ctx} tokens",
                           param="messages" if req.chat else "prompt", code="context_length_exceeded")
        room = n_ctx - n_prompt + 1  # the last token is sampled, never fed
        if req.max_tokens is None:
            return min(self.defaults.max_tokens, room)
        if req.max_tokens > room:
            raise APIError(400, f"The context is {n_ctx} tokens; the prompt has {n_prompt}, which leaves "
                           f"{room} for the completion, but max_tokens is {req.max_tokens}",
                           param="max_tokens", code="context_length_exceeded")
        return req.max_tokens

    async def _generate(self, request: Request, req: GenerationRequest, ids: list[int]) -> Response:
        max_tokens = self._max_tokens(req, len(ids))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(ids, max_tokens, req.sampling, req.stop,
                  emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        self.scheduler.submit(job)  # a 503 when the queue is full
        reply = Reply(self.model_id, req.chat)
        if req.stream:
            return StreamingResponse(self._sse(request, job, events, reply, req.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces = []
        async for event in self._events(request, job, events):
            if isinstance(event, Piece):
                pieces.append(event.text)
            elif isinstance(event, Done):
                return JSONResponse(reply.whole("".join(pieces), event.finish_reason, event.usage))
            else:
                raise event.error
        return Response(status_code=499)  # the client went away: nobody reads this

    async def _sse(self, request: Request, job: Job, events: asyncio.Queue, reply: Reply,
                   include_usage: bool) -> AsyncIterator[str]:
        def data(obj: Any) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        if reply.chat:
            yield data(reply.chunk("", first=True))
        async for event in self._events(request, job, events):
            if isinstance(event, Piece):
                yield data(reply.chunk(event.text))
            elif isinstance(event, Done):
                yield data(reply.chunk(None if reply.chat else "", event.finish_reason))
                if include_usage:
                    yield data(reply.usage_chunk(event.usage))
            else:  # the stream has begun (status 200): the error travels as an event, as OpenAI's does
                yield data(event.error.body())
            if isinstance(event, Done | Failed):
                yield "data: [DONE]\n\n"

    async def _events(self, request: Request, job: Job, events: asyncio.Queue) -> AsyncIterator[Event]:
        """The job's events up to its Done or Failed; if the client disconnects first, the job
        is cancelled at once (its slot freed at the model thread's next turn)."""
        gone = asyncio.ensure_future(_disconnected(request))
        finished = False
        try:
            while True:
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return
                event = get.result()
                finished = isinstance(event, Done | Failed)
                yield event
                if finished:
                    return
        finally:
            gone.cancel()
            if not finished:
                self.scheduler.cancel(job)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server that other machines can reach and that asks for no key."""
    if api_key is not None or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve anywhere
        pass
    return (f"qmoe: warning: serving on {host}, reachable from other machines, without --api-key: "
            "anyone who can reach it can use it")


class Server(uvicorn.Server):
    """uvicorn serving the routes, with the model thread started and stopped around it.

    SIGTERM and Ctrl-C (handle_exit, also called by `shutdown`) drain the scheduler first:
    uvicorn then waits for the open responses, which end within the grace.
    """

    def __init__(self, model: Model, defaults: Defaults, options: ServeOptions):
        self.scheduler = Scheduler(model, options.parallel, options.queue)
        self.routes = Routes(model, self.scheduler, defaults, options)
        self.grace = options.shutdown_grace
        super().__init__(uvicorn.Config(self.routes.app(), host=options.host, port=options.port,
                                        log_level="warning", access_log=False,
                                        timeout_graceful_shutdown=int(options.shutdown_grace) + 5))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.scheduler.drain(self.grace)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, except that it does not raise the signal again once the server has shut
        down, which would kill the process before `serve_forever` stops the model thread (and
        `qmoe serve` reports the store's statistics): a drained server exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def shutdown_soon(self) -> None:
        """What SIGTERM does, from any thread (tests run the server in a thread)."""
        self.handle_exit(signal.SIGTERM, None)

    def serve_forever(self) -> None:
        """Until SIGTERM, Ctrl-C or shutdown_soon(); the model thread runs meanwhile."""
        self.scheduler.start()
        try:
            self.run()
        finally:
            self.scheduler.stop()

    @property
    def port(self) -> int:
        """The port listened on (the one the OS chose for --port 0), once `started`."""
        return self.servers[0].sockets[0].getsockname()[1]


def serve(model: Model, defaults: Defaults, options: ServeOptions) -> None:
    """Run the server in this (the main) thread until SIGTERM or Ctrl-C."""
    warning = exposure_warning(options.host, options.api_key)
    if warning:
        print(warning, file=sys.stderr)
    server = Server(model, defaults, options)
    print(f"qmoe: serving {server.routes.model_id} at http://{options.host}:{options.port}/v1 "
          f"({options.parallel} slot{'s' if options.parallel > 1 else ''}, queue {options.queue})",
          file=sys.stderr, flush=True)
    server.serve_forever()
