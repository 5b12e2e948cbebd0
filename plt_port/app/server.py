"""An OpenAI-compatible HTTP server over `runtimes.engine.BatchEngine` (FastAPI).

Endpoints as OpenAI defines them: `POST /v1/completions`, `POST /v1/chat/completions`
(server-sent events with `"stream": true`), `GET /v1/models`, plus `GET /health` and
`GET /metrics` (Prometheus text). Model ids name the loop count: `NAME` runs the default
one, `NAME@loops=K` runs K loops (so does the extra body field `"loops": K`).

Handlers run on the event loop and never touch a backend: they submit requests to the
engine thread, whose `emit` callback hands each token back to the loop. Errors come back in
OpenAI's error JSON; anything that is not the client's fault is a 500 whose details stay in
the server log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from plt_port.config import MAX_LOOPS
from plt_port.errors import PLTError
from runtimes.engine import BatchEngine, QueueFullError, Request, TokenEvent
from runtimes.generate import ContextLengthError, chat_prompt_ids, encode_prompt
from runtimes.sampling import SamplingParams

log = logging.getLogger("plt_port.app.server")

MAX_STOP_STRINGS = 16
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 1.0
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class APIError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, error_type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status)


def error_body(message: str, error_type: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def api_error(exc: BaseException) -> APIError:
    """The client's view of an exception from the engine or the request's checks."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), "rate_limit_error", code="queue_full")
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, PLTError):
        return APIError(400, str(exc))
    log.error("internal error", exc_info=exc)
    return APIError(500, "internal server error; the server log has the details", "server_error")


# ---- request bodies ----------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationBody(BaseModel):
    """Fields both endpoints take (OpenAI's, and the sampling extras of vLLM and mlx-lm)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    loops: int | None = None


class CompletionBody(GenerationBody):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) \
            else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatBody(GenerationBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


# ---- metrics -----------------------------------------------------------------------------------
class ServerMetrics:
    """Prometheus metrics of one server (its own registry: several servers can share a process)."""

    def __init__(self, engine: BatchEngine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("plt_requests", "HTTP requests by path and status",
                                ["path", "status"], registry=r)
        self.prompt_tokens = Counter("plt_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("plt_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("plt_time_to_first_token_seconds",
                              "From the request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.token_latency = Histogram("plt_time_per_output_token_seconds",
                                       "Between consecutive tokens of one sequence",
                                       buckets=LATENCY_BUCKETS, registry=r)
        Gauge("plt_running_sequences", "Sequences in the running batches",
              registry=r).set_function(lambda: engine.running_count)
        Gauge("plt_queued_sequences", "Requests waiting to join a batch",
              registry=r).set_function(lambda: engine.queued_count)
        Gauge("plt_cache_bytes", "Bytes held by the running batches' caches",
              registry=r).set_function(lambda: engine.cache_bytes)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: one count per response, by route and status."""

    def __init__(self, app, metrics: ServerMetrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


# ---- one request's run ---------------------------------------------------------------------------
@dataclass
class Generation:
    """One request submitted to the engine, its token events read on the event loop."""

    request: Request
    events: asyncio.Queue
    metrics: ServerMetrics
    tokens: int = 0
    last_time: float | None = None
    finish_reason: str | None = None
    started: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])

    async def next_events(self, http_request: HTTPRequest | None) -> list[TokenEvent]:
        """The next token and those already queued behind it (one write for them all); while
        waiting, a gone client (when `http_request` is given) cancels the request."""
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
                break
            except asyncio.TimeoutError:
                if http_request is not None and await http_request.is_disconnected():
                    raise APIError(499, "the client closed the request") from None
        events = [self.accept(event)]
        while self.finish_reason is None and not self.events.empty():
            events.append(self.accept(self.events.get_nowait()))
        return events

    def accept(self, event: TokenEvent | BaseException) -> TokenEvent:
        if isinstance(event, BaseException):
            raise event
        self.metrics.generation_tokens.inc()
        if self.last_time is None:
            self.metrics.ttft.observe(event.time - self.request.arrived)
        else:
            self.metrics.token_latency.observe(event.time - self.last_time)
        self.last_time = event.time
        self.tokens += 1
        self.finish_reason = event.finish_reason
        return event

    async def stream(self, http_request: HTTPRequest | None) -> AsyncIterator[list[TokenEvent]]:
        try:
            while self.finish_reason is None:
                yield await self.next_events(http_request)
        finally:
            self.request.cancel()  # a no-op once finished; frees the slot of a client gone


def sse_data(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def skippable(event: TokenEvent) -> bool:
    """A token whose stream chunk would say nothing (text held back, not the first or last)."""
    return not event.text and event.finish_reason is None and event.index > 1


# ---- the app -----------------------------------------------------------------------------------
def create_app(engine: BatchEngine, tokenizer, model_name: str) -> FastAPI:
    app = FastAPI(title="plt-port", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(engine)
    app.state.metrics = metrics
    default_loops = engine.backend.loops
    context = engine.backend.config.max_position_embeddings
    model_ids = {model_name: default_loops} | {f"{model_name}@loops={k}": k
                                               for k in range(1, MAX_LOOPS + 1)}
    created = int(time.time())

    @app.exception_handler(APIError)
    async def on_api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(PLTError)
    async def on_bad_request(_, exc: PLTError):
        return api_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_, exc: RequestValidationError):
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return APIError(400, f"{param or 'body'}: {first['msg']}", param=param).response()

    @app.exception_handler(HTTPException)
    async def on_http_error(_, exc: HTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def on_internal_error(_, exc: Exception):
        return api_error(exc).response()

    def resolve_loops(body: GenerationBody) -> int:
        model = body.model or model_name
        if model not in model_ids:
            raise APIError(404, f"the model {model!r} does not exist; this server has "
                                f"{', '.join(model_ids)}", param="model", code="model_not_found")
        loops = model_ids[model]
        if body.loops is not None and body.loops != loops and model != model_name:
            raise APIError(400, f"loops={body.loops} contradicts the model id {model!r}",
                           param="loops")
        return body.loops if body.loops is not None else loops

    def submit(body: GenerationBody, prompt_ids: list[int], max_tokens: int,
               top_logprobs: int | None) -> Generation:
        if body.n != 1:
            raise APIError(400, "only n=1 is supported; send several requests", param="n")
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request = Request(
            prompt_ids, max_tokens, lambda event: loop.call_soon_threadsafe(events.put_nowait,
                                                                            event),
            SamplingParams(temperature=body.temperature, top_k=max(body.top_k, 0),
                           top_p=body.top_p, min_p=body.min_p,
                           repetition_penalty=body.repetition_penalty, seed=body.seed),
            stop, resolve_loops(body), top_logprobs)
        engine.submit(request)
        metrics.prompt_tokens.inc(len(prompt_ids))
        return Generation(request, events, metrics)

    def usage(generation: Generation) -> dict:
        prompt = len(generation.request.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": generation.tokens,
                "total_tokens": prompt + generation.tokens}

    def token_text(token: int) -> str:
        return tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    async def respond(body: GenerationBody, http_request: HTTPRequest, generation: Generation,
                      chunk, final) -> Response:
        """A JSON response of the whole answer, or server-sent events: `chunk(event)` per
        token, then a usage chunk when asked for, then [DONE]."""
        # an error before the first token gets its status (and the connection stays usable)
        if not body.stream:
            try:
                events = [event async for events in generation.stream(http_request)
                          for event in events]
            except Exception as exc:  # noqa: BLE001
                return api_error(exc).response()
            return JSONResponse(final(events) | {"usage": usage(generation)})
        tokens = generation.stream(None)
        try:
            first = await anext(tokens)
        except Exception as exc:  # noqa: BLE001
            await tokens.aclose()
            return api_error(exc).response()

        async def sse():
            events = first
            try:
                while True:
                    data = "".join(sse_data(p) for p in map(chunk, events) if p is not None)
                    if data:
                        yield data
                    if generation.finish_reason is not None:
                        break
                    events = await anext(tokens)
                if body.stream_options and body.stream_options.include_usage:
                    yield sse_data(chunk(None) | {"usage": usage(generation)})
                yield "data: [DONE]\n\n"
            except Exception as exc:  # noqa: BLE001 (headers are sent: the error is an event)
                error = api_error(exc)
                yield sse_data(error_body(error.message, error.type, error.param, error.code))
            finally:
                await tokens.aclose()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def envelope(kind: str, generation: Generation, choices: list) -> dict:
        loops = generation.request.loops
        return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{generation.id}",
                "object": kind, "created": int(generation.started),
                "model": model_name if loops == default_loops else f"{model_name}@loops={loops}",
                "choices": choices}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http_request: HTTPRequest):
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise APIError(400, f"logprobs must be in 0..{MAX_COMPLETION_LOGPROBS}",
                           param="logprobs")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request; send several requests",
                               param="prompt")
            prompt = prompt[0]
        prompt_ids = encode_prompt(tokenizer, prompt, tokenizer.add_bos_token)
        max_tokens = body.max_tokens if body.max_tokens is not None \
            else DEFAULT_COMPLETION_MAX_TOKENS
        generation = submit(body, prompt_ids, max_tokens, body.logprobs)

        def logprobs(events: list[TokenEvent], offset: int = 0) -> dict | None:
            if body.logprobs is None:
                return None
            offsets = [offset]
            for event in events[:-1]:
                offsets.append(offsets[-1] + len(event.text))
            return {"tokens": [token_text(e.token) for e in events],
                    "token_logprobs": [e.logprobs.logprob for e in events],
                    "top_logprobs": [{token_text(t): lp for t, lp in e.logprobs.top}
                                     for e in events],
                    "text_offset": offsets}

        sent = [0]  # characters streamed so far (the text offset of the next chunk)

        def chunk(event: TokenEvent | None) -> dict | None:
            if event is None:
                return envelope("text_completion", generation, [])
            if skippable(event) and body.logprobs is None:
                return None
            choice = {"index": 0, "text": event.text, "logprobs": logprobs([event], sent[0]),
                      "finish_reason": event.finish_reason}
            sent[0] += len(event.text)
            return envelope("text_completion", generation, [choice])

        def final(events: list[TokenEvent]) -> dict:
            choice = {"index": 0, "text": "".join(e.text for e in events),
                      "logprobs": logprobs(events), "finish_reason": generation.finish_reason}
            return envelope("text_completion", generation, [choice])

        return await respond(body, http_request, generation, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http_request: HTTPRequest):
        if not body.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        top = body.top_logprobs or 0
        if not 0 <= top <= MAX_CHAT_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in 0..{MAX_CHAT_TOP_LOGPROBS}",
                           param="top_logprobs")
        prompt_ids = chat_prompt_ids(tokenizer, [m.as_dict() for m in body.messages])
        max_tokens = next((m for m in (body.max_completion_tokens, body.max_tokens)
                           if m is not None), max(context - len(prompt_ids) + 1, 1))
        generation = submit(body, prompt_ids, max_tokens, top if body.logprobs else None)

        def logprobs(events: list[TokenEvent]) -> dict | None:
            if not body.logprobs:
                return None

            def entry(token: int, logprob: float) -> dict:
                return {"token": token_text(token), "logprob": logprob,
                        "bytes": list(tokenizer.token_bytes(token))}

            return {"content": [entry(e.token, e.logprobs.logprob)
                                | {"top_logprobs": [entry(t, lp) for t, lp in e.logprobs.top]}
                                for e in events]}

        def chunk(event: TokenEvent | None) -> dict | None:
            if event is None:
                return envelope("chat.completion.chunk", generation, [])
            if skippable(event) and not body.logprobs:
                return None
            delta = {"content": event.text}
            if event.index == 1:
                delta = {"role": "assistant"} | delta
            choice = {"index": 0, "delta": delta, "logprobs": logprobs([event]),
                      "finish_reason": event.finish_reason}
            return envelope("chat.completion.chunk", generation, [choice])

        def final(events: list[TokenEvent]) -> dict:
            message = {"role": "assistant", "content": "".join(e.text for e in events)}
            choice = {"index": 0, "message": message, "logprobs": logprobs(events),
                      "finish_reason": generation.finish_reason}
            return envelope("chat.completion", generation, [choice])

        return await respond(body, http_request, generation, chunk, final)

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": model_id, "object": "model", "created": created,
                          "owned_by": "plt-port"} for model_id in model_ids]}

    @app.get("/health")
    async def health():
        status = "ok" if engine.alive else "stopped"
        return JSONResponse({"status": status, "running": engine.running_count,
                             "queued": engine.queued_count},
                            status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(CountRequests, metrics=metrics,
                       paths={route.path for route in app.routes})
    return app
