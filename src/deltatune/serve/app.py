"""The HTTP layer: an ASGI app (Starlette) with OpenAI's routes, adapter management, auth and limits.

Routes: GET /health; GET /v1/models[/{id}]; POST /v1/completions and /v1/chat/completions (`stream: true` answers
with server-sent events); GET /v1/adapters, POST /v1/adapters/load and /v1/adapters/unload (API key required).
Every error is a JSON body `{"error": {...}}` with a 4xx / 5xx status; nothing a request sends can stop the server.

Routed requests: with a `Settings.resolver`, a request whose "model" is `Settings.routed_model` ("store:auto", a
name no adapter can have) asks the resolver for an adapter for its text; the adapter it names is registered like
any other (LRU applies) and the request runs as an ordinary row of the mixed batch. The resolver runs on the
engine thread (it may change the model, e.g. compose an adapter); the header `x-deltatune-adapter` says which
adapter answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..core.errors import DeltatuneError
from ..train.interactive import prompt_ids
from .engine import Engine, Event, Request
from .protocol import ApiError, Completion, Limits, Reply, parse, usage

log = logging.getLogger("deltatune.serve")

ROUTED_MODEL = "store:auto"
# (requested model name, the request's text) -> (adapter name, adapter directory), or None: nothing fits
Resolver = Callable[[str, str], tuple[str, str | Path] | None]


@dataclass
class Settings:
    base_name: str
    api_key: str | None = None
    max_concurrent: int = 64  # requests queued or running; more get 429
    max_body_bytes: int = 1 << 20
    limits: Limits = field(default_factory=Limits)
    resolver: Resolver | None = None  # picks the adapter of requests for `routed_model` (see the module doc)
    routed_model: str = ROUTED_MODEL


class Gate:
    """Counts requests in flight (from acceptance to their final event) and refuses beyond the limit."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count, self.lock = limit, 0, threading.Lock()

    def enter(self) -> None:
        with self.lock:
            if self.count >= self.limit:
                raise ApiError(429, f"the server is busy ({self.limit} requests in flight); retry shortly")
            self.count += 1

    def leave(self) -> None:
        with self.lock:
            self.count -= 1


def create_app(engine: Engine, settings: Settings, *, engine_thread: bool = True) -> Starlette:
    """The ASGI app. engine_thread: start the engine on its own thread with the app (and stop it after); False
    when the caller runs the engine itself (`deltatune serve` runs it on the main thread)."""
    gate = Gate(settings.max_concurrent)
    store = engine.adapters

    def guarded(handler: Callable[[HttpRequest], Awaitable[Response]], management: bool = False):
        async def endpoint(request: HttpRequest) -> Response:
            try:
                _authorize(request, settings.api_key, management)
                return await handler(request)
            except ApiError as exc:
                return _error(exc)
            except DeltatuneError as exc:
                return _error(ApiError(400, str(exc)))
            except Exception:
                log.exception("unexpected error on %s", request.url.path)
                return _error(ApiError(500, "internal server error; the server keeps running"))
        return endpoint

    async def health(request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "in_flight": gate.count})

    def model_card(name: str, parent: str | None) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "deltatune", "root": name, "parent": parent}

    async def models(request: HttpRequest) -> Response:
        cards = [model_card(settings.base_name, None)]
        if settings.resolver is not None:
            cards.append(model_card(settings.routed_model, settings.base_name))
        cards += [model_card(a["name"], settings.base_name) for a in store.listing()]
        return JSONResponse({"object": "list", "data": cards})

    async def one_model(request: HttpRequest) -> Response:
        name = request.path_params["name"]
        if name == settings.base_name:
            return JSONResponse(model_card(name, None))
        if settings.resolver is not None and name == settings.routed_model:
            return JSONResponse(model_card(name, settings.base_name))
        if store.find(name) is None:
            raise ApiError(404, f"model {name!r} does not exist", "model", "model_not_found")
        return JSONResponse(model_card(name, settings.base_name))

    async def completions(request: HttpRequest) -> Response:
        return await _generate(request, chat=False)

    async def chat_completions(request: HttpRequest) -> Response:
        return await _generate(request, chat=True)

    async def _generate(request: HttpRequest, chat: bool) -> Response:
        body = await _read_json(request, settings.max_body_bytes)
        completion = parse(body, chat, settings.limits)
        ids = _tokens(engine.tokenizer, completion, settings.limits)
        gate.enter()  # before routing: a routed request may compose an adapter, which must count as in flight
        try:
            job = Request(ids, completion.params, await _adapter_for(completion))
        except BaseException:
            gate.leave()
            raise
        events = _EventChannel(asyncio.get_running_loop(), gate)
        job.emit = events.put
        engine.submit(job)
        reply = Reply(completion)
        routed = {"x-deltatune-adapter": job.adapter} if completion.model == settings.routed_model else {}
        if completion.stream:
            return StreamingResponse(_sse(reply, events, engine, job, completion.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", **routed})
        try:
            pieces = []
            async for event in events:
                if event.error:
                    raise ApiError(event.status, event.error)
                pieces.append(event.text)
                if event.finish_reason:
                    return JSONResponse(reply.full("".join(pieces), event.finish_reason,
                                                   usage(event.prompt_tokens, len(event.completion_ids))),
                                        headers=routed)
        finally:
            if not events.done:
                engine.cancel(job.id)
        raise ApiError(500, "generation ended without a result")

    async def _adapter_for(completion: Completion) -> str | None:
        model = completion.model
        if model == settings.base_name:
            return None
        if settings.resolver is not None and model == settings.routed_model:
            return await _routed_adapter(completion)
        if store.find(model) is None:
            raise ApiError(404, f"model {model!r} does not exist: use {settings.base_name!r} or an adapter listed "
                                "by /v1/models", "model", "model_not_found")
        return model

    async def _routed_adapter(completion: Completion) -> str:
        """The resolver's adapter for this request, registered (on the engine thread: it may touch the model)."""
        text = routing_text(completion)
        try:
            found = await asyncio.wrap_future(engine.call(lambda: settings.resolver(completion.model, text)))
        except DeltatuneError as exc:
            raise ApiError(422, f"no adapter could be routed for this request: {exc}", "model",
                           "no_routed_adapter") from exc
        if found is None:
            raise ApiError(422, "no adapter could be routed for this request: the router found none for its "
                                f"text; name an adapter or {settings.base_name!r} instead", "model",
                           "no_routed_adapter")
        name, directory = found
        return store.register(name, directory).name

    async def list_adapters(request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": store.listing(), "max_loaded": store.max_loaded})

    async def load(request: HttpRequest) -> Response:
        body = await _read_json(request, settings.max_body_bytes)
        name, path = _field(body, "name"), body.get("path")
        known = store.get(name)
        entry = known if known is not None and path is None else store.register_from_root(name, path)

        def load_now():
            try:
                return store.load_now(entry.name)
            except BaseException:
                if entry.pins == 0 and entry.internal is None and known is None:
                    store.unload(entry.name)  # registered just now: forget it again
                raise

        await asyncio.wrap_future(engine.call(load_now))
        return JSONResponse({"name": entry.name, "loaded": True})

    async def unload(request: HttpRequest) -> Response:
        name = _field(await _read_json(request, settings.max_body_bytes), "name")
        if name not in {a["name"] for a in store.listing()}:
            raise ApiError(404, f"adapter {name!r} is not served here", "name")
        try:
            await asyncio.wrap_future(engine.call(lambda: store.unload(name)))
        except DeltatuneError as exc:
            raise ApiError(409, str(exc), "name") from exc
        return JSONResponse({"name": name, "loaded": False})

    async def not_found(request: HttpRequest, exc: HTTPException) -> Response:
        return _error(ApiError(exc.status_code, exc.detail or "error"))

    routes = [
        Route("/health", health),
        Route("/v1/models", guarded(models)),
        Route("/v1/models/{name:path}", guarded(one_model)),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/adapters", guarded(list_adapters, management=True)),
        Route("/v1/adapters/load", guarded(load, management=True), methods=["POST"]),
        Route("/v1/adapters/unload", guarded(unload, management=True), methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine_thread:
            engine.start()
        try:
            yield
        finally:
            if engine_thread:
                engine.stop()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found})
    app.state.engine, app.state.gate, app.state.settings = engine, gate, settings
    return app


class _EventChannel:
    """Engine events handed to the event loop of the request that waits for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, gate: Gate) -> None:
        self.loop, self.gate = loop, gate
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.done = False

    def put(self, event: Event) -> None:  # engine thread
        if event.final:
            self.gate.leave()
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while not self.done:
            event = await self.queue.get()
            self.done = event.final
            yield event


async def _sse(reply: Reply, events: _EventChannel, engine: Engine, job: Request, include_usage: bool):
    def data(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if reply.request.chat:
            yield data(reply.chunk("", first=True))
        async for event in events:
            if event.error:
                yield data(ApiError(event.status, event.error).body())
                break
            if event.text:
                yield data(reply.chunk(event.text))
            if event.finish_reason:
                yield data(reply.chunk("", event.finish_reason))
                if include_usage:
                    yield data(reply.usage_chunk(usage(event.prompt_tokens, len(event.completion_ids))))
        yield "data: [DONE]\n\n"
    finally:
        if not events.done:
            engine.cancel(job.id)


def _authorize(request: HttpRequest, api_key: str | None, management: bool) -> None:
    if api_key is None:
        if management:
            raise ApiError(403, "adapter management is disabled: start the server with --api-key (or "
                                "DELTATUNE_API_KEY)")
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(token.encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")


async def _read_json(request: HttpRequest, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None


def _field(body: object, name: str) -> str:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"'{name}' is required (a string)", name)
    return value


def routing_text(completion: Completion) -> str:
    """What a router reads: the prompt, or for chat the last user message (the task at hand), else the last one."""
    if isinstance(completion.prompt, str):
        return completion.prompt
    users = [m["content"] for m in completion.prompt if m["role"] == "user"]
    return users[-1] if users else completion.prompt[-1]["content"]


def _tokens(tokenizer, completion: Completion, limits: Limits) -> list[int]:
    """The prompt's token ids (chat messages through the chat template, as `deltatune generate`), within limits."""
    try:
        ids = prompt_ids(tokenizer, completion.prompt, raw=not completion.chat)
    except Exception as exc:  # noqa: BLE001 -- a template that rejects this conversation, for instance
        raise ApiError(400, f"could not render the prompt: {exc}", "messages" if completion.chat else "prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    total = len(ids) + completion.params.max_tokens
    if total > limits.max_context:
        raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({completion.params.max_tokens}) exceeds the "
                            f"context limit of {limits.max_context} tokens; shorten the prompt or lower max_tokens",
                       "max_tokens")
    return ids


def _error(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

